"""Tuned dispatch (accelops/ops/_tuning.py) and `accelops tune` (accelops/tune.py):
the table's choice is used, unseen shapes take the nearest measured shape's winner, a
table from another machine is ignored with one warning, ACCELOPS_BACKEND overrides, the
results do not change, and tuning writes and explains a table. No timing is asserted."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from accelops import ops
from accelops._machine import machine_info
from accelops.ops import _tuning
from accelops.ops._tuning import Choice, DispatchTable
from accelops.reference import int8 as int8_ref
from accelops.reference import ternary as ternary_ref

pytestmark = pytest.mark.skipif(ops.ternary.extension()[0] is None, reason="needs the C++ extension")


def entry(op, m, n, k, backend, threads):
    cands = [
        {"backend": "native", "threads": t, "median_us": 10.0 + t, "p20_us": 9.0, "p80_us": 12.0, "samples": 5}
        for t in (1, 2)
    ]
    cands.append(
        {"backend": "reference", "threads": 2, "median_us": 50.0, "p20_us": 45.0, "p80_us": 55.0, "samples": 2}
    )
    for c in cands:  # make the named winner the fastest candidate
        if c["backend"] == backend and c["threads"] == threads:
            c["median_us"] = 5.0
    return {
        "op": op,
        "shape": {"M": m, "N": n, "K": k},
        "winner": {"backend": backend, "threads": threads},
        "candidates": cands,
        "default_us": 12.0,
        "winner_us": 5.0,
        "max_threads": 2,
    }


@pytest.fixture(autouse=True)
def _no_table(monkeypatch):
    monkeypatch.delenv("ACCELOPS_BACKEND", raising=False)
    _tuning.reset(None, loaded=True)  # no table unless a test installs one
    yield
    _tuning.reset()


def install(entries):
    table = DispatchTable.from_json({"entries": entries}, machine_info()["fingerprint"])
    _tuning.reset(table)
    return table


def test_measured_choice_is_used_and_results_do_not_change(monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(3, 64), torch.randn(32, 64)
    wp, ws = ops.quantize_weight_ternary(w)
    wq, wsc = ops.quantize_weight_int8(w)
    want_t, want_i = ops.ternary_matmul(x, wp, ws), ops.int8_linear(x, wq, wsc)
    install([entry("ternary_matmul", 3, 32, 64, "reference", 2), entry("int8_linear", 3, 32, 64, "native", 1)])
    calls = []
    real_ref = ternary_ref.ternary_matmul
    monkeypatch.setattr(ternary_ref, "ternary_matmul", lambda *a: calls.append("ref") or real_ref(*a))
    threads_seen = []
    real_call_with = _tuning.call_with

    def spy(choice, fn, *args):
        return real_call_with(choice, lambda *a: threads_seen.append(torch.get_num_threads()) or fn(*a), *args)

    monkeypatch.setattr(_tuning, "call_with", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got_t = ops.ternary_matmul(x, wp, ws)
        got_i = ops.int8_linear(x, wq, wsc)
        assert torch.get_num_threads() == 2  # restored after the tuned call
    finally:
        torch.set_num_threads(before)
    assert calls == ["ref"] and threads_seen == [1]
    assert torch.equal(got_t, want_t) and torch.equal(got_i, want_i)


def test_unseen_shapes_take_the_nearest_measured_winner():
    table = install(
        [
            entry("int8_linear", 1, 4096, 4096, "native", 1),
            entry("int8_linear", 512, 4096, 4096, "native", 2),
            entry("int8_linear", 1, 256, 256, "reference", 2),
        ]
    )
    assert table.lookup("int8_linear", (1, 4096, 4096)) == Choice("native", 1, False, (1, 4096, 4096))
    near_small = table.lookup("int8_linear", (2, 4096, 4096))
    assert (near_small.backend, near_small.threads, near_small.predicted) == ("native", 1, True)
    assert table.lookup("int8_linear", (256, 4096, 4096)).threads == 2  # log2 256 is nearer 512 than 1
    assert table.lookup("int8_linear", (1, 300, 200)).backend == "reference"
    assert table.lookup("ternary_matmul", (1, 4096, 4096)) is None  # no entry for the op: default


def test_a_table_for_another_machine_is_ignored_with_one_warning(tmp_path, monkeypatch):
    path = tmp_path / "dispatch.json"
    path.write_text(
        json.dumps(
            {
                "format": 1,
                "tables": {"0123456789abcdef": {"entries": [entry("int8_linear", 1, 64, 64, "reference", 2)]}},
            }
        )
    )
    monkeypatch.setenv(_tuning.ENV_TABLE, str(path))
    _tuning.reset()
    with pytest.warns(RuntimeWarning, match=r"no table for this machine .*0123456789abcdef.*run `accelops tune`"):
        assert _tuning.active() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: later calls are silent
        x = torch.randn(1, 64)
        wq, ws = ops.quantize_weight_int8(torch.randn(8, 64))
        ops.int8_linear(x, wq, ws)
    path.write_text("{not json")
    _tuning.reset()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert _tuning.active() is None


def test_env_override_and_disable(tmp_path, monkeypatch):
    install([entry("int8_linear", 1, 64, 64, "reference", 2)])
    cpu = torch.device("cpu")
    assert _tuning.choice_for("int8_linear", cpu, (1, 64, 64)).backend == "reference"
    monkeypatch.setenv("ACCELOPS_BACKEND", "cpu")  # a forced backend wins
    calls = []
    real_ref = int8_ref.int8_linear
    monkeypatch.setattr(int8_ref, "int8_linear", lambda *a: calls.append("ref") or real_ref(*a))
    wq, ws = ops.quantize_weight_int8(torch.randn(64, 64))
    ops.int8_linear(torch.randn(1, 64), wq, ws)
    assert calls == []
    monkeypatch.delenv("ACCELOPS_BACKEND")
    ops.int8_linear(torch.randn(1, 64), wq, ws)
    assert calls == ["ref"]
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "format": 1,
                "tables": {
                    machine_info()["fingerprint"]: {"entries": [entry("int8_linear", 1, 64, 64, "reference", 2)]}
                },
            }
        )
    )
    monkeypatch.setenv(_tuning.ENV_TABLE, str(path))
    _tuning.reset()
    assert _tuning.choice_for("int8_linear", cpu, (1, 64, 64)).backend == "reference"  # read from the file
    monkeypatch.setenv(_tuning.ENV_DISABLE, "0")
    _tuning.reset()
    assert _tuning.choice_for("int8_linear", cpu, (1, 64, 64)) is None


def test_call_with_never_exceeds_the_callers_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        seen = _tuning.call_with(Choice("native", 2), torch.get_num_threads)
        assert seen == 1
    finally:
        torch.set_num_threads(before)


def test_compiled_graphs_keep_the_default_dispatch():
    install([entry("int8_linear", 2, 16, 32, "reference", 2)])
    wq, ws = ops.quantize_weight_int8(torch.randn(16, 32))
    x = torch.randn(2, 32)
    fn = torch.compile(lambda a: ops.int8_linear(a, wq, ws), backend="eager", fullgraph=True)
    assert torch.equal(fn(x), ops.int8_linear(x, wq, ws))


def test_tune_measures_writes_merges_and_explains(tmp_path, capsys):
    from accelops.cli import main
    from accelops.tune import TILE_GRID, explain, measure, write_table

    e = measure("ternary_matmul", {"M": 1, "N": 32, "K": 64}, max_threads=2, budget_s=0.01, rounds=2)
    assert e["shape"] == {"M": 1, "N": 32, "K": 64} and len(e["candidates"]) == 5 + len(TILE_GRID)
    assert e["excluded"] == {}

    def key(c):
        tiles = None if c["tiles"] is None else (c["tiles"]["n_block"], c["tiles"]["k_chunk"])
        return c["backend"], c["threads"], tiles

    assert {key(c) for c in e["candidates"]} == {
        ("native", 1, None),
        ("native", 2, None),
        ("aten_int_mm", 1, None),
        ("aten_int_mm", 2, None),
        ("reference", 2, None),
    } | {("native", 2, t) for t in TILE_GRID}
    assert e["winner"]["backend"] in ("native", "aten_int_mm", "reference") and e["default_us"] > 0
    path = tmp_path / "d.json"
    other = {"format": 1, "tables": {"ffffffffffffffff": {"entries": []}}}
    path.write_text(json.dumps(other))
    write_table([e], path)
    data = json.loads(path.read_text())
    assert set(data["tables"]) == {"ffffffffffffffff", machine_info()["fingerprint"]}  # others kept
    write_table([e], path)
    assert len(data["tables"][machine_info()["fingerprint"]]["entries"]) == 1
    assert len(json.loads(path.read_text())["tables"][machine_info()["fingerprint"]]["entries"]) == 1
    report = explain(
        [
            entry("int8_linear", 1, 64, 64, "native", 1),
            entry("int8_linear", 2, 64, 64, "native", 1),
            entry("int8_linear", 512, 64, 64, "native", 2),
        ]
    )["int8_linear"]
    assert report["shapes"] == 3 and report["loo_winner_agreement"] == pytest.approx(2 / 3)
    assert report["loo_worst_slowdown"] > 0
    shapes = tmp_path / "shapes.json"
    shapes.write_text(
        json.dumps([{"op": "int8_linear", "M": 2, "N": 16, "K": 32}, {"op": "int8_linear", "M": 4, "N": 16, "K": 32}])
    )
    assert (
        main(["tune", "--shapes", str(shapes), "--table", str(tmp_path / "cli.json"), "--budget", "0.01", "--explain"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "dispatch table for machine" in printed and "leave-one-out over 2 shapes" in printed
    with pytest.raises(SystemExit, match="not tuned ops"):
        main(["tune", "--ops", "fused_ffn", "--table", str(tmp_path / "x.json")])


def test_tune_finds_a_models_quantized_layers():
    from accelops.tune import shapes_from_model

    config = {
        "data": {"seq_len": 16, "vocab_size": 40},
        "model": {"type": "transformer", "dim": 32, "n_layers": 1, "n_heads": 2, "quant": "bitlinear"},
        "train": {"batch_size": 4},
    }
    shapes = shapes_from_model(config)
    assert {s["op"] for s in shapes} == {"ternary_matmul"}
    assert {(s["N"], s["K"]) for s in shapes} >= {(32, 32)} and {s["M"] for s in shapes} == {1, 64}


# ---------------------------------------------------------------- ATen's int8 GEMM candidate


@pytest.mark.parametrize("op", ["ternary_matmul", "int8_linear"])
@pytest.mark.parametrize("lead,n,k", [((1,), 7, 130), ((5,), 33, 256), ((2, 3), 64, 300), ((4,), 16, 0), ((0,), 8, 32)])
def test_aten_int_mm_path_is_identical_to_the_kernel(op, lead, n, k):
    """The ATen-GEMM ops give the kernel's result bit for bit: same quantization, exact
    int32 sums, same epilogue; with a bias, in every float dtype, odd K included."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    wq, ws = ops.quantize_weight_ternary(w) if op == "ternary_matmul" else ops.quantize_weight_int8(w)
    bias = torch.randn(n, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(*lead, k, generator=g) * 3).to(dtype)
        want = getattr(torch.ops.accelops, op)(x, wq, ws, bias.to(dtype))
        got = getattr(torch.ops.accelops, op + "_int_mm")(x, wq, ws, bias.to(dtype))
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", ["ternary_matmul", "int8_linear"])
def test_aten_int_mm_is_exact_on_extreme_inputs_here(op):
    """What tune's gate checks: every value at the int8 limit, where a saturating int16
    pair sum would go wrong. On this machine's GEMM the path is eligible."""
    from accelops.tune import exactness_failure

    for shape in ({"M": 3, "N": 5, "K": 4096}, {"M": 64, "N": 40, "K": 1000}):
        assert exactness_failure(op, shape, "aten_int_mm") is None


def test_tune_excludes_a_candidate_that_is_not_exact(monkeypatch):
    """A GEMM that saturates like vpmaddubsw is never chosen: tune records why."""
    from accelops import tune

    real = tune._candidate_fns

    def saturating(op, x, wq, ws):
        fns = real(op, x, wq, ws)
        fns["aten_int_mm"] = lambda: fns["native"]().clamp(-100, 100)  # wrong once sums grow
        return fns

    monkeypatch.setattr(tune, "_candidate_fns", saturating)
    e = tune.measure("int8_linear", {"M": 2, "N": 8, "K": 256}, max_threads=2, budget_s=0.01, rounds=2)
    assert "aten_int_mm" in e["excluded"] and "differs from the kernel" in e["excluded"]["aten_int_mm"]
    assert {c["backend"] for c in e["candidates"]} == {"native", "reference"}


def test_table_choice_of_aten_int_mm_is_dispatched_with_its_threads_and_gradient(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(6, 64, requires_grad=True)
    w = torch.randn(32, 64)
    wp, ws = ops.quantize_weight_ternary(w)
    wq, wsc = ops.quantize_weight_int8(w)
    want_t, want_i = ops.ternary_matmul(x, wp, ws), ops.int8_linear(x, wq, wsc)
    (gt_want,) = torch.autograd.grad(want_t.sum() + want_i.sum(), x)
    install([entry("ternary_matmul", 6, 32, 64, "aten_int_mm", 1), entry("int8_linear", 6, 32, 64, "aten_int_mm", 2)])
    used = []
    for name in ("ternary_matmul_int_mm", "int8_linear_int_mm"):
        real = getattr(torch.ops.accelops, name)
        monkeypatch.setattr(
            torch.ops.accelops,
            name,
            lambda *a, _real=real, _n=name: used.append((_n, torch.get_num_threads())) or _real(*a),
            raising=False,
        )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got_t, got_i = ops.ternary_matmul(x, wp, ws), ops.int8_linear(x, wq, wsc)
    finally:
        torch.set_num_threads(before)
    assert used == [("ternary_matmul_int_mm", 1), ("int8_linear_int_mm", 2)]
    assert torch.equal(got_t, want_t) and torch.equal(got_i, want_i)
    (gt_got,) = torch.autograd.grad(got_t.sum() + got_i.sum(), x)
    assert torch.equal(gt_got, gt_want)


# --------------------------------------------------------------------------- kernel tile sizes


def _isas():
    return ops.ternary.extension()[0].cpu_isas()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512vnni"])
@pytest.mark.parametrize(
    "m,n,k", [(1, 37, 300), (2, 64, 1000), (5, 130, 2500), (9, 260, 4096), (33, 70, 777), (4, 8, 256)]
)
def test_tile_sizes_never_change_a_result(monkeypatch, isa, m, n, k):
    """Every n_block / k_chunk the tuner may pick (and the extremes) gives the kernel's
    default result bit for bit, on every ISA path this CPU runs (odd N, K tails, M tails)."""
    if isa not in _isas():
        pytest.skip(f"this CPU has no {isa} kernels")
    monkeypatch.setenv("ACCELOPS_CPU_ISA", isa)
    ext = ops.ternary.extension()[0]
    assert ext.cpu_isa() == isa
    torch.manual_seed(m * 1000 + k)
    x, w = torch.randn(m, k), torch.randn(n, k)
    wq, ws = ops.quantize_weight_int8(w)
    wp, tws = ops.quantize_weight_ternary(w)
    want_i = torch.ops.accelops.int8_linear(x, wq, ws, None)
    want_t = torch.ops.accelops.ternary_matmul(x, wp, tws, None)
    for nb in (0, 4, 16, 32, 64, 128, 256):
        for kc in (0, 256, 1024, 4096):
            previous = ext.set_cpu_tiles(nb, kc)
            try:
                got_i = torch.ops.accelops.int8_linear(x, wq, ws, None)
                got_t = torch.ops.accelops.ternary_matmul(x, wp, tws, None)
            finally:
                ext.set_cpu_tiles(*previous)
            assert torch.equal(got_i, want_i), (nb, kc)
            assert torch.equal(got_t, want_t), (nb, kc)


def test_set_cpu_tiles_rejects_bad_sizes_and_returns_the_previous():
    ext = ops.ternary.extension()[0]
    assert ext.set_cpu_tiles(0, 0) == (0, 0)
    assert ext.set_cpu_tiles(32, 4096) == (0, 0)
    assert ext.set_cpu_tiles(0, 0) == (32, 4096)
    for nb, kc, what in (
        (3, 0, "n_block"),
        (260, 0, "n_block"),
        (512, 0, "n_block"),
        (-4, 0, "n_block"),
        (0, 100, "k_chunk"),
        (0, -256, "k_chunk"),
        (0, 255, "k_chunk"),
    ):
        with pytest.raises(ValueError, match=f"{what} must be 0"):
            ext.set_cpu_tiles(nb, kc)
    assert ext.set_cpu_tiles(0, 0) == (0, 0)  # a refused call changed nothing
    with pytest.raises(TypeError):
        ext.set_cpu_tiles("32", 0)


def test_table_choice_of_tile_sizes_is_used_and_restored(monkeypatch):
    ext = ops.ternary.extension()[0]
    torch.manual_seed(0)
    x = torch.randn(6, 300, requires_grad=True)
    w = torch.randn(40, 300)
    wp, ws = ops.quantize_weight_ternary(w)
    want = ops.ternary_matmul(x, wp, ws)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    e = entry("ternary_matmul", 6, 40, 300, "native", 2)
    e["winner"]["tiles"] = {"n_block": 16, "k_chunk": 256}
    table = install([e])
    assert table.lookup("ternary_matmul", (6, 40, 300)).tiles == (16, 256)
    assert table.lookup("ternary_matmul", (7, 40, 300)).tiles == (16, 256)  # predicted from its neighbour
    seen = []
    real = torch.ops.accelops.ternary_matmul
    monkeypatch.setattr(
        torch.ops.accelops,
        "ternary_matmul",
        lambda *a: seen.append(ext.set_cpu_tiles(16, 256)) or real(*a),
        raising=False,
    )
    got = ops.ternary_matmul(x, wp, ws)
    assert seen == [(16, 256)]  # the tiles were set for the call ...
    assert ext.set_cpu_tiles(0, 0) == (0, 0)  # ... and restored after it
    assert torch.equal(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    assert torch.equal(g_got, g_want)


@pytest.mark.parametrize("op", ["ternary_matmul_int_mm", "int8_linear_int_mm"])
def test_aten_int_mm_ops_pass_opcheck(op):
    torch.manual_seed(0)
    x, w = torch.randn(3, 40), torch.randn(8, 40)
    wq, ws = ops.quantize_weight_ternary(w) if op.startswith("ternary") else ops.quantize_weight_int8(w)
    torch.library.opcheck(
        getattr(torch.ops.accelops, op),
        (x, wq, ws, torch.randn(8)),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("op", ["ternary_matmul_int_mm", "int8_linear_int_mm"])
def test_aten_int_mm_ops_reject_bad_input(op):
    w = torch.randn(8, 40)
    wq, ws = ops.quantize_weight_ternary(w) if op.startswith("ternary") else ops.quantize_weight_int8(w)
    fn = getattr(torch.ops.accelops, op)
    with pytest.raises(RuntimeError, match="x must be float32"):
        fn(torch.ones(2, 40, dtype=torch.int32), wq, ws, None)
    with pytest.raises(RuntimeError, match="K=40|hold K=200"):
        fn(torch.randn(2, 200), wq, ws, None)


def test_calls_without_gradients_skip_the_autograd_kernel_with_the_same_result():
    """The op's Python autograd kernel is skipped when no input needs a gradient (a ~4.7 us
    saving a call); results are identical and gradients still flow when one is needed."""
    import accelops.ops as ops
    from accelops.ops import _tuning

    torch.manual_seed(0)
    w = torch.randn(24, 40)
    wq, ws = ops.quantize_weight_int8(w)
    wp, wts = ops.quantize_weight_ternary(w)
    x = torch.randn(3, 40)
    assert _tuning._autograd_not_needed((x, wq, ws, None))
    xg = x.clone().requires_grad_()
    assert not _tuning._autograd_not_needed((xg, wq, ws, None))
    with torch.no_grad():
        assert _tuning._autograd_not_needed((xg, wq, ws, None))
    for fn in (lambda t: ops.int8_linear(t, wq, ws), lambda t: ops.ternary_matmul(t, wp, wts, k=40)):
        y_fast = fn(x)
        y_grad = fn(xg)
        assert y_fast.grad_fn is None and y_grad.grad_fn is not None
        assert torch.equal(y_fast, y_grad.detach())
        y_grad.sum().backward()
        assert xg.grad is not None and torch.isfinite(xg.grad).all()
        xg.grad = None
    # torch.func transforms keep the full dispatch (the wrapped tensors are not plain).
    seen = []
    real = _tuning._autograd_not_needed

    def spy(args):
        seen.append(real(args))
        return seen[-1]

    _tuning._autograd_not_needed, saved = spy, _tuning._autograd_not_needed
    try:
        torch.func.vmap(lambda t: ops.int8_linear(t, wq, ws))(x.unsqueeze(1))
    finally:
        _tuning._autograd_not_needed = saved
    assert seen and not any(seen)
