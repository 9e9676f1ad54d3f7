"""The memory planner (accelops.plan, accelops/planner.py) against measured peak memory: per strategy, optimizer,
quant mode and rank, the planner's per-device estimate / the measured peak RSS growth of
bench_scaleout's 2-rank gloo workers (TransformerLM dim 512, 6 blocks, 25.5M parameters,
global batch 8 x 128 tokens: 4 a rank; pipeline 4 micro-batches of 2, 1F1B).

- unquantized, AdamW and AdamW8bit, every strategy: the newest full-size rows of
  <results-dir>/scaleout.jsonl (what `bench/run.py --only scaleout` measured; rerun it
  with ACCELOPS_BENCH_SCALEOUT_OPTIMIZER=adamw8bit for the 8-bit rows);
- quantized (QUANT_RUNS below): measured here, with bench_scaleout's worker and a quant
  parameter (~15 s a strategy).

Target: every estimate within 15% of the measured peak.

    python bench/bench_plan.py [--quick]      # or: python bench/run.py --only plan
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
import bench_scaleout  # noqa: E402
import common  # noqa: E402

FAMILY = "plan"
TOLERANCE = 0.15
QUANT_RUNS = [
    ("bitlinear", "ddp", "adamw"),
    ("bitlinear", "fsdp", "adamw"),
    ("qat-int8", "ddp", "adamw"),
    ("qat-int8", "fsdp", "adamw"),
]
QUICK_RUNS = [(None, "ddp", "adamw"), ("bitlinear", "fsdp", "adamw")]
# bench_scaleout's rows -> the planner's strategy names
SCALEOUT_TO_PLANNER = {"fsdp-submodule-noprefetch": "fsdp_submodule"}
PLANNER_STRATEGIES = ("ddp", "zero1", "fsdp", "fsdp_submodule", "pipeline")


def estimates(spec: dict, strategy: str, optimizer: str, quant) -> list[int]:
    """The planner's bytes for each rank of bench_scaleout's set-up (the pipeline's ranks
    are its stages)."""
    from accelops.models import TransformerLMConfig
    from accelops.planner import estimate, profile_model

    cfg = TransformerLMConfig(
        vocab_size=spec["vocab_size"],
        dim=spec["dim"],
        n_layers=spec["n_layers"],
        n_heads=spec["n_heads"],
        max_len=spec["seq_len"],
        quant=quant,
    )
    prof = profile_model(cfg)
    world = bench_scaleout.WORLD
    if strategy == "pipeline":
        e = estimate(
            prof,
            "pipeline",
            world,
            spec["batch"] // spec["micro"],
            spec["seq_len"],
            optimizer,
            n_microbatches=spec["micro"],
            schedule="1f1b",
            quant=quant,
        )
        return e.per_stage
    e = estimate(prof, strategy, world, spec["batch"] // world, spec["seq_len"], optimizer, quant=quant)
    return [e.total] * world


def measured_scaleout_rows(path: Path, spec: dict) -> dict:
    """(strategy, optimizer, quant) -> {rank: peak bytes} from the newest ok rows of this spec."""
    out = {}
    if not path.exists():
        return out
    keys = ("dim", "n_layers", "n_heads", "vocab_size", "seq_len")
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if (
            r.get("status") != "ok"
            or r.get("peak_rss_delta_bytes") is None
            or r.get("malloc_mmap_threshold") != bench_scaleout.MMAP_THRESHOLD
            or any(r.get("model", {}).get(k) != spec[k] for k in keys)
            or r.get("global_batch") != spec["batch"]
        ):
            continue
        strategy = SCALEOUT_TO_PLANNER.get(r["method"], r["method"])
        if strategy not in PLANNER_STRATEGIES:
            continue  # a bench variant the planner has no strategy for (fsdp-submodule with prefetch)
        key = (strategy, r.get("optimizer", "adamw"), r.get("quant"))
        out.setdefault(key, {})[r["rank"]] = (r["peak_rss_delta_bytes"], r.get("run_id"))
    return {k: {rank: v[0] for rank, v in ranks.items()} for k, ranks in out.items()}


def run(cfg: common.Config) -> common.FamilyResult:
    spec = bench_scaleout.QUICK if cfg.quick else bench_scaleout.MODEL
    meta = common.run_metadata(cfg)
    t0 = time.perf_counter()
    measured = {} if cfg.quick else measured_scaleout_rows(cfg.results_dir / "scaleout.jsonl", spec)
    failures = []
    for quant, strategy, optimizer in QUICK_RUNS if cfg.quick else QUANT_RUNS:
        print(
            f"plan: measuring {strategy}, quant {quant}, {optimizer} on {bench_scaleout.WORLD} gloo ranks",
            file=sys.stderr,
        )
        res = bench_scaleout._launch(strategy, dict(spec, quant=quant), optimizer)
        errs = [r["error"] for r in res if "error" in r]
        if errs:
            failures.append(f"{strategy} quant {quant}: {errs[0].strip().splitlines()[-1][:300]}")
            continue
        measured[(strategy, optimizer, quant)] = {r["rank"]: r["peak_rss_delta_bytes"] for r in res}
    rows = []
    for (strategy, optimizer, quant), ranks in sorted(measured.items(), key=lambda kv: str(kv[0])):
        est = estimates(spec, strategy, optimizer, quant)
        for rank, peak in sorted(ranks.items()):
            ratio = est[rank] / peak if peak else None
            row = {
                **meta,
                "family": FAMILY,
                "method": strategy,
                "quant": quant,
                "optimizer": optimizer,
                "rank": rank,
                "case": f"TransformerLM {spec['dim']}x{spec['n_layers']}, {bench_scaleout.WORLD} ranks",
                "accelops": True,
                "threads": 1,
                "model": {k: spec[k] for k in ("dim", "n_layers", "n_heads", "vocab_size", "seq_len")},
                "estimate_bytes": int(est[rank]),
                "measured_bytes": peak,
                "ratio": ratio,
                "within_tolerance": ratio is not None and abs(ratio - 1) <= TOLERANCE,
                "tolerance": TOLERANCE,
                "status": "ok",
            }
            common.append_row(cfg.results_file(FAMILY), row)
            rows.append(row)
    return common.FamilyResult(FAMILY, summarize(rows, spec, time.perf_counter() - t0), rows, failures)


def summarize(rows, spec, wall_s) -> str:
    lines = [
        f"## Memory planner vs measured peak RSS growth, {bench_scaleout.WORLD} gloo ranks",
        "",
        f"TransformerLM dim {spec['dim']}, {spec['n_layers']} blocks, batch {spec['batch']} x {spec['seq_len']} "
        f"({spec['batch'] // bench_scaleout.WORLD} a rank; pipeline {spec['micro']} micro-batches, 1F1B). Wall "
        f"{wall_s:.0f} s."
        + (
            " --quick: a tiny model, where the fixed runtime term (40 MiB) is most of the "
            "estimate and its spread decides the ratio."
            if spec is bench_scaleout.QUICK
            else ""
        ),
        "",
        "| quant | optimizer | strategy | estimate (MiB) r0, r1 | measured (MiB) r0, r1 | estimate / measured "
        "r0, r1 | within 15% |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in rows:
        by.setdefault((r["quant"], r["optimizer"], r["method"]), []).append(r)
    order = {s: i for i, s in enumerate(PLANNER_STRATEGIES)}
    for (q, opt, s), rs in sorted(by.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], order.get(kv[0][2], 9))):
        rs.sort(key=lambda r: r["rank"])
        mib = ", ".join(f"{r['estimate_bytes'] / 2**20:.0f}" for r in rs)
        meas = ", ".join(f"{r['measured_bytes'] / 2**20:.0f}" for r in rs)
        ratio = ", ".join(f"{r['ratio']:.2f}" for r in rs)
        ok = "yes" if all(r["within_tolerance"] for r in rs) else "NO"
        lines.append(f"| {q} | {opt} | {s} | {mib} | {meas} | {ratio} | {ok} |")
    n_ok = sum(r["within_tolerance"] for r in rows)
    lines += ["", f"{n_ok} of {len(rows)} rank estimates within {TOLERANCE:.0%} of the measured peak."]
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
