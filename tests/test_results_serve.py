"""`accelops results serve`: the REST API (FastAPI's TestClient, and schemathesis against the
app's own OpenAPI schema), the outlier rule, bad input (an unknown machine, an empty or
missing database, a malformed filter, a huge page, a locked database, an old schema: a JSON
4xx/5xx body, never a traceback, nothing written), and the page in headless chromium
(skipped, saying why, where chromium or selenium is missing)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

duckdb = pytest.importorskip("duckdb")
fastapi = pytest.importorskip("fastapi", reason="accelops results serve needs fastapi (requirements-dev.txt)")
pytest.importorskip("plotly", reason="the dashboard serves the plotly package's plotly.js")

from fastapi.testclient import TestClient  # noqa: E402

from accelops.results import ResultsDB, explore, fingerprint  # noqa: E402
from accelops.results.serve import MAX_PAGE, create_app  # noqa: E402

from .test_results import HOLDER, MACHINE, bench_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# a second machine that must never look like the first: another CPU and instruction sets
XEON = dict(
    MACHINE,
    cpu_model="Intel(R) Xeon(R) Platinum 8480+",
    accelops_cpu_isa="avx512vnni",
    cpu_features=["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "amx_int8", "amx_tile"],
)
EPYC_FP, XEON_FP = fingerprint(MACHINE), fingerprint(XEON)
# ternary M=1 on the EPYC: an outlier at run 2, stable, then a regression at the newest run
TERNARY_M1 = [100, 103, 300, 98, 101, 99, 101, 100, 131]
TERNARY_M32 = [3200, 3150, 3230, 3190, 3210, 3180, 3205, 3195, 3200]
DISPATCH_SHAPES = [(1, 256, 256), (32, 256, 256), (1, 4096, 4096), (32, 4096, 4096)]


def row(run_id, commit, day, machine, method, median, M, accelops=True, **extra):
    r = bench_row(
        run_id,
        method=method,
        accelops=accelops,
        median=1.0 if median is None else median,
        M=M,
        label=f"accelops {method}" if accelops else f"baseline {method}",
        date=f"2026-11-{day:02d}T10:00:00+00:00",
        git_commit=commit,
        machine=dict(machine),
        **extra,
    )
    if median is None:  # a failed case: no times
        r.update(median_us=None, p20_us=None, p80_us=None, min_us=None)
    else:
        r["p20_us"], r["p80_us"] = median * 0.97, median * 1.03
    return r


def dispatch_rows(run_id, day):
    rows = []
    for M, N, K in DISPATCH_SHAPES:
        big = M * N * K > 10**6
        winner = {"backend": "aten_int_mm" if big and M == 32 else "native", "threads": 2 if big else 1}
        cands = [
            {"backend": b, "threads": t, "median_us": 10.0 * (1 + M * N * K / 1e6) * f, "p20_us": 1.0, "p80_us": 2.0}
            for b, t, f in (("native", 1, 1.2), ("native", 2, 1.0), ("aten_int_mm", 2, 0.9), ("reference", 2, 9.0))
        ]
        for c in cands:  # the winner is the fastest candidate
            c["median_us"] *= 0.5 if (c["backend"], c["threads"]) == (winner["backend"], winner["threads"]) else 1
        rows.append(
            dict(
                row(run_id, "dispatchcommit", day, MACHINE, "tuned", 10.0, M, family="dispatch", N=N, K=K),
                op="ternary_matmul",
                winner=winner,
                candidates=cands,
            )
        )
    return rows


def build(path: Path) -> Path:
    db = ResultsDB(path)
    for i, (m1, m32) in enumerate(zip(TERNARY_M1, TERNARY_M32)):
        run, commit = f"epyc{i}", f"{i:02d}aa{i:02d}bb{i:02d}cc"
        db.write_rows(
            [
                row(run, commit, i + 1, MACHINE, "ternary", m1, 1),
                row(run, commit, i + 1, MACHINE, "ternary", m32, 32),
                row(run, commit, i + 1, MACHINE, "fp32", 400.0, 1, accelops=False),
                row(run, commit, i + 1, MACHINE, "fp32", 12800.0, 32, accelops=False),
                row(run, commit, i + 1, MACHINE, "torchao", 300.0, 1, accelops=False),
                row(run, commit, i + 1, MACHINE, "torchao", 9600.0, 32, accelops=False),
            ]
        )
    for i in range(3):
        run, commit = f"xeon{i}", f"{i:02d}dd{i:02d}ee{i:02d}ff"
        db.write_rows(
            [
                row(run, commit, 20 + i, XEON, "ternary", 50.0, 1),
                row(run, commit, 20 + i, XEON, "ternary", 1600.0, 32),
                row(run, commit, 20 + i, XEON, "fp32", 350.0, 1, accelops=False),
                row(run, commit, 20 + i, XEON, "fp32", 11200.0, 32, accelops=False),
                row(run, commit, 20 + i, XEON, "torchao", 200.0, 1, accelops=False),
                row(run, commit, 20 + i, XEON, "torchao", 6400.0, 32, accelops=False),
                row(run, commit, 20 + i, XEON, "int8", None, 1, status="unsupported", reason="no AMX kernel yet"),
            ]
        )
    db.write_rows(dispatch_rows("disp0", 15))
    return path


@pytest.fixture(scope="module")
def db_path(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("serve") / "results.duckdb")


@pytest.fixture(scope="module")
def client(db_path):
    return TestClient(create_app(db_path, lock_timeout=0.5))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- optional at import


def test_import_accelops_does_not_import_the_server_dependencies():
    code = "import sys, accelops, accelops.results, accelops.results.explore; print(sorted(m for m in ('fastapi', 'uvicorn', 'plotly', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_without_fastapi_says_how_to_install_it(monkeypatch, db_path, capsys):
    from accelops.cli import run_reporting
    from accelops.results.cli import run_args

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    import argparse

    args = argparse.Namespace(
        results_command="serve", db=None, serve_db=str(db_path), host="127.0.0.1", port=0, read_timeout=1.0
    )
    assert run_reporting("accelops results", "results", lambda: run_args(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("accelops results: error: accelops results serve needs fastapi")
    assert "pip install fastapi uvicorn plotly" in err[0]


def test_a_port_in_use_is_one_clear_error(db_path):
    from accelops.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*pass --port"):
            main(["results", "serve", "--db", str(db_path), "--port", str(port)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["results", "serve", "--db", str(db_path.parent / "missing.duckdb"), "--port", "0"])


# --------------------------------------------------------------------------- the API


def test_machines_are_told_apart_by_cpu_and_isa(client):
    machines = {m["fingerprint"]: m for m in client.get("/api/machines").json()}
    assert set(machines) == {EPYC_FP, XEON_FP}
    assert machines[XEON_FP]["cpu_isa"] == "avx512vnni" and "amx_int8" in machines[XEON_FP]["cpu_features"]
    assert machines[EPYC_FP]["cpu_isa"] == "avx2" and machines[EPYC_FP]["runs"] == 10
    assert len({m["name"] for m in machines.values()}) == 2
    assert "Xeon" in machines[XEON_FP]["name"] and "EPYC" in machines[EPYC_FP]["name"]


def test_runs_and_measurements_are_filtered_and_paginated(client):
    page = client.get("/api/runs", params={"limit": 4}).json()
    assert page["total"] == 13 and len(page["items"]) == 4 and page["next_offset"] == 4
    assert page["items"][0]["run_id"] == "xeon2"  # newest first
    last = client.get("/api/runs", params={"limit": 4, "offset": 12}).json()
    assert len(last["items"]) == 1 and last["next_offset"] is None
    assert client.get("/api/runs", params={"machine": XEON_FP}).json()["total"] == 3
    assert client.get("/api/runs", params={"family": "dispatch"}).json()["total"] == 1

    q = {"family": "matmul", "machine": EPYC_FP, "m": 1, "method": "ternary"}
    items = client.get("/api/measurements", params=q).json()["items"]
    assert sorted(it["median_us"] for it in items) == sorted(TERNARY_M1)
    assert all(it["shape"] == "4096x4096" and it["machine"] == EPYC_FP for it in items)
    # a commit by a prefix of its hash, several at once
    two = client.get("/api/measurements", params={**q, "commit": ["02aa", "08aa08"]}).json()
    assert sorted(it["median_us"] for it in two["items"]) == [131, 300]
    everything = client.get("/api/measurements", params={"limit": MAX_PAGE}).json()
    assert everything["total"] == 9 * 6 + 3 * 7 + len(DISPATCH_SHAPES) == len(everything["items"])


def test_filters_are_bound_parameters_not_sql(client, db_path):
    before = digest(db_path)
    for evil in ("matmul' OR '1'='1", "matmul; DROP TABLE runs; --", 'x") UNION SELECT * FROM runs --'):
        r = client.get("/api/measurements", params={"family": evil})
        assert r.status_code == 200 and r.json()["total"] == 0
    assert client.get("/api/runs").json()["total"] == 13 and digest(db_path) == before


@pytest.mark.parametrize(
    "url, params, status, text",
    [
        ("/api/measurements", {"limit": 10**6}, 422, "limit: Input should be less than or equal to 1000"),
        ("/api/measurements", {"limit": 0}, 422, "limit"),
        ("/api/measurements", {"m": "abc"}, 422, "m: Input should be a valid integer"),
        ("/api/measurements", {"m": 2**70}, 422, "m: Input should be less than or equal to"),
        ("/api/measurements", {"machine": "not-a-fingerprint"}, 422, "machine.0: String should match pattern"),
        ("/api/measurements", {"commit": "xyz"}, 422, "commit.0: String should match pattern"),
        ("/api/measurements", {"shape": "4096 by 4096"}, 422, "shape: String should match pattern"),
        ("/api/measurements", {"machine": "0123456789abcdef"}, 404, "unknown machine '0123456789abcdef'"),
        ("/api/ratios", {"machine": ["0123456789abcdef", EPYC_FP]}, 404, "the database holds"),
        ("/api/history", {"threshold": "nan"}, 422, "threshold"),
        ("/api/regressions", {"kind": "terrible"}, 422, "kind.0"),
        ("/api/predict", {"op": "ternary_matmul", "m": 1, "n": 1}, 422, "k: Field required"),
        ("/api/predict", {"op": "int8_linear", "m": 1, "n": 8, "k": 8}, 404, "no tuned dispatch entries for op"),
        ("/api/predict", {"op": "int8_linear", "m": 1, "n": 8, "k": 8, "machine": XEON_FP}, 404, "no dispatch run"),
    ],
)
def test_bad_input_gets_a_clear_json_error(client, db_path, url, params, status, text):
    before = digest(db_path)
    r = client.get(url, params=params)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and text in body["error"], body
    assert "Traceback" not in r.text and digest(db_path) == before
    if status == 404:
        assert EPYC_FP in body["error"] or "dispatch" in body["error"]  # it says what there is


def test_ratios_are_speedups_with_their_spread(client):
    items = client.get("/api/ratios", params={"family": "matmul", "m": 1, "baseline": "torchao"}).json()["items"]
    by = {it["machine"]: it for it in items}
    assert set(by) == {EPYC_FP, XEON_FP}  # each machine's newest run only
    epyc = by[EPYC_FP]
    assert epyc["run_id"] == "epyc8" and epyc["speedup"] == pytest.approx(300 / 131)
    assert epyc["speedup_low"] == pytest.approx(300 * 0.97 / (131 * 1.03))
    assert epyc["speedup_high"] == pytest.approx(300 * 1.03 / (131 * 0.97))
    assert by[XEON_FP]["speedup"] == pytest.approx(4.0)
    every = client.get("/api/ratios", params={"family": "matmul", "machine": EPYC_FP, "latest": False}).json()
    assert every["total"] == 9 * 2 * 2  # 9 runs x 2 cases x 2 baselines


def test_history_marks_the_regression_and_the_outlier(client):
    h = client.get("/api/history", params={"family": "matmul", "machine": EPYC_FP, "m": 1}).json()
    (s,) = h["series"]
    assert [p["median_us"] for p in s["points"]] == TERNARY_M1
    kinds = [p["verdict"] for p in s["points"]]
    assert kinds[:2] == ["too little history"] * 2 and set(kinds[3:-1]) == {"ok"}
    # the spike is a regression by the rule (against the 2 runs before it) and an outlier by
    # its neighbours on both sides; the newest run is a regression and, one-sided, no outlier
    assert kinds[2] == kinds[-1] == "regression"
    outliers = [i for i, p in enumerate(s["points"]) if p["anomaly_z"] is not None]
    assert outliers == [2] and s["points"][2]["anomaly_z"] > 3.5
    # the same rule as `accelops report --check`
    (v,) = client.get("/api/regressions", params={"kind": "regression"}).json()
    assert v["machine"] == EPYC_FP and v["commit"].startswith("08aa") and v["last_good_commit"].startswith("07aa")
    assert "regression: matmul" in v["description"]


def test_anomalies_list_the_single_outlier_only(client):
    found = client.get("/api/anomalies").json()
    assert [(a["run_id"], a["median_us"]) for a in found] == [("epyc2", 300)]
    assert found[0]["neighbours_median_us"] == pytest.approx(100.5)  # 100, 103 before; 98, 101 after
    assert found[0]["ratio_to_neighbours"] > 2.9


@given(
    level=st.floats(1, 1e6),
    before=st.integers(7, 10),
    after=st.integers(3, 8),
    step=st.floats(0.2, 5).filter(lambda s: abs(s - 1) > 0.01),
    spike=st.floats(1.5, 100),
    noise=st.lists(st.floats(-0.01, 0.01), min_size=16, max_size=16),
)
@settings(max_examples=60, deadline=None)
def test_outlier_rule_flags_a_spike_and_never_a_step(level, before, after, step, spike, noise):
    """A level change that stays (a regression or an improvement) is never an outlier; one
    measurement far off its neighbours (both sides) is, at any level."""
    values = [level] * before + [level * step] * after
    values = [v * (1 + noise[i % len(noise)]) for i, v in enumerate(values)]
    assert all(f is None for f in explore.robust_outliers(values))
    spiky = list(values)
    i = 2  # its neighbours all on its level, and more than k = 3 runs before the step
    spiky[i] = spiky[i] * (1 + spike)
    flags = explore.robust_outliers(spiky)
    assert flags[i] is not None and flags[i][0] > 3.5
    assert [j for j, f in enumerate(flags) if f is not None] == [i]


def test_outlier_rule_leaves_out_nonfinite_and_end_points():
    flags = explore.robust_outliers([400, 100, 101, math.nan, 99, 500, 100, 102, 101, 900])
    assert [i for i, f in enumerate(flags) if f] == [5]


def test_compatibility_matrix_and_dispatch_prediction(client):
    cells = client.get("/api/matrix", params={"family": "matmul"}).json()
    failed = [c for c in cells if not c["works"]]
    assert [(c["op"], c["machine"], c["status"], c["reason"]) for c in failed] == [
        ("int8", XEON_FP, "unsupported", "no AMX kernel yet")
    ]
    measured = client.get("/api/predict", params={"op": "ternary_matmul", "m": 32, "n": 4096, "k": 4096}).json()
    assert measured["predicted"] is False and measured["backend"] == "aten_int_mm" and measured["threads"] == 2
    assert measured["measured"]["median_us"] == pytest.approx(10.0 * (1 + 32 * 4096 * 4096 / 1e6) * 0.9 * 0.5)
    guess = client.get("/api/predict", params={"op": "ternary_matmul", "m": 24, "n": 5000, "k": 3000}).json()
    assert guess["predicted"] is True and guess["source_shape"] == {"M": 32, "N": 4096, "K": 4096}
    est = guess["error_estimate"]
    assert est["shapes"] == 4 and 0 <= est["loo_winner_agreement"] <= 1 and est["loo_worst_slowdown"] >= 0
    assert guess["machine"] == EPYC_FP and guess["run"]["run_id"] == "disp0"


# --------------------------------------------------------------------------- an unreadable database


def test_an_empty_missing_or_old_database_is_a_503_and_never_written(tmp_path):
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()  # a DuckDB file without accelops' tables
    fresh = tmp_path / "fresh.duckdb"
    ResultsDB(fresh).write_rows([])  # nothing to write: not even created
    con = duckdb.connect(str(fresh))  # the schema without a run: migrate by hand
    from accelops.results import migrate

    migrate(con)
    con.close()
    old = tmp_path / "old.duckdb"
    build(old)
    con = duckdb.connect(str(old))
    con.execute("UPDATE schema_info SET value = '2' WHERE key = 'version'")
    con.close()
    sums = {p: digest(p) for p in (empty, fresh, old)}
    for path, text in (
        (empty, "is empty (no accelops tables)"),
        (tmp_path / "missing.duckdb", "does not exist"),
        (old, "has schema version 2, this accelops reads 3; the server never writes"),
    ):
        c = TestClient(create_app(path, lock_timeout=0.2))
        for url in ("/api/machines", "/api/runs", "/api/history", "/api/info"):
            r = c.get(url)
            assert r.status_code == 503 and text in r.json()["error"] and "Traceback" not in r.text, (url, r.text)
        assert c.get("/").status_code == 200  # the page itself loads and shows the error
    c = TestClient(create_app(fresh))
    assert c.get("/api/machines").json() == [] and c.get("/api/info").json()["runs"] == 0
    assert c.get("/api/runs").json()["items"] == [] and c.get("/api/anomalies").json() == []
    assert c.get("/api/measurements", params={"machine": EPYC_FP}).status_code == 404
    assert {p: digest(p) for p in sums} == sums and not (tmp_path / "missing.duckdb").exists()


def test_a_locked_database_is_a_503_with_retry_after(db_path, tmp_path):
    path = tmp_path / "held.duckdb"
    shutil.copy(db_path, path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(path=str(path))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        c = TestClient(create_app(path, lock_timeout=0.3))
        r = c.get("/api/runs")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert re.search(r"held\.duckdb is held by process \d+ for more than 0\.3 s", r.json()["error"])
    finally:
        holder.kill()
        holder.wait()
    assert TestClient(create_app(path)).get("/api/runs").json()["total"] == 13  # free again


def test_a_run_written_while_serving_shows_up(db_path, tmp_path):
    """The server holds no connection between requests and recomputes what it caches (the
    machines, the series) when the file changes: a bench may write while it serves."""
    path = tmp_path / "live.duckdb"
    shutil.copy(db_path, path)
    c = TestClient(create_app(path))
    assert len(c.get("/api/machines").json()) == 2 and c.get("/api/anomalies").json()[0]["run_id"] == "epyc2"
    third = dict(MACHINE, cpu_model="AMD EPYC 9654", cpu_count=4)
    ResultsDB(path).write_rows([row("new0", "ffee0011", 28, third, "ternary", 70.0, 1)])
    machines = c.get("/api/machines").json()
    assert len(machines) == 3 and any(m["cpu_model"] == "AMD EPYC 9654" for m in machines)
    assert c.get("/api/runs").json()["items"][0]["run_id"] == "new0"
    series = c.get("/api/history", params={"machine": fingerprint(third)}).json()["series"]
    assert [p["median_us"] for s in series for p in s["points"]] == [70.0]


def test_a_bug_is_a_500_json_body_without_traceback(db_path, monkeypatch):
    def broken(db):
        raise KeyError("cpu_model")

    monkeypatch.setattr(explore, "machines", broken)
    r = TestClient(create_app(db_path), raise_server_exceptions=False).get("/api/machines")
    assert r.status_code == 500 and r.json() == {
        "error": "internal error in accelops results serve: KeyError: 'cpu_model'",
        "status": 500,
    }


def test_the_page_and_plotly_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    sources = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text)
    assert sources and all(s.startswith("/static/") or s == "#" for s in sources), sources  # nothing remote
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000 and b"plotly" in js.content[:2000].lower()
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/static/../serve.py").status_code == 404
    assert client.get("/static/nothing.js").json()["status"] == 404


# --------------------------------------------------------------------------- schemathesis


@pytest.mark.slow  # 35 s on 2 loaded cores (22 operations x 8 examples)
def test_the_api_matches_its_openapi_schema(db_path):
    """Every operation with generated parameters (valid and not): no 5xx, every status
    documented, every body valid against the schema. Bounded: a few examples each."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck
    from hypothesis import settings as hsettings
    from hypothesis.errors import Unsatisfiable

    app = create_app(db_path, lock_timeout=0.5)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/api/runs", "/api/measurements", "/api/ratios", "/api/predict"}
    from schemathesis.generation import GenerationMode

    failures = []
    for op, mode in [(op, mode) for op in ops for mode in GenerationMode]:

        @given(case=op.as_strategy(generation_mode=mode))
        @hsettings(
            max_examples=8,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            case.call_and_validate()

        try:
            check()
        except Unsatisfiable:  # no parameters: nothing to make invalid
            assert mode is GenerationMode.NEGATIVE and op.path in ("/api/info", "/api/machines")
        except Exception as exc:  # noqa: BLE001 - collected, every operation is tried
            failures.append(f"{op.method.upper()} {op.path} ({mode.value} data): {exc}")
    assert not failures, "\n\n".join(failures)


# --------------------------------------------------------------------------- the page in chromium


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _start_server(db_path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from accelops.cli import main; sys.argv[0] = 'accelops'; sys.exit(main())"]
        + ["results", "serve", "--db", str(db_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r} {proc.stderr.read()}")
    return proc, m.group(1)


@pytest.mark.slow
def test_the_page_in_headless_chromium(db_path, tmp_path):
    """The page loads with plotly.js from the server, the selectors change the charts and
    the URL, the cross-machine view shows both machines, and a screenshot is drawn."""
    if _chromium() is None or shutil.which("chromedriver") is None:
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select

    proc, url = _start_server(db_path)
    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,2000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)

    def rendered(after: int) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = driver.execute_script("return document.body.dataset.renders")
            if n == "error":
                raise AssertionError(driver.find_element("id", "error").text)
            if n and int(n) > after and driver.execute_script("return document.body.dataset.rendering") == "0":
                return int(n)
            time.sleep(0.1)
        raise AssertionError("the page did not finish drawing in 60 s")

    def traces(div: str) -> list[dict]:
        return driver.execute_script(
            f"return (document.getElementById('{div}').data || []).map(t => ({{name: t.name, x: t.x, y: t.y}}))"
        )

    try:
        driver.get(url + "?family=matmul&m=1&baseline=fp32")
        n = rendered(0)
        assert driver.find_element("id", "error").text == ""
        ratios = traces("chart-ratios")
        assert {t["name"] for t in ratios} == {"vs baseline fp32", "vs baseline torchao"}
        cross = traces("chart-cross")
        assert len(cross) == 2 and {t["name"] for t in cross} == {
            driver.execute_script(f"return MACHINES['{fp}'].name") for fp in (EPYC_FP, XEON_FP)
        }
        xeon = next(t for t in cross if "Xeon" in t["name"])
        assert xeon["y"] == [pytest.approx(7.0)]  # fp32 350 us / ternary 50 us
        history = traces("chart-history")
        assert any(t["name"] == "regression" and len(t["x"]) == 2 for t in history)  # the spike, the newest
        assert any(t["name"] == "anomaly" and len(t["x"]) == 1 for t in history)
        assert "regression" in driver.find_element("id", "flags").text

        Select(driver.find_element("id", "baseline")).select_by_value("torchao")
        n = rendered(n)
        assert "baseline=torchao" in driver.current_url
        assert next(t for t in traces("chart-cross") if "Xeon" in t["name"])["y"] == [pytest.approx(4.0)]
        Select(driver.find_element("id", "m")).select_by_value("32")
        n = rendered(n)
        assert "m=32" in driver.current_url
        assert next(t for t in traces("chart-cross") if "Xeon" in t["name"])["y"] == [pytest.approx(4.0)]
        assert [p["y"] for p in traces("chart-history") if p["name"] == "anomaly"] == [[]]
        # the link reproduces the view
        driver.get(driver.current_url)
        rendered(0)
        assert driver.find_element("id", "m").get_attribute("value") == "32"
        assert driver.find_element("id", "baseline").get_attribute("value") == "torchao"
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith(url) for u in loaded), loaded  # nothing from the network
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 50_000  # charts drawn, not a blank page
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=30)
