"""accelops.results: nothing lost, nothing silently wrong (issue 23, items 5, 6 and 10).

- the regression check is not fooled by NaN: a non-finite history point is left out with a
  note, a non-finite new measurement fails the check; bench rows refuse NaN when written;
- an import refuses a row whose field its column cannot hold (a bad date, an integer beyond
  64 bits, a median of "fast") with file, line and field, and stores nothing of it;
- a full disk is reported as such (for real on a small tmpfs where the machine lets us
  mount one, and simulated everywhere), and a database file deleted during an import is
  reported instead of a success."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

duckdb = pytest.importorskip("duckdb")

from accelops.cli import main  # noqa: E402
from accelops.results import DatabaseWriteError, ResultsDB  # noqa: E402
from accelops.results import db as results_db  # noqa: E402

from .test_results import STABLE, bench_row, history_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    # json.dumps writes NaN as the bench did before it refused it (hpo.jsonl still holds some)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- item 6: NaN


def test_check_leaves_out_a_nan_history_point_and_fails_on_a_nan_new_median(tmp_path, capsys):
    # a 3x slow-down against a history whose oldest point has p80 NaN: max() of the band
    # was NaN, every comparison false, and the check passed
    rows = history_rows(STABLE, new=(300.0, 290.0, 310.0))
    rows[0]["p80_us"] = float("nan")
    db = str(tmp_path / "a.duckdb")
    ResultsDB(db).import_jsonl([write_jsonl(tmp_path / "matmul.jsonl", rows)])
    assert main(["report", "--db", db, "--check", "--no-html"]) == 1
    out = capsys.readouterr().out
    assert "regression: matmul label ternary" in out
    assert "note: matmul label ternary" in out and "history run h1 (commit commit00) left out: p80_us = nan" in out
    assert "1 regressions" in out and "1 history points left out" in out

    # the same slow-down measured as a NaN median: the check fails and names the benchmark
    rows = history_rows(STABLE, new=(float("nan"), 290.0, 310.0))
    db = str(tmp_path / "b.duckdb")
    ResultsDB(db).import_jsonl([write_jsonl(tmp_path / "matmul_b.jsonl", rows)])
    assert main(["report", "--db", db, "--check", "--no-html"]) == 1
    out = capsys.readouterr().out
    assert "invalid: matmul label ternary [" in out and "newest run h6 (commit commit05) has median_us = nan" in out
    assert "0 regressions, 1 invalid" in out
    # an infinite one as well (-inf used to be dropped by `median_us > 0`, judging the run before)
    rows = history_rows(STABLE, new=(float("-inf"), 290.0, 310.0))
    db = str(tmp_path / "c.duckdb")
    ResultsDB(db).import_jsonl([write_jsonl(tmp_path / "matmul_c.jsonl", rows)])
    assert main(["report", "--db", db, "--check", "--no-html"]) == 1
    assert "has median_us = -inf" in capsys.readouterr().out


def _bench_common():
    spec = importlib.util.spec_from_file_location("accelops_bench_common_under_test", ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_rows_refuse_nan_and_infinity_when_written(tmp_path):
    common = _bench_common()
    path = tmp_path / "matmul.jsonl"
    with pytest.raises(
        ValueError,
        match=r"matmul\.jsonl: matmul row \(label ternary\) not written: NaN or "
        r"infinite value in median_us; write null with the reason instead",
    ):
        common.append_row(path, dict(bench_row(), median_us=float("nan")))
    with pytest.raises(ValueError, match=r"value in p80_us, curve\.median\[1\];"):
        common.append_row(path, dict(bench_row(), curve={"median": [1.0, float("inf")]}, p80_us=float("-inf")))
    assert not path.exists()  # nothing half-written
    # undefined on purpose: null, with the reason beside it (bench_hpo's regret curves)
    common.append_row(path, dict(bench_row(), curve={"median": [None, 1.0], "null": "no evaluation yet"}))
    assert json.loads(path.read_text())["curve"]["median"] == [None, 1.0]


# --------------------------------------------------------------------------- item 10: bad fields


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("date", "yesterday", "expected an ISO-8601 time"),
        ("peak_mem_bytes", 2**70, "out of the column's range"),
        ("median_us", "fast", "expected a number, got 'fast'"),
        ("M", 1.5, "expected an integer, got 1.5"),
        ("quick", "false", "expected true or false"),
    ],
)
def test_import_refuses_a_bad_field_with_file_line_and_field_and_stores_nothing(tmp_path, field, value, reason):
    db = ResultsDB(tmp_path / "r.duckdb")
    db.write_rows([bench_row("before")])
    # line 3 is bad; lines 1 and 2 (another run) are good, and must not land either
    bad = dict(bench_row("r2", M=32), **{field: value})
    path = write_jsonl(tmp_path / "bad.jsonl", [bench_row("r1"), bench_row("r2"), bad])
    with pytest.raises(ValueError) as info:
        db.import_jsonl([path])
    message = str(info.value)
    assert message.startswith(f"{path}:3: field '{field}': ") and reason in message, message
    assert db.query("SELECT run_id, count(*) FROM measurements GROUP BY 1")[1] == [("before", 1)]
    assert db.query("SELECT run_id FROM runs")[1] == [("before",)]


# --------------------------------------------------------------------------- item 5: disk full, file deleted


def big_rows(n_runs=30, per_run=50):
    """~3 MB of rows: more than the small disk has left."""
    return [bench_row(f"big{i}", M=j + 1, note="x" * 2000) for i in range(n_runs) for j in range(per_run)]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, unmounted afterwards (needs root: CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root (the simulated test runs)")
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (the simulated test runs): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_is_reported_with_its_cause_and_the_stored_runs_are_safe(tmp_path, small_disk, capsys):
    db_path = small_disk / "r.duckdb"
    db = ResultsDB(db_path)
    db.write_rows([bench_row("before")])
    history = write_jsonl(tmp_path / "matmul.jsonl", big_rows())
    assert main(["results", "--db", str(db_path), "import", str(history)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the runs stored before are safe" in err, err
    assert "cannot rollback" not in err
    with pytest.raises(DatabaseWriteError, match="the disk is full"):
        db.import_jsonl([history])
    # nothing of the import landed, the earlier run is intact, and with space it goes in
    assert db.query("SELECT run_id, count(*) FROM measurements GROUP BY 1")[1] == [("before", 1)]
    copy = tmp_path / "r.duckdb"
    shutil.copy(db_path, copy)
    if db_path.with_name("r.duckdb.wal").exists():
        shutil.copy(db_path.with_name("r.duckdb.wal"), tmp_path / "r.duckdb.wal")
    assert ResultsDB(copy).import_jsonl([history])["measurements"] == len(big_rows())


class FullDiskOnCommit:
    """A DuckDB connection whose COMMIT fails as DuckDB's does when the disk is full: the
    transaction is ended (rolled back) and a TransactionException carries ENOSPC's text."""

    def __init__(self, con):
        self._con = con

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self._con.execute("ROLLBACK")
            raise duckdb.TransactionException(
                'TransactionContext Error: Failed to commit: Could not write file "r.duckdb.wal": ' + os.strerror(28)
            )  # ENOSPC
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_a_full_disk_at_commit_is_reported_not_the_failed_rollback_simulated(tmp_path, monkeypatch, capsys):
    db_path = tmp_path / "r.duckdb"
    ResultsDB(db_path).write_rows([bench_row("before")])  # created and migrated: no COMMIT of its own later
    real_connect = results_db.connect
    monkeypatch.setattr(results_db, "connect", lambda *a, **kw: FullDiskOnCommit(real_connect(*a, **kw)))
    history = write_jsonl(tmp_path / "matmul.jsonl", [bench_row("r1")])
    assert main(["results", "--db", str(db_path), "import", str(history)]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "No space left on device" in err and "cannot rollback" not in err
    monkeypatch.undo()
    assert ResultsDB(db_path).query("SELECT run_id FROM measurements")[1] == [("before",)]


def test_a_database_deleted_during_an_import_is_reported_not_a_success(tmp_path, monkeypatch, capsys):
    db_path = tmp_path / "r.duckdb"
    ResultsDB(db_path).write_rows([bench_row("before")])
    real_insert = ResultsDB._insert

    def insert_then_delete(con, table, records):
        real_insert(con, table, records)
        if db_path.exists():
            db_path.unlink()  # e.g. a clean-up script, or `rm bench/results/*.duckdb` in another shell

    monkeypatch.setattr(ResultsDB, "_insert", staticmethod(insert_then_delete))
    history = write_jsonl(tmp_path / "matmul.jsonl", [bench_row("r1")])
    assert main(["results", "--db", str(db_path), "import", str(history)]) == 1
    err = capsys.readouterr().err
    assert f"results database {db_path} was deleted while this write was running" in err and "lost" in err
    assert "imported" not in capsys.readouterr().out
    # replaced by another file during the write: reported too
    monkeypatch.setattr(ResultsDB, "_insert", staticmethod(real_insert))
    ResultsDB(db_path).write_rows([bench_row("again")])

    def insert_then_replace(con, table, records):
        real_insert(con, table, records)
        if table == "measurements":
            other = tmp_path / "other.duckdb"
            other.write_bytes(db_path.read_bytes())
            os.replace(other, db_path)

    monkeypatch.setattr(ResultsDB, "_insert", staticmethod(insert_then_replace))
    with pytest.raises(DatabaseWriteError, match="was replaced by another file while this write was running"):
        ResultsDB(db_path).write_rows([bench_row("r2")])
