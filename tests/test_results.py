"""accelops.results: the benchmark results database (DuckDB).

Round trip of bench rows into typed columns, baseline pairing, idempotent import of the
JSON-lines history, migration from schema version 1, two writers at once, a writer
killed mid-transaction, the lock timeout, Parquet export partitioned by machine and date
and its merge into another database, and the `accelops results` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

duckdb = pytest.importorskip("duckdb")

from accelops.results import SCHEMA_VERSION, DatabaseLocked, ResultsDB, SchemaError, fingerprint, machine_info, migrate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {
    "cpu_model": "AMD EPYC",
    "cpu_count": 2,
    "cpu_affinity": 2,
    "l3_bytes": 33554432,
    "accelops_cpu_isa": "avx2",
    "cpu_features": ["avx2", "fma", "f16c"],
    "gpu": None,
    "platform": "Linux-x86_64",
}


def bench_row(run_id="r1", family="matmul", method="ternary", accelops=True, median=100.0, M=1, **extra):
    row = {
        "run_id": run_id,
        "date": "2026-12-01T10:00:00+00:00",
        "git_commit": "abc123",
        "git_dirty": False,
        "device": "cpu",
        "machine": dict(MACHINE),
        "versions": {"accelops": "0.1.0", "torch": "2.13.0+cpu", "triton": "3.9.0", "python": "3.11.7"},
        "quick": False,
        "env": {},
        "family": family,
        "method": method,
        "label": f"label {method}",
        "accelops": accelops,
        "threads": 2,
        "status": "ok",
        "M": M,
        "N": 4096,
        "K": 4096,
        "x_dtype": "float32",
        "median_us": median,
        "p20_us": median - 10,
        "p80_us": median + 10,
        "min_us": median - 20,
        "repeats": 30,
        "peak_mem_bytes": 4096,
        "check": {"ok": True},
    }
    row.update(extra)
    return row


def matmul_run(run_id, speed=1.0, date="2026-12-01T10:00:00+00:00"):
    rows = []
    for M in (1, 32):
        rows.append(bench_row(run_id, method="ternary", median=100.0 * M / speed, M=M, date=date))
        rows.append(
            bench_row(run_id, method="fp32", accelops=False, label="F.linear fp32", median=400.0 * M, M=M, date=date)
        )
    return rows


def test_round_trip_typed_columns_and_baseline_pairing(tmp_path):
    db = ResultsDB(tmp_path / "r.duckdb")
    stored = db.write_rows(matmul_run("r1"))
    assert stored == {"runs": 1, "measurements": 4, "skipped": 0}
    cols, rows = db.query(
        "SELECT m, n, k, dtype, median_us, p20_us, p80_us, repeats, peak_mem_bytes, backend, "
        "baseline_label, baseline_median_us, ratio, json_extract(extra, '$.check.ok') "
        "FROM measurements WHERE is_accelops ORDER BY m"
    )
    assert rows[0][:10] == (1, 4096, 4096, "float32", 100.0, 90.0, 110.0, 30, 4096, "cpu")
    assert rows[0][10:] == ("F.linear fp32", 400.0, 4.0, "true")
    assert rows[1][0] == 32 and rows[1][12] == pytest.approx(4.0)
    _, runs = db.query(
        "SELECT run_id, started, git_commit, git_dirty, machine_fingerprint, cpu_features, "
        "torch_version, cpu_count FROM runs"
    )
    assert runs[0][0] == "r1" and str(runs[0][1]) == "2026-12-01 10:00:00" and runs[0][2:4] == ("abc123", False)
    assert runs[0][4] == fingerprint(MACHINE) and runs[0][5] == ["avx2", "fma", "f16c"]
    assert runs[0][6:] == ("2.13.0+cpu", 2)
    # the ratios view pairs each accelops row with every baseline of its case
    _, ratios = db.query("SELECT config, baseline_method, speedup FROM ratios ORDER BY config")
    assert [r[2] for r in ratios] == [4.0, 4.0] and {r[1] for r in ratios} == {"fp32"}
    # writing the same run again stores nothing twice
    assert db.write_rows(matmul_run("r1")) == {"runs": 0, "measurements": 0, "skipped": 1}
    assert db.query("SELECT count(*) FROM measurements")[1] == [(4,)]
    # a second family of the same run joins the run
    assert (
        db.write_rows(
            [bench_row("r1", family="comm", method="kernel:x", op="x", speedup_vs_reference=3.0, case="c", bytes=1000)]
        )["runs"]
        == 0
    )
    assert db.query(
        "SELECT baseline_label, baseline_median_us, ratio, bytes_moved FROM measurements WHERE family = 'comm'"
    )[1] == [("reference", 300.0, 3.0, 1000)]


def test_rows_without_identity_are_refused(tmp_path):
    with pytest.raises(ValueError, match="run_id/family"):
        ResultsDB(tmp_path / "r.duckdb").write_rows([{"family": "matmul"}])


def test_import_of_the_repository_history_is_idempotent(tmp_path):
    files = sorted(p for p in (ROOT / "bench" / "results").glob("*.jsonl") if not p.stem.endswith("_quick"))
    assert files, "the repository keeps its bench history in bench/results/*.jsonl"
    n_rows = sum(1 for p in files for line in p.read_text().splitlines() if line.strip())
    db = ResultsDB(tmp_path / "r.duckdb")
    first = db.import_jsonl(files)
    assert first["measurements"] == n_rows and first["runs"] >= 1 and first["warnings"] == []
    again = db.import_jsonl(files)
    assert again["measurements"] == 0 and again["skipped"] > 0
    _, families = db.query("SELECT DISTINCT family FROM measurements ORDER BY 1")
    assert {f for (f,) in families} >= {"matmul", "comm", "ffn"}
    # every legacy row from this machine kind shares one fingerprint with the fields it recorded
    _, fps = db.query("SELECT DISTINCT machine_fingerprint FROM runs")
    assert all(len(fp) == 16 for (fp,) in fps)


def test_import_skips_a_torn_last_line_and_refuses_damage_elsewhere(tmp_path):
    good = json.dumps(bench_row("r1"))
    torn = tmp_path / "torn.jsonl"
    torn.write_text(good + "\n" + good[: len(good) // 2])
    db = ResultsDB(tmp_path / "r.duckdb")
    stored = db.import_jsonl([torn])
    assert stored["measurements"] == 1 and "torn last line" in stored["warnings"][0]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good[:10] + "\n" + good + "\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not a JSON row"):
        db.import_jsonl([broken])


def test_migration_from_schema_version_1_keeps_the_rows(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, target=1)
    con.execute("INSERT INTO runs (run_id, started, git_commit) VALUES ('old', TIMESTAMP '2026-01-01 00:00:00', 'c0')")
    con.execute(
        "INSERT INTO measurements (run_id, family, seq, op, is_accelops, median_us) "
        "VALUES ('old', 'matmul', 0, 'ternary', true, 5.0)"
    )
    con.close()
    db = ResultsDB(path)
    assert db.version() == 1
    cols, rows = db.query("SELECT run_id, op, median_us, ratio, bytes_moved FROM results")  # migrates on open
    assert rows == [("old", "ternary", 5.0, None, None)]
    assert db.version() == SCHEMA_VERSION
    db.write_rows(matmul_run("new"))
    assert db.query("SELECT count(*) FROM measurements")[1] == [(5,)]


def test_a_newer_schema_or_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "new.duckdb"
    con = duckdb.connect(str(path))
    migrate(con)
    con.execute("UPDATE schema_info SET value = ? WHERE key = 'version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(SchemaError, match="newer than this accelops"):
        ResultsDB(path).write_rows(matmul_run("x"))
    foreign = tmp_path / "foreign.duckdb"
    con = duckdb.connect(str(foreign))
    con.execute("CREATE TABLE runs (x INTEGER)")
    con.close()
    with pytest.raises(SchemaError, match="not an accelops results database"):
        ResultsDB(foreign).write_rows(matmul_run("x"))
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(SchemaError, match="cannot be opened"):
        ResultsDB(garbage).write_rows(matmul_run("x"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResultsDB(tmp_path / "missing.duckdb").query("SELECT 1")


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_results import matmul_run
    from accelops.results import ResultsDB
    db = ResultsDB({path!r}, lock_timeout=60)
    for i in range({n}):
        db.write_rows(matmul_run(f"{{sys.argv[1]}}-{{i}}"))
""")


def test_two_writers_at_once_both_land(tmp_path):
    path = tmp_path / "shared.duckdb"
    script = WRITER.format(tests=str(ROOT / "tests"), path=str(path), n=12)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, name], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _, rows = ResultsDB(path).query("SELECT count(DISTINCT run_id), count(*) FROM measurements")
    assert rows == [(24, 96)]


HOLDER = textwrap.dedent("""
    import sys, time
    from accelops.results import ResultsDB
    from accelops.results.db import connect
    con = connect({path!r})
    print("holding", flush=True)
    time.sleep(60)
""")


def test_a_held_database_times_out_with_a_clear_error(tmp_path):
    path = tmp_path / "held.duckdb"
    ResultsDB(path).write_rows(matmul_run("first"))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(path=str(path))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        with pytest.raises(DatabaseLocked, match=r"held\.duckdb is held by process \d+ for more than 0\.5 s"):
            ResultsDB(path, lock_timeout=0.5).write_rows(matmul_run("second"))
        assert time.monotonic() - start < 30
    finally:
        holder.kill()
        holder.wait()
    ResultsDB(path).write_rows(matmul_run("second"))  # free again: it lands
    assert ResultsDB(path).query("SELECT count(DISTINCT run_id) FROM runs")[1] == [(2,)]


KILLED = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_results import matmul_run
    from accelops.results import ResultsDB
    db = ResultsDB({path!r})
    original = ResultsDB._insert
    def insert_then_stall(con, table, records):
        original(con, table, records)
        if table == "measurements":       # the run's rows are in, its transaction not committed
            print("mid-write", flush=True)
            time.sleep(60)
    ResultsDB._insert = staticmethod(insert_then_stall)
    db.write_rows(matmul_run("doomed") * 500)
""")


def test_a_writer_killed_mid_run_leaves_the_earlier_runs_readable(tmp_path):
    path = tmp_path / "k.duckdb"
    db = ResultsDB(path)
    db.write_rows(matmul_run("kept-1"))
    db.write_rows(matmul_run("kept-2"))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED.format(tests=str(ROOT / "tests"), path=str(path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "mid-write"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    _, rows = db.query("SELECT run_id, count(*) FROM measurements GROUP BY 1 ORDER BY 1")
    assert rows == [("kept-1", 4), ("kept-2", 4)]  # no part of the doomed run
    assert db.query("SELECT count(*) FROM runs WHERE run_id = 'doomed'")[1] == [(0,)]
    db.write_rows(matmul_run("after"))  # and the file takes new runs
    assert db.query("SELECT count(*) FROM runs")[1] == [(3,)]


def test_parquet_export_is_partitioned_and_merges_into_another_database(tmp_path):
    a = ResultsDB(tmp_path / "a.duckdb")
    a.write_rows(matmul_run("day1", date="2026-12-01T10:00:00+00:00"))
    a.write_rows(matmul_run("day2", date="2026-12-02T10:00:00+00:00"))
    other = dict(MACHINE, cpu_model="Intel Xeon", cpu_features=["avx2", "fma", "avx512f"])
    a.write_rows([dict(r, machine=other) for r in matmul_run("xeon")])
    files = a.export_parquet(tmp_path / "export")
    parts = {f.relative_to(tmp_path / "export").parts[:3] for f in files}
    fp = fingerprint(MACHINE)
    assert ("measurements", f"machine={fp}", "date=2026-12-01") in parts
    assert ("runs", f"machine={fp}", "date=2026-12-02") in parts
    assert ("runs", f"machine={fingerprint(other)}", "date=2026-12-01") in parts
    glob = str(tmp_path / "export" / "measurements" / "**" / "*.parquet")
    con = duckdb.connect()
    n, machines = con.execute(
        f"SELECT count(*), count(DISTINCT machine) FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchone()
    assert (n, machines) == (12, 2)
    b = ResultsDB(tmp_path / "b.duckdb")
    b.write_rows(matmul_run("day1"))
    assert b.import_parquet(tmp_path / "export") == {"runs": 2, "measurements": 8}
    assert b.query("SELECT count(*) FROM measurements")[1] == [(12,)]
    assert b.query("SELECT count(*) FROM ratios")[1] == [(6,)]


def test_machine_fingerprint_ignores_memory_and_driver():
    here = machine_info()
    assert here["fingerprint"] == fingerprint(here) and len(here["fingerprint"]) == 16
    assert here["memory_bytes"] is None or here["memory_bytes"] > 0
    moved = dict(here, memory_bytes=1, gpu_driver="other", platform="other")
    assert fingerprint(moved) == here["fingerprint"]
    assert fingerprint(dict(here, cpu_count=(here["cpu_count"] or 1) + 1)) != here["fingerprint"]
    # a legacy bench row's machine dict (key "gpu") matches the new form (key "gpu_name")
    legacy = {"cpu_model": "X", "cpu_count": 2, "cpu_features": ["fma", "avx2"], "gpu": None}
    assert fingerprint(legacy) == fingerprint(
        {"cpu_model": "X", "cpu_count": 2, "cpu_features": ["avx2", "fma"], "gpu_name": None, "memory_bytes": 5}
    )


def test_cli_import_query_export(tmp_path, capsys):
    from accelops.cli import main

    history = tmp_path / "matmul.jsonl"
    history.write_text("".join(json.dumps(r) + "\n" for r in matmul_run("cli")))
    db = str(tmp_path / "cli.duckdb")
    assert main(["results", "--db", db, "import", str(history)]) == 0
    assert "imported 1 runs, 4 measurements" in capsys.readouterr().out
    assert main(["results", "--db", db, "import"]) == 0  # default: the *.jsonl beside the database
    assert "0 measurements" in capsys.readouterr().out
    assert (
        main(
            [
                "results",
                "--db",
                db,
                "query",
                "SELECT m, ratio FROM results WHERE is_accelops ORDER BY m",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["m,ratio", "1,4.0", "32,4.0"]
    assert main(["results", "--db", db, "query", "SELECT op FROM results WHERE is_accelops LIMIT 1"]) == 0
    assert "ternary" in capsys.readouterr().out
    assert main(["results", "--db", db, "export", "--parquet", str(tmp_path / "pq")]) == 0
    assert "Parquet files" in capsys.readouterr().out
    with pytest.raises(duckdb.Error):
        main(["results", "--db", db, "query", "DELETE FROM runs"])  # queries open the file read-only


# --------------------------------------------------------------------------- regressions


def history_rows(medians, spread=0.05, machine=None, quick=False, start_day=1, new=None):
    """One matmul 'ternary' row per run, a day apart; new = (median, p20, p80) of a last run."""
    rows = []
    points = [(m, m * (1 - spread), m * (1 + spread)) for m in medians] + ([new] if new else [])
    for i, (med, p20, p80) in enumerate(points):
        rows.append(
            bench_row(
                f"h{start_day + i}",
                median=med,
                p20_us=p20,
                p80_us=p80,
                git_commit=f"commit{i:02d}",
                date=f"2026-11-{start_day + i:02d}T10:00:00+00:00",
                quick=quick,
                machine=machine or dict(MACHINE),
            )
        )
    return rows


def verdicts_for(tmp_path, rows, **kw):
    from accelops.results.regress import check

    db = ResultsDB(tmp_path / f"reg{len(list(tmp_path.iterdir()))}.duckdb")
    db.write_rows(rows)
    return check(db, **kw)


STABLE = [100, 103, 98, 101, 99]


def test_a_real_regression_is_caught_with_its_commit_range(tmp_path):
    (v,) = verdicts_for(tmp_path, history_rows(STABLE, new=(130, 126, 134)))
    assert v.kind == "regression"
    assert v.band_high_us == pytest.approx(103 * 1.05) and v.change == pytest.approx(0.30)
    assert v.commit_range == "commit04..commit05"
    assert "regression: matmul label ternary" in v.describe() and "+30.0%" in v.describe()


@pytest.mark.parametrize(
    "new, why",
    [
        ((112, 107, 117), "inside the band plus 10%"),
        ((130, 90, 170), "a noisy run: its p20 is below the history's median"),
        ((95, 90, 100), "faster, but not beyond the band"),
    ],
)
def test_noise_is_not_flagged(tmp_path, new, why):
    (v,) = verdicts_for(tmp_path, history_rows(STABLE, new=new))
    assert v.kind == "ok", why


def test_a_noisy_history_widens_the_band(tmp_path):
    # the same 130 us that is a regression against a tight history is not one against a
    # history that itself spread to 125 us
    (v,) = verdicts_for(tmp_path, history_rows(STABLE, spread=0.25, new=(130, 126, 134)))
    assert v.kind == "ok"


def test_an_improvement_is_reported_as_such(tmp_path):
    (v,) = verdicts_for(tmp_path, history_rows(STABLE, new=(70, 67, 73)))
    assert v.kind == "improvement" and v.change == pytest.approx(-0.30)


def test_history_is_per_machine_window_and_excludes_quick_runs(tmp_path):
    other = dict(MACHINE, cpu_model="Intel Xeon")
    rows = (
        history_rows([100], new=(130, 126, 134))  # 1 previous run here
        + history_rows([300, 300, 300], machine=other, start_day=10)  # another machine
        + history_rows([10, 10, 10], quick=True, start_day=20)
    )  # quick runs
    verdicts = verdicts_for(tmp_path, rows)
    kinds = {v.machine: v.kind for v in verdicts}
    assert kinds == {fingerprint(MACHINE): "too little history", fingerprint(other): "ok"}
    # the window: only the last 2 runs before the newest count (the old slow ones are forgotten)
    (v,) = verdicts_for(tmp_path, history_rows([200, 200, 100, 100], new=(130, 126, 134)), window=2)
    assert v.kind == "regression" and len(v.history) == 2


def test_two_ops_on_the_same_shapes_are_separate_benchmarks_and_pairs(tmp_path):
    """The dispatch family times ternary_matmul and int8_linear on the same shapes with the
    same methods: each op is its own series (an int8 run is no ternary regression) and an
    accelops row pairs with its own op's baseline only."""
    rows = []
    for i in range(4):
        for op, med in (("ternary_matmul", 60.0), ("int8_linear", 180.0)):
            common = dict(family="dispatch", op=op, git_commit=f"c{i}", date=f"2026-11-{i + 1:02d}T10:00:00+00:00")
            rows.append(bench_row(f"d{i}", method="tuned", label="accelops tuned dispatch", median=med, **common))
            rows.append(
                bench_row(
                    f"d{i}", method="default", label="default dispatch", accelops=False, median=med * 1.5, **common
                )
            )
    verdicts = verdicts_for(tmp_path, rows)
    assert sorted((v.op, v.method, v.kind) for v in verdicts) == [
        ("int8_linear", "default", "ok"),
        ("int8_linear", "tuned", "ok"),
        ("ternary_matmul", "default", "ok"),
        ("ternary_matmul", "tuned", "ok"),
    ]
    assert (
        "dispatch int8_linear accelops tuned dispatch"
        in [v for v in verdicts if v.op == "int8_linear" and v.method == "tuned"][0].describe()
    )
    db = ResultsDB(tmp_path / "pairs.duckdb")
    db.write_rows(rows)
    _, pairs = db.query("SELECT op, baseline_method, speedup FROM ratios WHERE run_id = 'd0' ORDER BY op")
    assert pairs == [("int8_linear", "default", 1.5), ("ternary_matmul", "default", 1.5)]


def test_report_writes_html_with_plots_and_check_fails_on_a_regression(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from accelops.cli import main

    db_path = tmp_path / "rep.duckdb"
    db = ResultsDB(db_path)
    rows = history_rows(STABLE, new=(130, 126, 134))
    # each run also measures the fp32 baseline, and one op fails on this machine
    for r in list(rows):
        rows.append(
            dict(r, method="fp32", accelops=False, label="F.linear fp32", median_us=400.0, p20_us=390.0, p80_us=410.0)
        )
    rows.append(
        dict(
            rows[0],
            method="int8",
            label="accelops int8_linear",
            status="error",
            reason="RuntimeError: no kernel",
            median_us=None,
        )
    )
    db.write_rows(rows)
    out = tmp_path / "report"
    assert main(["report", "--db", str(db_path), "--out", str(out), "--check"]) == 1
    printed = capsys.readouterr().out
    assert "regression: matmul label ternary" in printed and "1 regressions" in printed
    page = (out / "index.html").read_text()
    fp = fingerprint(MACHINE)
    for png in (f"matmul_{fp}_ratios.png", f"matmul_{fp}_history.png"):
        assert (out / png).stat().st_size > 1000 and png in page
    assert "<b>regression</b>" in page and "commit04..commit05" in page
    assert "works, 130 us" in page and "<b>error</b>: RuntimeError: no kernel" in page  # the matrix
    # without --check the report is written and the exit status is 0; --no-html only judges
    assert main(["report", "--db", str(db_path), "--out", str(out)]) == 0
    assert main(["report", "--db", str(db_path), "--check", "--no-html"]) == 1
    capsys.readouterr()
    calm = tmp_path / "calm.duckdb"
    ResultsDB(calm).write_rows(history_rows(STABLE, new=(101, 96, 106)))
    assert main(["report", "--db", str(calm), "--check", "--no-html"]) == 0
    assert "0 regressions" in capsys.readouterr().out
