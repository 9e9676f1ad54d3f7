"""`accelops results import | query | export | serve`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .db import DEFAULT_PATH, ENV_PATH, DatabaseWriteError, ResultsDB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help=f"database file (default ${ENV_PATH} or {DEFAULT_PATH})")
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a database another process is writing (default 60)",
    )
    sub = parser.add_subparsers(dest="results_command", required=True)
    imp = sub.add_parser(
        "import",
        help="import bench/results/*.jsonl (or a Parquet export) into the database; runs already there are skipped",
    )
    imp.add_argument("paths", nargs="*", help="JSON-lines files (default: every <family>.jsonl next to the database)")
    imp.add_argument("--parquet", default=None, metavar="DIR", help="merge an `export --parquet` directory instead")
    q = sub.add_parser("query", help="run SQL on the tables runs, measurements and the views results, ratios")
    q.add_argument("sql")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    exp = sub.add_parser("export", help="write Parquet partitioned by machine fingerprint and date")
    exp.add_argument("--parquet", required=True, metavar="DIR")
    srv = sub.add_parser(
        "serve",
        help="a local web page and REST API over the database (read-only; needs fastapi, uvicorn, plotly)",
    )
    # --db here as well as before the subcommand: `accelops results serve --db PATH` reads naturally
    srv.add_argument(
        "--db", dest="serve_db", metavar="PATH", default=None, help="database file (as `accelops results --db`)"
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    srv.add_argument(
        "--read-timeout",
        type=float,
        default=5.0,
        help="seconds a request waits for a database a bench is writing before answering 503 (default 5)",
    )


def _print_table(columns, rows, out) -> None:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), file=out)
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", file=out)


def run_args(args, out=None) -> int:
    out = out or sys.stdout
    if args.results_command == "serve":
        return run_serve(args, out)
    db = ResultsDB(args.db, lock_timeout=args.lock_timeout)
    if args.results_command == "import":
        if args.parquet:
            stored = db.import_parquet(args.parquet)
            print(
                f"{db.path}: {stored['runs']} runs, {stored['measurements']} measurements merged from {args.parquet}",
                file=out,
            )
            return 0
        paths = [Path(p) for p in args.paths] or sorted(
            p for p in db.path.parent.glob("*.jsonl") if not p.stem.endswith("_quick")
        )
        if not paths:
            print(f"no *.jsonl files in {db.path.parent}", file=sys.stderr)
            return 1
        try:
            stored = db.import_jsonl(paths)
        except DatabaseWriteError as exc:  # a full disk, a file deleted meanwhile: the message is the story
            print(f"accelops results import: error: {exc}", file=sys.stderr)
            return 1
        for w in stored["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        print(
            f"{db.path}: imported {stored['runs']} runs, {stored['measurements']} measurements from "
            f"{len(paths)} files ({stored['skipped']} run/family groups already there)",
            file=out,
        )
        return 0
    if args.results_command == "query":
        columns, rows = db.query(args.sql)
        if args.format == "json":
            for row in rows:
                print(json.dumps(dict(zip(columns, row)), default=str), file=out)
        elif args.format == "csv":
            writer = csv.writer(out)
            writer.writerow(columns)
            writer.writerows(rows)
        else:
            _print_table(columns, rows, out)
        return 0
    if args.results_command == "export":
        files = db.export_parquet(args.parquet)
        print(f"{len(files)} Parquet files under {args.parquet}", file=out)
        return 0
    raise AssertionError(args.results_command)


SERVE_EXTRA = "pip install fastapi uvicorn plotly  (or: pip install 'accelops[serve]')"


def run_serve(args, out) -> int:
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"serve: --port must be in 0..65535, got {args.port}")
    if not 0 <= args.read_timeout <= 3600:
        raise SystemExit(f"serve: --read-timeout must be in [0, 3600] s, got {args.read_timeout}")
    try:
        import fastapi  # noqa: F401
        import plotly  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"accelops results serve needs {exc.name}: {SERVE_EXTRA}") from exc
    from .db import default_path
    from .serve import serve

    path = args.serve_db or args.db or default_path()
    return serve(path, host=args.host, port=args.port, lock_timeout=args.read_timeout, out=out)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help=f"database file (default ${ENV_PATH} or {DEFAULT_PATH})")
    parser.add_argument(
        "--out", default=None, help="directory of index.html and its PNGs (default: report/ beside the database)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the newest run of any benchmark is a regression, or has a NaN or infinite time (for CI)",
    )
    parser.add_argument("--no-html", action="store_true", help="with --check: only judge, write no page")
    parser.add_argument("--window", type=int, default=5, help="previous runs a new run is judged against (default 5)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.10,
        help="how far beyond the history's p20-p80 band a median must be (default 0.10)",
    )
    parser.add_argument("--lock-timeout", type=float, default=60.0)


def run_report(args, out=None) -> int:
    from .regress import check

    out = out or sys.stdout
    if args.window < 1 or not 0 <= args.threshold < 10:
        raise SystemExit("accelops report: --window must be >= 1 and --threshold in [0, 10)")
    db = ResultsDB(args.db, lock_timeout=args.lock_timeout)
    if args.no_html:
        verdicts = check(db, window=args.window, threshold=args.threshold)
    else:
        from .report import write_report

        written = write_report(db, args.out or db.path.parent / "report", window=args.window, threshold=args.threshold)
        verdicts = written["verdicts"]
        print(f"report written to {written['html']} ({len(written['pngs'])} plots)", file=out)
    regressions = [v for v in verdicts if v.kind == "regression"]
    # a newest run with a NaN or infinite time cannot be judged: it fails the check too,
    # since a broken measurement would otherwise hide any slow-down
    invalid = [v for v in verdicts if v.kind == "invalid"]
    for v in verdicts:
        if v.kind in ("regression", "invalid", "improvement"):
            print(v.describe(), file=out)
    for v in verdicts:
        for note in v.notes:
            print(f"note: {v.case}: {note}", file=out)
    left_out = sum(len(v.notes) for v in verdicts)
    print(
        f"{len(verdicts)} benchmarks checked: {len(regressions)} regressions, {len(invalid)} invalid (NaN or "
        f"infinite time in the newest run), {sum(v.kind == 'improvement' for v in verdicts)} improvements, "
        f"{sum(v.kind == 'too little history' for v in verdicts)} with too little history"
        + (f"; {left_out} history points left out (NaN or infinite times)" if left_out else ""),
        file=out,
    )
    return 1 if (args.check and (regressions or invalid)) else 0
