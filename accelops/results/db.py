"""The results database: one embedded DuckDB file for every benchmark accelops runs.

Why it is safe to share:
- DuckDB lets one process at a time open a database file for writing. A writer here
  holds the file only for the one transaction that stores a run, and waits for a busy
  file (retrying until `lock_timeout`, then `DatabaseLocked` naming the file and the
  holder), so two bench processes writing at once both land.
- A run is stored in a single transaction: a writer killed half-way leaves no partial
  run, and the runs stored before stay readable (DuckDB's write-ahead log is replayed or
  discarded on the next open).
- The schema carries its version (table `schema_info`); opening an older database
  migrates it forward in one transaction, a newer one is refused rather than misread.
- Every row is checked against its columns' types before the transaction starts: a field
  a column cannot hold is refused with its file, line and name, and nothing is written.
- A write that fails (a full disk) raises its cause, not the failed ROLLBACK after it; a
  database file deleted or replaced while a write ran is reported, not a success.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from pathlib import Path

from .rows import check_row, measurement_record, pair_baselines, run_record

SCHEMA_VERSION = 3
# In a checkout (an editable install) the database sits beside the bench's JSON lines; an
# installed package has no bench/ beside it and uses ./bench/results under the working directory.
_CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = (_CHECKOUT if (_CHECKOUT / "bench").is_dir() else Path.cwd()) / "bench" / "results" / "accelops.duckdb"
ENV_PATH = "ACCELOPS_RESULTS_DB"


class DatabaseLocked(RuntimeError):
    """Another process holds the database file for longer than the lock timeout."""


class SchemaError(RuntimeError):
    """The database file is not one this version of accelops can read."""


class DatabaseWriteError(RuntimeError):
    """A write did not land: the disk is full, or the file was deleted during it. The
    message says what was kept and what was lost."""


# DuckDB reports a full disk as the C library's text for ENOSPC inside its own error (an
# IOException, or a TransactionException when the commit's log write fails).
_DISK_FULL = os.strerror(errno.ENOSPC)


def _is_disk_full(exc: BaseException) -> bool:
    return _DISK_FULL.lower() in str(exc).lower()


def _disk_full_error(path: Path, exc: BaseException) -> DatabaseWriteError:
    detail = " ".join(str(exc).split())
    return DatabaseWriteError(
        f"results database {path}: the disk is full ({detail}). Nothing of this write was stored (DuckDB rolled "
        f"it back) and the runs stored before are safe. Free space on {path.parent} and repeat it: the bench's "
        f"JSON lines still hold every row (`accelops results import`)."
    )


def _rollback_quietly(con) -> None:
    """ROLLBACK after a failure, never hiding it: a failed COMMIT has already ended the
    transaction, and the ROLLBACK then fails with 'no transaction is active'."""
    import duckdb

    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


RUN_COLUMNS = (
    ("run_id", "VARCHAR PRIMARY KEY"),
    ("started", "TIMESTAMP"),
    ("git_commit", "VARCHAR"),
    ("git_dirty", "BOOLEAN"),
    ("machine_fingerprint", "VARCHAR"),
    ("cpu_model", "VARCHAR"),
    ("cpu_count", "INTEGER"),
    ("cpu_features", "VARCHAR[]"),
    ("cpu_isa", "VARCHAR"),
    ("memory_bytes", "BIGINT"),
    ("gpu_name", "VARCHAR"),
    ("gpu_driver", "VARCHAR"),
    ("platform", "VARCHAR"),
    ("device", "VARCHAR"),
    ("accelops_version", "VARCHAR"),
    ("torch_version", "VARCHAR"),
    ("triton_version", "VARCHAR"),
    ("python_version", "VARCHAR"),
    ("versions", "JSON"),
    ("quick", "BOOLEAN"),
    ("env", "JSON"),
    ("source", "VARCHAR"),
)
# Version 1 measurements; version 2 added what the op moves and its paired baseline.
MEASUREMENT_COLUMNS_V1 = (
    ("run_id", "VARCHAR NOT NULL"),
    ("family", "VARCHAR NOT NULL"),
    ("seq", "INTEGER NOT NULL"),
    ("op", "VARCHAR"),
    ("method", "VARCHAR"),
    ("label", "VARCHAR"),
    ("backend", "VARCHAR"),
    ("is_accelops", "BOOLEAN"),
    ("status", "VARCHAR"),
    ("threads", "INTEGER"),
    ("device", "VARCHAR"),
    ("dtype", "VARCHAR"),
    ("m", "BIGINT"),
    ("n", "BIGINT"),
    ("k", "BIGINT"),
    ("shape", "VARCHAR"),
    ("config", "JSON"),
    ("config_key", "VARCHAR"),
    ("median_us", "DOUBLE"),
    ("p20_us", "DOUBLE"),
    ("p80_us", "DOUBLE"),
    ("min_us", "DOUBLE"),
    ("repeats", "INTEGER"),
    ("peak_mem_bytes", "BIGINT"),
    ("loadavg_1m", "DOUBLE"),
    ("extra", "JSON"),
)
MEASUREMENT_COLUMNS_V2 = (
    ("bytes_moved", "BIGINT"),
    ("baseline_label", "VARCHAR"),
    ("baseline_median_us", "DOUBLE"),
    ("ratio", "DOUBLE"),
)
MEASUREMENT_COLUMNS = MEASUREMENT_COLUMNS_V1 + MEASUREMENT_COLUMNS_V2


def _columns_sql(columns) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns)


VIEWS = [
    # every measurement beside its run's machine and versions
    """CREATE OR REPLACE VIEW results AS
       SELECT r.started, r.git_commit, r.git_dirty, r.machine_fingerprint, r.cpu_model, r.cpu_count, r.gpu_name,
              r.torch_version, r.triton_version, r.accelops_version, r.quick, m.*
       FROM measurements m JOIN runs r USING (run_id)""",
    # each accelops measurement against every other row of the same run, op, case and threads
    """CREATE OR REPLACE VIEW ratios AS
       SELECT a.run_id, a.family, a.op, a.method, a.label, a.threads, a.config, a.median_us,
              b.method AS baseline_method, b.label AS baseline_label, b.median_us AS baseline_median_us,
              b.median_us / a.median_us AS speedup
       FROM measurements a JOIN measurements b
         ON a.run_id = b.run_id AND a.family = b.family AND a.config_key = b.config_key
        AND (a.op IS NOT DISTINCT FROM b.op OR a.op = a.method OR b.op = b.method)
        AND a.threads IS NOT DISTINCT FROM b.threads AND a.seq <> b.seq
       WHERE a.is_accelops AND NOT coalesce(b.is_accelops, false)
         AND a.median_us > 0 AND b.median_us > 0""",
]

# Migration n takes a version n-1 database (0: empty) to version n.
MIGRATIONS = {
    1: [
        "CREATE TABLE schema_info (key VARCHAR PRIMARY KEY, value VARCHAR)",
        f"CREATE TABLE runs ({_columns_sql(RUN_COLUMNS)})",
        f"CREATE TABLE measurements ({_columns_sql(MEASUREMENT_COLUMNS_V1)}, PRIMARY KEY (run_id, family, seq))",
    ],
    2: [f"ALTER TABLE measurements ADD COLUMN {name} {kind}" for name, kind in MEASUREMENT_COLUMNS_V2] + VIEWS,
    # 3: the ratios view pairs rows of the same op only where both rows name one (op is
    # stored as the method when a row has none): the dispatch family measures two ops on the
    # same shapes, and version 2 paired one op's tuned row with the other's default
    3: VIEWS,
}


def default_path() -> Path:
    return Path(os.environ.get(ENV_PATH) or DEFAULT_PATH)


def _is_lock_error(exc: Exception) -> bool:
    return "lock" in str(exc).lower()


def _holder(exc: Exception) -> str:
    m = re.search(r"PID (\d+)", str(exc))
    return f"process {m.group(1)}" if m else "another process"


def connect(path, read_only: bool = False, lock_timeout: float = 60.0):
    """A DuckDB connection to `path`, waiting up to lock_timeout seconds for a busy file."""
    import duckdb

    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(
            f"results database {path} does not exist (run a benchmark or `accelops results import` first)"
        )
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_timeout
    delay = 0.01
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if _is_disk_full(exc):
                raise _disk_full_error(path, exc) from exc
            if not _is_lock_error(exc):
                raise SchemaError(f"results database {path} cannot be opened: {exc}") from exc
            if time.monotonic() >= deadline:
                raise DatabaseLocked(
                    f"results database {path} is held by {_holder(exc)} for more than {lock_timeout:g} s "
                    f"(a bench run still writing?); retry when it is done or raise lock_timeout"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except duckdb.Error as exc:
            raise SchemaError(f"results database {path} cannot be opened: {exc}") from exc


def schema_version(con) -> int:
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "schema_info" not in tables:
        if tables & {"runs", "measurements"}:
            raise SchemaError("database has results tables but no schema_info: not an accelops results database")
        return 0
    row = con.execute("SELECT value FROM schema_info WHERE key = 'version'").fetchone()
    return int(row[0]) if row else 0


def migrate(con, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema to `target` in one transaction -> the version found before."""
    found = schema_version(con)
    if found > SCHEMA_VERSION:
        raise SchemaError(
            f"results database has schema version {found}, newer than this accelops "
            f"understands ({SCHEMA_VERSION}); upgrade accelops to read it"
        )
    if found >= target:
        return found
    con.execute("BEGIN TRANSACTION")
    try:
        for version in range(found + 1, target + 1):
            for statement in MIGRATIONS[version]:
                con.execute(statement)
        con.execute("INSERT OR REPLACE INTO schema_info VALUES ('version', ?)", [str(target)])
        con.execute("COMMIT")
    except BaseException:
        _rollback_quietly(con)
        raise
    return found


class ResultsDB:
    """The results database at `path` (default bench/results/accelops.duckdb, or
    $ACCELOPS_RESULTS_DB). Each method opens the file for as long as it needs it."""

    def __init__(self, path=None, lock_timeout: float = 60.0):
        self.path = Path(path) if path is not None else default_path()
        self.lock_timeout = lock_timeout

    def _write_connection(self):
        con = connect(self.path, read_only=False, lock_timeout=self.lock_timeout)
        try:
            migrate(con)
        except BaseException as exc:
            con.close()
            if isinstance(exc, Exception) and _is_disk_full(exc):
                raise _disk_full_error(self.path, exc) from exc
            raise
        return con

    @contextlib.contextmanager
    def _transaction(self):
        """A write connection inside one transaction: committed when the block ends,
        rolled back when it raises; the file is released either way. Raises
        DatabaseWriteError when the disk is full or the file was deleted meanwhile."""
        con = self._write_connection()
        # Our own descriptor of the file keeps its inode allocated (not reused), so comparing
        # it with what the path names once DuckDB is done tells whether the file was deleted
        # or replaced during the write: DuckDB goes on writing into a deleted file and reports
        # success. It is closed after DuckDB's connection, because closing any descriptor of a
        # file drops all of this process's POSIX locks on it, DuckDB's included.
        try:
            held = os.open(self.path, os.O_RDONLY)
        except OSError:
            con.close()
            raise
        try:
            opened = os.fstat(held)
            try:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException as exc:
                    _rollback_quietly(con)
                    if isinstance(exc, Exception) and _is_disk_full(exc):
                        raise _disk_full_error(self.path, exc) from exc
                    raise
                try:
                    con.execute("COMMIT")
                except Exception as exc:
                    _rollback_quietly(con)
                    if _is_disk_full(exc):
                        raise _disk_full_error(self.path, exc) from exc
                    raise
            finally:
                con.close()
            self._check_same_file(held, opened)
        finally:
            os.close(held)

    def _check_same_file(self, held: int, opened: os.stat_result) -> None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        if os.fstat(held).st_nlink == 0 or now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            what = "deleted" if now is None else "replaced by another file"
            raise DatabaseWriteError(
                f"results database {self.path} was {what} while this write was running: what the write stored "
                f"went into the deleted file and is lost. The bench's JSON lines still hold the rows: repeat the "
                f"import (`accelops results import --db {self.path} ...`)."
            )

    def _read_connection(self):
        con = connect(self.path, read_only=True, lock_timeout=self.lock_timeout)
        found = schema_version(con)
        if found != SCHEMA_VERSION:
            con.close()
            if found > SCHEMA_VERSION:
                raise SchemaError(
                    f"results database {self.path} has schema version {found}, newer than this "
                    f"accelops understands ({SCHEMA_VERSION})"
                )
            con = self._write_connection()  # an older file: migrate it first
        return con

    # ------------------------------------------------------------------ writing

    def write_rows(self, rows: list[dict], source: str = "bench", where: list[str] | None = None) -> dict:
        """Store bench rows (each carrying its run's metadata) -> {"runs", "measurements",
        "skipped"}. Rows are grouped by (run id, family); a group already in the database
        is skipped, so writing or importing the same rows twice stores them once. All
        groups go in one transaction. Every row is checked first: a field its column cannot
        hold raises ValueError naming the row (where[i], e.g. "file:line", else its index)
        and the field, and nothing is written."""
        for i, row in enumerate(rows):
            try:
                check_row(row)
            except ValueError as exc:  # rows.RowError included
                label = where[i] if where is not None else f"row {i}"
                raise ValueError(f"{label}: {exc}") from exc
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in rows:
            groups.setdefault((str(row["run_id"]), row["family"]), []).append(row)
        stored = {"runs": 0, "measurements": 0, "skipped": 0}
        if not groups:
            return stored
        with self._transaction() as con:
            for (run_id, family), group in groups.items():
                if con.execute(
                    "SELECT 1 FROM measurements WHERE run_id = ? AND family = ? LIMIT 1", [run_id, family]
                ).fetchone():
                    stored["skipped"] += 1
                    continue
                if not con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
                    self._insert(con, "runs", [run_record(group[0], source)])
                    stored["runs"] += 1
                records = [measurement_record(row, seq) for seq, row in enumerate(group)]
                pair_baselines(records, group)
                self._insert(con, "measurements", records)
                stored["measurements"] += len(records)
        return stored

    @staticmethod
    def _insert(con, table: str, records: list[dict]) -> None:
        names = list(records[0])
        sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
        con.executemany(sql, [[rec[n] for n in names] for rec in records])

    def import_jsonl(self, paths) -> dict:
        """Import bench/results/<family>.jsonl files (the results written before the
        database existed); already imported runs are skipped. A torn last line (a bench
        killed mid-write) is skipped with its file and line in the returned "warnings"; any
        other bad line (not JSON, or a field its column cannot hold: a bad date, "fast" as a
        median, an integer beyond 64 bits) refuses the whole import, naming file, line and
        field, and nothing is written."""
        rows, where, warnings = [], [], []
        for path in paths:
            path = Path(path)
            with open(path) as f:
                lines = f.readlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                    where.append(f"{path}:{number}")
                except json.JSONDecodeError as exc:
                    if number == len(lines):
                        warnings.append(f"{path}:{number}: torn last line skipped ({exc.msg})")
                        continue
                    raise ValueError(f"{path}:{number}: not a JSON row ({exc.msg})") from exc
        stored = self.write_rows(rows, source="import", where=where)
        stored["warnings"] = warnings
        return stored

    def import_parquet(self, directory) -> dict:
        """Merge an `export_parquet` directory (e.g. from another machine) into this
        database; runs already present are skipped."""
        directory = Path(directory)
        runs_glob = str(directory / "runs" / "**" / "*.parquet")
        meas_glob = str(directory / "measurements" / "**" / "*.parquet")
        with self._transaction() as con:
            run_cols = ", ".join(n for n, _ in RUN_COLUMNS)
            meas_cols = ", ".join(n for n, _ in MEASUREMENT_COLUMNS)
            con.execute(
                f"CREATE TEMP TABLE new_runs AS SELECT {run_cols} FROM "
                f"read_parquet('{runs_glob}', hive_partitioning = true, union_by_name = true) "
                f"WHERE run_id NOT IN (SELECT run_id FROM runs)"
            )
            n_runs = con.execute("SELECT count(*) FROM new_runs").fetchone()[0]
            con.execute(f"INSERT INTO runs ({run_cols}) SELECT {run_cols} FROM new_runs")
            before = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
            con.execute(
                f"INSERT INTO measurements ({meas_cols}) SELECT {meas_cols} FROM "
                f"read_parquet('{meas_glob}', hive_partitioning = true, union_by_name = true) "
                f"WHERE run_id IN (SELECT run_id FROM new_runs)"
            )
            after = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
            con.execute("DROP TABLE new_runs")
        return {"runs": n_runs, "measurements": after - before}

    # ------------------------------------------------------------------ reading

    def query(self, sql: str, params=None) -> tuple[list[str], list[tuple]]:
        """Run SQL against the tables (runs, measurements) and views (results, ratios)
        -> (column names, rows). The file is opened read-only: a query cannot change it."""
        con = self._read_connection()
        try:
            cur = con.execute(sql, params or [])
            if cur.description is None:
                return [], []
            return [d[0] for d in cur.description], cur.fetchall()
        finally:
            con.close()

    def export_parquet(self, directory) -> list[Path]:
        """Write runs and measurements as Parquet under `directory`, partitioned by machine
        fingerprint and date (hive layout: runs/machine=<fp>/date=<YYYY-MM-DD>/...), so
        results from many machines merge by copying directories and read with
        read_parquet('<dir>/measurements/**/*.parquet', hive_partitioning = true)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        con = self._read_connection()
        try:
            for table, select in (
                ("runs", "SELECT *, machine_fingerprint AS machine, CAST(started AS DATE) AS date FROM runs"),
                (
                    "measurements",
                    "SELECT m.*, r.machine_fingerprint AS machine, CAST(r.started AS DATE) AS date "
                    "FROM measurements m JOIN runs r USING (run_id)",
                ),
            ):
                target = str(directory / table).replace("'", "''")
                con.execute(
                    f"COPY ({select}) TO '{target}' "
                    f"(FORMAT parquet, PARTITION_BY (machine, date), OVERWRITE_OR_IGNORE true)"
                )
        finally:
            con.close()
        return sorted(directory.rglob("*.parquet"))

    def version(self) -> int:
        con = connect(self.path, read_only=True, lock_timeout=self.lock_timeout)
        try:
            return schema_version(con)
        finally:
            con.close()
