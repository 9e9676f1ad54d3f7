"""Issue 26, item 1: dispatch that adapts by itself (accelops/ops/_tuning.py, measuring with
accelops.tune.measure_bounded). The first call of a key measures and persists the choice
in the user's cache directory; later calls and other processes read it; two processes
writing at once lose nothing; a table of another machine warns once and is ignored; a
corrupt file warns and is re-measured; ACCELOPS_BACKEND / ACCELOPS_AUTOTUNE /
ACCELOPS_TUNED override; nothing is measured while tracing or on fake, meta or wrapped
tensors. The suite runs with autotune off (conftest.py); these tests turn it on with a
temporary cache directory and a tiny budget. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from accelops import ops, tune
from accelops._machine import machine_info
from accelops.ops import _tuning

pytestmark = pytest.mark.skipif(ops.ternary.extension()[0] is None, reason="needs the C++ extension")

ROOT = Path(__file__).resolve().parents[1]
BUDGET = "0.02"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Autotune on, its table in a temporary $XDG_CACHE_HOME -> the table's path."""
    for var in ("ACCELOPS_BACKEND", "ACCELOPS_DISPATCH_TABLE", "ACCELOPS_TUNED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ACCELOPS_AUTOTUNE", "1")
    monkeypatch.setenv("ACCELOPS_AUTOTUNE_BUDGET", BUDGET)
    monkeypatch.setattr(_tuning, "_warned", set())
    _tuning.reset()
    yield tmp_path / "cache" / "accelops" / "dispatch.json"
    _tuning.reset()


@pytest.fixture
def measured(monkeypatch):
    """The (op, M, N, K, dtype, threads) of every measurement the autotuner runs."""
    calls = []
    real = tune.measure_bounded

    def spy(op, x, w, w_scale, bias=None, max_threads=None, budget_s=1.0, margin=0.02):
        e = real(op, x, w, w_scale, bias, max_threads, budget_s, margin)
        calls.append((op, *e["shape"].values(), e["dtype"], max_threads))
        return e

    monkeypatch.setattr(tune, "measure_bounded", spy)
    return calls


def _int8(n=24, k=64):
    return ops.quantize_weight_int8(torch.randn(n, k))


def _entries(path: Path) -> list[dict]:
    return json.loads(path.read_text())["tables"][machine_info()["fingerprint"]]["entries"]


def _run(code: str, env: dict, **kw) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _check(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_first_call_measures_persists_and_later_calls_reuse(cache, measured):
    torch.manual_seed(0)
    wq, ws = _int8()
    wp, tws = ops.quantize_weight_ternary(torch.randn(24, 64))
    x = torch.randn(3, 64)
    want_i = torch.ops.accelops.int8_linear(x, wq, ws, None)
    want_t = torch.ops.accelops.ternary_matmul(x, wp, tws, None)
    threads = torch.get_num_threads()
    assert torch.equal(ops.int8_linear(x, wq, ws), want_i)  # measures (M=3: bucket 4)
    assert torch.equal(ops.int8_linear(x, wq, ws), want_i)
    ops.int8_linear(torch.randn(4, 64), wq, ws)  # the same bucket: not measured again
    assert torch.equal(ops.ternary_matmul(x, wp, tws), want_t)
    assert measured == [
        ("int8_linear", 3, 24, 64, "float32", threads),
        ("ternary_matmul", 3, 24, 64, "float32", threads),
    ]
    ops.int8_linear(torch.randn(5, 64), wq, ws)  # bucket 8: a new key
    ops.int8_linear(torch.randn(3, 64, dtype=torch.bfloat16), wq, ws)  # another dtype: a new key
    assert [c[1:5] for c in measured[2:]] == [(5, 24, 64, "float32"), (3, 24, 64, "bfloat16")]
    entries = _entries(cache)  # $XDG_CACHE_HOME/accelops/dispatch.json
    assert len(entries) == 4 and {e["source"] for e in entries} == {"autotune"}
    e = entries[0]
    assert e["op"] == "int8_linear" and e["max_threads"] == threads and e["budget_s"] == float(BUDGET)
    assert e["winner"]["backend"] in ("native", "aten_int_mm", "reference")
    assert {c["backend"] for c in e["candidates"]} <= {"native", "aten_int_mm", "reference"}
    # A new process (here: a fresh read of the file) uses the entries without measuring.
    _tuning.reset()
    n = len(measured)
    ops.int8_linear(torch.randn(2, 64), wq, ws)  # M=2: bucket 2, not measured yet
    ops.int8_linear(torch.randn(4, 64), wq, ws)  # bucket 4: read from the file
    assert len(measured) == n + 1


@pytest.mark.slow
def test_a_second_process_reads_the_measured_choice(cache, measured):
    wq, ws = _int8()
    ops.int8_linear(torch.randn(1, 64), wq, ws)
    assert len(measured) == 1
    code = """
        import torch
        from accelops import ops, tune
        calls = []
        real = tune.measure_bounded
        tune.measure_bounded = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        wq, ws = ops.quantize_weight_int8(torch.randn(24, 64))
        ops.int8_linear(torch.randn(1, 64), wq, ws)
        print("measured", len(calls))
    """
    out = _check(_run(code, {"XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"], "ACCELOPS_AUTOTUNE": "1"}))
    assert "measured 0" in out


@pytest.mark.slow
def test_two_processes_writing_at_once_lose_no_entry(cache):
    """Each process merges 25 entries of its own, one write at a time, while the other does
    the same: every one of the 50 is in the file afterwards (the lock serializes the
    read-merge-replace; without it, one writer's replace drops what the other added)."""
    code = """
        import sys
        from accelops.ops import _tuning
        base = int(sys.argv[1])
        for i in range(25):
            e = {"op": "int8_linear", "shape": {"M": 1, "N": base + i, "K": 64}, "max_threads": 1,
                 "source": "autotune", "winner": {"backend": "native", "threads": 1}}
            _tuning.merge_entries([e], sys.argv[2])
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(base), str(cache)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for base in (1000, 2000)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    ns = sorted(e["shape"]["N"] for e in _entries(cache))
    assert ns == list(range(1000, 1025)) + list(range(2000, 2025))
    assert not list(cache.parent.glob("*.tmp*"))  # no temporary file left behind


@pytest.mark.slow
def test_two_processes_autotuning_at_once_keep_both_choices(cache):
    code = """
        import sys, torch
        from accelops import ops
        n = int(sys.argv[1])
        wq, ws = ops.quantize_weight_int8(torch.randn(n, 64))
        for m in (1, 2, 4, 8):
            ops.int8_linear(torch.randn(m, 64), wq, ws)
    """
    env = {"XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"], "ACCELOPS_AUTOTUNE": "1", "ACCELOPS_AUTOTUNE_BUDGET": "0.05"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(n)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (24, 40)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    keys = sorted((e["shape"]["N"], e["shape"]["M"]) for e in _entries(cache))
    assert keys == [(n, m) for n in (24, 40) for m in (1, 2, 4, 8)]


def test_a_table_of_another_machine_warns_once_is_ignored_and_kept(cache, measured):
    cache.parent.mkdir(parents=True)
    other = {
        "entries": [{"op": "int8_linear", "shape": {"M": 1, "N": 24, "K": 64}, "winner": {"backend": "reference"}}]
    }
    cache.write_text(json.dumps({"format": 1, "tables": {"0123456789abcdef": other}}))
    wq, ws = _int8()
    with pytest.warns(RuntimeWarning, match=r"no table for this machine .*0123456789abcdef.*measuring"):
        ops.int8_linear(torch.randn(1, 64), wq, ws)
    assert len(measured) == 1  # its entry for this very shape was not used
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        ops.int8_linear(torch.randn(2, 64), wq, ws)
        ops.int8_linear(torch.randn(1, 64), wq, ws)
    tables = json.loads(cache.read_text())["tables"]
    assert tables["0123456789abcdef"] == other  # the other machine's table is kept as it was
    assert len(tables[machine_info()["fingerprint"]]["entries"]) == 2


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"format": 99, "tables": {}}),
        json.dumps({"format": 1, "tables": []}),
        "",
    ],
)
def test_a_corrupt_file_warns_and_is_measured_again(cache, measured, content):
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    wq, ws = _int8()
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        y = ops.int8_linear(x, wq, ws)
    assert torch.equal(y, torch.ops.accelops.int8_linear(x, wq, ws, None))
    assert len(measured) == 1
    assert len(_entries(cache)) == 1  # replaced by a valid file


def test_malformed_entries_are_skipped_with_a_warning(cache, measured):
    cache.parent.mkdir(parents=True)
    fp = machine_info()["fingerprint"]
    good = {
        "op": "int8_linear",
        "shape": {"M": 1, "N": 24, "K": 64},
        "max_threads": torch.get_num_threads(),
        "winner": {"backend": "native", "threads": 1},
    }
    bad = [
        {"op": "int8_linear", "shape": {"M": 2, "N": 24}, "winner": {"backend": "native"}},
        {"op": "int8_linear", "shape": {"M": 4, "N": 24, "K": 64}, "winner": {"backend": "gpu_magic"}},
        {"op": "int8_linear", "shape": {"M": 8, "N": 24, "K": 64}, "winner": {"backend": "native", "threads": -2}},
        "not an entry",
    ]
    cache.write_text(json.dumps({"format": 1, "tables": {fp: {"entries": [good, *bad]}}}))
    wq, ws = _int8()
    with pytest.warns(RuntimeWarning, match="4 malformed entries ignored"):
        ops.int8_linear(torch.randn(1, 64), wq, ws)
    assert measured == []  # the good entry was used
    ops.int8_linear(torch.randn(4, 64), wq, ws)
    assert len(measured) == 1  # the bad one for this key was not


def test_env_overrides(cache, measured, monkeypatch):
    wq, ws = _int8()
    x = torch.randn(1, 64)
    monkeypatch.setenv("ACCELOPS_BACKEND", "cpu")  # a forced backend: no table, no measuring
    ops.int8_linear(x, wq, ws)
    monkeypatch.setenv("ACCELOPS_BACKEND", "reference")
    ops.int8_linear(x, wq, ws)
    monkeypatch.delenv("ACCELOPS_BACKEND")
    monkeypatch.setenv("ACCELOPS_AUTOTUNE", "0")
    _tuning.reset()
    assert _tuning.choice_for("int8_linear", torch.device("cpu"), (1, 24, 64), (x, wq, ws, None)) is None
    ops.int8_linear(x, wq, ws)
    monkeypatch.setenv("ACCELOPS_AUTOTUNE", "1")
    monkeypatch.setenv("ACCELOPS_TUNED", "0")  # no table at all: nothing measured either
    _tuning.reset()
    ops.int8_linear(x, wq, ws)
    assert measured == [] and not cache.exists()
    monkeypatch.delenv("ACCELOPS_TUNED")
    elsewhere = cache.parent.parent / "elsewhere.json"
    monkeypatch.setenv("ACCELOPS_DISPATCH_TABLE", str(elsewhere))  # relocates the table
    _tuning.reset()
    ops.int8_linear(x, wq, ws)
    assert len(measured) == 1 and elsewhere.exists() and not cache.exists()
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("ACCELOPS_AUTOTUNE_BUDGET", bad)
        _tuning.reset()
        with pytest.raises(ValueError, match="ACCELOPS_AUTOTUNE_BUDGET must be a positive number"):
            ops.int8_linear(x, wq, ws)


def test_an_unwritable_cache_warns_once_and_keeps_the_choice_for_the_process(cache, measured, monkeypatch):
    def fail(*a, **kw):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(_tuning, "merge_entries", fail)
    wq, ws = _int8()
    with pytest.warns(RuntimeWarning, match="could not write the dispatch table"):
        ops.int8_linear(torch.randn(1, 64), wq, ws)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.int8_linear(torch.randn(1, 64), wq, ws)
        ops.int8_linear(torch.randn(2, 64), wq, ws)
    assert len(measured) == 2


def test_a_failing_measurement_falls_back_to_the_default(cache, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(tune, "measure_bounded", broken)
    wq, ws = _int8()
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="measuring the dispatch candidates .* failed .*boom"):
        y = ops.int8_linear(x, wq, ws)
    assert torch.equal(y, torch.ops.accelops.int8_linear(x, wq, ws, None))


@pytest.mark.slow
def test_nothing_is_measured_while_compiling(cache, measured):
    wq, ws = _int8()
    x = torch.randn(2, 64)
    fn = torch.compile(lambda a: ops.int8_linear(a, wq, ws), backend="eager", fullgraph=True)
    assert torch.equal(fn(x), torch.ops.accelops.int8_linear(x, wq, ws, None))
    assert measured == []


def test_nothing_is_measured_on_fake_meta_or_wrapped_tensors_or_in_backward(cache, measured):
    from torch._subclasses.fake_tensor import FakeTensorMode

    wq, ws = _int8()
    x = torch.randn(2, 64)
    with FakeTensorMode() as mode:
        fx, fw, fs = mode.from_tensor(x), mode.from_tensor(wq), mode.from_tensor(ws)
        assert ops.int8_linear(fx, fw, fs).shape == (2, 24)
    with pytest.warns(RuntimeWarning, match="device type 'meta'"):
        meta = ops.int8_linear(x.to("meta"), wq.to("meta"), ws.to("meta"))
    assert meta.shape == (2, 24) and meta.device.type == "meta"
    xs = torch.randn(3, 2, 64)
    assert torch.vmap(lambda a: ops.int8_linear(a, wq, ws))(xs).shape == (3, 2, 24)
    with torch.device("meta"):  # a TorchFunctionMode: fresh tensors would be meta ones
        ops.int8_linear(x, wq, ws)

    class CallsTheOpInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            ops.int8_linear(g, wq, ws)
            return g

    CallsTheOpInBackward.apply(torch.randn(2, 64, requires_grad=True)).sum().backward()
    assert measured == []
    ops.int8_linear(x, wq, ws)  # a plain call afterwards measures
    assert len(measured) == 1


def test_measure_bounded_tries_the_candidates_and_keeps_within_its_budget_order():
    torch.manual_seed(0)
    wq, ws = _int8(16, 128)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    e = tune.measure_bounded("int8_linear", x, wq, ws, torch.randn(16), max_threads=2, budget_s=0.05)
    assert e["shape"] == {"M": 2, "N": 16, "K": 128} and e["dtype"] == "bfloat16" and e["source"] == "autotune"
    kinds = {(c["backend"], c["threads"], c["tiles"] is not None) for c in e["candidates"]}
    assert kinds == {
        ("native", 1, False),
        ("native", 2, False),
        ("native", 2, True),
        ("aten_int_mm", 1, False),
        ("aten_int_mm", 2, False),
        ("reference", 2, False),
    }
    assert (e["candidates"][0]["backend"], e["candidates"][0]["threads"]) == ("native", 2)  # the default first
    # A budget already spent: the kernel and ATen's GEMM at each thread count are still timed
    # (a busy machine must not skip the likely winners); tiles and the reference are skipped.
    e = tune.measure_bounded("int8_linear", x, wq, ws, None, max_threads=2, budget_s=1e-9)
    assert [(c["backend"], c["threads"]) for c in e["candidates"]] == [
        ("native", 2),
        ("aten_int_mm", 2),
        ("native", 1),
        ("aten_int_mm", 1),
    ]
    assert len(e["skipped"]) == len(tune.TILE_GRID) + 1
    # Tall inputs are measured on their first MAX_BUCKET rows.
    tall = torch.randn(_tuning.MAX_BUCKET + 5, 128)
    e = tune.measure_bounded("int8_linear", tall, wq, ws, None, max_threads=1, budget_s=1e-9)
    assert e["shape"]["M"] == _tuning.MAX_BUCKET


def test_a_measured_aten_gemm_that_is_not_exact_is_not_chosen(monkeypatch):
    real = tune._candidate_fns

    def fast_but_wrong(op, x, wq, ws, bias=None):
        fns = real(op, x, wq, ws, bias)
        native = fns["native"]
        fns["native"] = lambda: time.sleep(0.002) or native()  # so that the wrong one wins the timing
        fns["reference"] = fns["native"]
        fns["aten_int_mm"] = lambda: torch.zeros(())  # fast, and wrong on every input
        return fns

    monkeypatch.setattr(tune, "_candidate_fns", fast_but_wrong)
    wq, ws = _int8(16, 128)
    e = tune.measure_bounded("int8_linear", torch.randn(2, 128), wq, ws, max_threads=1, budget_s=0.05)
    assert e["winner"]["backend"] != "aten_int_mm" and "differs from the kernel" in e["excluded"]["aten_int_mm"]


def test_bucket_of_m():
    assert [_tuning.bucket_m(m) for m in (0, 1, 2, 3, 4, 5, 33, 512, 513)] == [0, 1, 2, 4, 4, 8, 64, 512, 1024]
    assert _tuning.bucket_m(10**6) == _tuning.MAX_BUCKET


def test_threads_are_part_of_the_key(cache, measured):
    wq, ws = _int8()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ops.int8_linear(torch.randn(1, 64), wq, ws)
        torch.set_num_threads(2)
        ops.int8_linear(torch.randn(1, 64), wq, ws)
    finally:
        torch.set_num_threads(before)
    assert [c[-1] for c in measured] == [1, 2]


def test_info_names_the_cpu_its_instruction_sets_and_each_ops_path(cache, measured, capsys, monkeypatch):
    import accelops
    from accelops._info import _gemv_path, cpu_features

    wq, ws = _int8()
    ops.int8_linear(torch.randn(1, 64), wq, ws)
    d = accelops.info()
    out = capsys.readouterr().out
    disp = d["dispatch"]
    assert d["cpu_model"] in out and all(f in out for f in d["cpu_features"])
    assert disp["autotune"] is True and disp["table"] == str(cache) and disp["fingerprint"]
    assert disp["ops"]["int8_linear"]["table_entries"] == 1 and disp["ops"]["ternary_matmul"]["table_entries"] == 0
    assert (
        disp["ops"]["int8_linear"]["backend"] == "native" and disp["ops"]["int8_linear"]["kernel_isa"] == d["cpu_isa"]
    )
    assert "per shape from the table (1 entries)" in out and "autotune       on" in out
    monkeypatch.setenv("ACCELOPS_BACKEND", "reference")
    monkeypatch.setenv("ACCELOPS_AUTOTUNE", "0")
    d = accelops.info()
    out = capsys.readouterr().out
    assert "ACCELOPS_BACKEND=reference" in out and d["dispatch"]["ops"]["ternary_matmul"]["backend"] == "reference"
    assert d["dispatch"]["autotune"] is False
    assert cpu_features({"avx2", "amx_tile", "amx_int8", "amx_bf16"}) == ["avx2", "amx_tile", "amx_int8", "amx_bf16"]
    # The ternary GEMV's 256-bit VNNI path (csrc/cpu/ternary.cpp, gemv_vnni256).
    monkeypatch.delenv("ACCELOPS_CPU_ISA", raising=False)
    assert _gemv_path("avx2", ["avx2", "avxvnni"]).startswith("avxvnni")
    assert _gemv_path("avx2", ["avx2", "avx512vnni"]) == "avx2"
    assert _gemv_path("avx512vnni", ["avx2", "avx512vnni"]) == "avx512vnni"
    monkeypatch.setenv("ACCELOPS_CPU_ISA", "avxvnni")
    assert "EVEX" in _gemv_path("avx2", ["avx2", "avx512vnni"])
    monkeypatch.setenv("ACCELOPS_CPU_ISA", "avx2")
    assert _gemv_path("avx2", ["avx2", "avxvnni"]) == "avx2"


def test_an_accelops_tune_entry_is_used_and_wins_over_the_autotuners(cache, measured):
    """A key `accelops tune` measured is not measured again, and its entry is kept over an
    autotune entry of the same key (the longer measurement); other keys still measure."""
    cache.parent.mkdir(parents=True)
    threads = torch.get_num_threads()
    tuned = {
        "op": "int8_linear",
        "shape": {"M": 32, "N": 24, "K": 64},
        "max_threads": threads,
        "device": "cpu",
        "winner": {"backend": "native", "threads": 1},
    }
    auto = {**tuned, "source": "autotune", "winner": {"backend": "aten_int_mm", "threads": 1}}
    cache.write_text(json.dumps({"format": 1, "tables": {machine_info()["fingerprint"]: {"entries": [tuned, auto]}}}))
    wq, ws = _int8()
    ops.int8_linear(torch.randn(20, 64), wq, ws)  # bucket 32: tune's entry
    table = _tuning.active()
    assert measured == [] and table.lookup("int8_linear", (20, 24, 64)).backend == "native"
    ops.int8_linear(torch.randn(1, 64), wq, ws)  # bucket 1: no entry, measured
    assert len(measured) == 1
