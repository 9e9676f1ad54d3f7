"""Run every benchmark family: each bench/bench_<family>.py that defines run(cfg).

    python bench/run.py                      # full suite, 2 threads (what `make bench` runs)
    python bench/run.py --threads 1,2        # once per thread count
    python bench/run.py --quick              # tiny shapes, few repeats (smoke test, CI)
    python bench/run.py --only matmul        # some families only

Rows are appended to <results-dir>/<family>.jsonl (never overwritten); each family's
markdown summary is printed and written to <results-dir>/<family>_summary.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # bench_<family>.py import `common` as a sibling module
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402


def discover() -> dict[str, Path]:
    """family name -> file, for every bench_<family>.py next to this script."""
    return {p.stem[len("bench_") :]: p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def main(argv=None) -> int:
    families = discover()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(parser)
    parser.add_argument(
        "--only", default=None, help=f"comma-separated families to run (found: {', '.join(families) or 'none'})"
    )
    args = parser.parse_args(argv)
    chosen = list(families)
    if args.only:
        chosen = [f.strip() for f in args.only.split(",") if f.strip()]
        unknown = [f for f in chosen if f not in families]
        if unknown:
            parser.error(f"--only: unknown famil{'ies' if len(unknown) > 1 else 'y'} {unknown}; found {list(families)}")
    cfg = common.config_from_args(args)

    start = time.perf_counter()
    results = []
    for family in chosen:
        module = importlib.import_module(f"bench_{family}")
        results.append(module.run(cfg))
    status = common.report(cfg, results)
    print(
        f"bench/run.py: {', '.join(chosen)} took {(time.perf_counter() - start) / 60:.1f} min "
        f"(threads {','.join(map(str, cfg.threads))}, device {cfg.device.type}"
        f"{', quick' if cfg.quick else ''})"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
