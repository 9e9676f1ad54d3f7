"""`accelops results import | query | export`."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .db import DEFAULT_PATH, ENV_PATH, ResultsDB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None,
                        help=f"database file (default ${ENV_PATH} or {DEFAULT_PATH})")
    parser.add_argument("--lock-timeout", type=float, default=60.0,
                        help="seconds to wait for a database another process is writing (default 60)")
    sub = parser.add_subparsers(dest="results_command", required=True)
    imp = sub.add_parser("import", help="import bench/results/*.jsonl (or a Parquet export) into the database; "
                                        "runs already there are skipped")
    imp.add_argument("paths", nargs="*", help="JSON-lines files (default: every <family>.jsonl next to the database)")
    imp.add_argument("--parquet", default=None, metavar="DIR", help="merge an `export --parquet` directory instead")
    q = sub.add_parser("query", help="run SQL on the tables runs, measurements and the views results, ratios")
    q.add_argument("sql")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    exp = sub.add_parser("export", help="write Parquet partitioned by machine fingerprint and date")
    exp.add_argument("--parquet", required=True, metavar="DIR")


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
    db = ResultsDB(args.db, lock_timeout=args.lock_timeout)
    if args.results_command == "import":
        if args.parquet:
            stored = db.import_parquet(args.parquet)
            print(f"{db.path}: {stored['runs']} runs, {stored['measurements']} measurements merged from "
                  f"{args.parquet}", file=out)
            return 0
        paths = [Path(p) for p in args.paths] or sorted(p for p in db.path.parent.glob("*.jsonl")
                                                       if not p.stem.endswith("_quick"))
        if not paths:
            print(f"no *.jsonl files in {db.path.parent}", file=sys.stderr)
            return 1
        stored = db.import_jsonl(paths)
        for w in stored["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{db.path}: imported {stored['runs']} runs, {stored['measurements']} measurements from "
              f"{len(paths)} files ({stored['skipped']} run/family groups already there)", file=out)
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
