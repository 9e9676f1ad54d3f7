"""accelops.results: every benchmark measurement in one embedded DuckDB database.

    from accelops.results import ResultsDB
    db = ResultsDB()                              # bench/results/accelops.duckdb or $ACCELOPS_RESULTS_DB
    db.write_rows(rows)                           # bench rows; bench/common.py does this for every run
    cols, rows = db.query("SELECT family, op, median_us FROM results WHERE is_accelops")
    db.export_parquet("exports/")                 # partitioned by machine fingerprint and date

Tables: `runs` (one per bench run: time, commit, dirty flag, machine fingerprint and
description, versions, environment), `measurements` (one per bench row: family, op,
method, backend, threads, configuration as typed columns and JSON, median/p20/p80/min,
repeats, peak memory, bytes moved, paired baseline and ratio, everything else in
`extra`). Views: `results` (measurements with their run), `ratios` (each accelops
measurement against every baseline of the same run, case and thread count).
DuckDB is imported on first use, not by `import accelops`.
"""

from .db import (
    DEFAULT_PATH,
    SCHEMA_VERSION,
    DatabaseLocked,
    DatabaseWriteError,
    ResultsDB,
    SchemaError,
    default_path,
    migrate,
)
from .machine import fingerprint, machine_info

__all__ = [
    "DEFAULT_PATH",
    "SCHEMA_VERSION",
    "DatabaseLocked",
    "DatabaseWriteError",
    "ResultsDB",
    "SchemaError",
    "default_path",
    "fingerprint",
    "machine_info",
    "migrate",
]
