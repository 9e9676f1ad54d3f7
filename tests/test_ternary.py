"""Ternary family: every backend against accelops.reference.ternary."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import accelops
from accelops import ops
from accelops import reference as R
from accelops.ops import _backend
from accelops.reference.ternary import quantize_weight_ternary_values

from .helpers import assert_close_to_reference, integer_rows

KS = [1, 3, 4, 5, 127, 128, 129, 4097]
MS = [0, 1, 17, 255]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_ternary(n, k):
    return torch.randint(-1, 2, (n, k), dtype=torch.int8)


# ------------------------------------------------------------------ packing


@pytest.mark.parametrize("k", KS + [0])
def test_pack_unpack_roundtrip(backend, k):
    wq = random_ternary(9, k)
    packed = ops.pack_ternary(wq)
    assert packed.dtype == torch.uint8 and packed.shape == (9, ops.packed_cols(k))
    assert torch.equal(packed, R.pack_ternary(wq))
    assert torch.equal(ops.unpack_ternary(packed, k), wq)


def test_packed_layout_is_documented_one():
    # weight k = 128 b + 32 j + i sits in byte 32 b + i at bits 2 j .. 2 j + 1 as code w + 1
    wq = torch.zeros(1, 256, dtype=torch.int8)
    wq[0, 128 + 32 * 2 + 5] = 1  # b=1, j=2, i=5
    packed = R.pack_ternary(wq)
    expected = torch.full((1, 64), 0b01010101, dtype=torch.uint8)
    expected[0, 32 + 5] = 0b01100101
    assert torch.equal(packed, expected)


@given(n=st.integers(1, 8), k=st.integers(1, 600), per_channel=st.booleans())
@SETTINGS
def test_quantize_weight_ternary_matches_reference(backend, n, k, per_channel):
    w = torch.randn(n, k) * torch.rand(n, 1) * 3
    packed, scale = ops.quantize_weight_ternary(w, per_channel)
    ref_packed, ref_scale = R.quantize_weight_ternary(w, per_channel)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(scale, ref_scale)
    assert scale.shape == ((n,) if per_channel else (1,))


def test_quantize_weight_ternary_is_absmean():
    w = torch.tensor([[0.1, -0.5, 2.0, 0.0], [1.0, 1.0, -1.0, 0.2]])
    wq, scale = quantize_weight_ternary_values(w)
    assert scale.item() == pytest.approx(w.abs().mean().item())
    assert wq.tolist() == [[0, -1, 1, 0], [1, 1, -1, 0]]


# ------------------------------------------------------------------ matmul


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_ternary_matmul_integer_sums_exact(backend, m, k):
    n = 13
    wq = random_ternary(n, k)
    x = integer_rows(m, k)
    y = ops.ternary_matmul(x, ops.pack_ternary(wq), torch.ones(1))
    expected = (x.double() @ wq.double().t()).float()
    assert torch.equal(y, expected)


# Shapes around every path's tiles: an odd or even number of 128-blocks (the AVX-512 path
# takes two a vector), M around the 1/2/4-row tiles, N around the 1/2/4-column tiles.
@pytest.mark.parametrize("k", [129, 255, 256, 257, 384, 2049, 4096])
@pytest.mark.parametrize("m", [2, 3, 4, 5, 7])
def test_ternary_matmul_tile_edges_exact(backend, m, k):
    n = 7
    wq = random_ternary(n, k)
    x = integer_rows(m, k)
    y = ops.ternary_matmul(x, ops.pack_ternary(wq), torch.ones(1))
    assert torch.equal(y, (x.double() @ wq.double().t()).float())


# Known limit: the AVX2 path keeps 4 x the code sums (codes {0,1,2} times x, up to
# 4 * 254 K) in int32 and is exact only for K up to 2^31 / 1016 (~2.1 million), the scalar
# path (code sums in int32) up to 2^31 / 254; the AVX-512 VNNI path keeps its sums modulo
# 2^32 and reaches the contract's 2^31 / 127. The reference is tested at the smaller K (fp64
# at K = 2^24 takes 400 MB).
def _ternary_extreme_k(backend):
    from .conftest import AUTO_ISA

    isa = backend[len("cpu-") :] if backend.startswith("cpu-") else AUTO_ISA if backend == "cpu" else "other"
    return 2**24 if isa == "avx512vnni" else 2**21  # 2^24 * 127 < 2^31 (and exact in fp32)


# m = 1 takes the GEMV kernels, whose AVX-512 path folds scaled per-slice sums in windows
# of 2^13 pairs (2^24 weights: eight windows); m = 2 the GEMM tiles.
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("wv", [1, -1])
def test_ternary_matmul_extremes_at_large_k(backend, wv, m):
    if backend == "triton":
        pytest.skip("interpreting 16M-wide rows is too slow; the Triton kernel accumulates in int32 the same way")
    k = _ternary_extreme_k(backend)
    x = torch.full((2, k), 127.0)
    x[1] = -127.0
    wq = torch.full((3, k), wv, dtype=torch.int8)
    wq[2] = 0
    y = ops.ternary_matmul(x[:m], ops.pack_ternary(wq), torch.ones(1))
    expected = torch.tensor([[127.0 * wv * k, 127.0 * wv * k, 0.0], [-127.0 * wv * k, -127.0 * wv * k, 0.0]])
    assert torch.equal(y, expected[:m])


# M = 1 takes the GEMV kernels: four weight rows a tile (N around 4), column blocks of 32
# split across threads (N around 32 and several blocks), an odd or even number of 128-blocks
# (the AVX-512 path takes two a vector), and x rows of any sign pattern.
@pytest.mark.parametrize("k", [1, 129, 255, 256, 384, 2049, 4096, 11008])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 31, 33, 70, 257])
def test_ternary_gemv_edges_exact(backend, n, k):
    wq = random_ternary(n, k)
    x = integer_rows(1, k)
    y = ops.ternary_matmul(x, ops.pack_ternary(wq), torch.ones(1))
    assert torch.equal(y, (x.double() @ wq.double().t()).float())
    y1 = ops.ternary_matmul(x[0], ops.pack_ternary(wq), torch.ones(1))  # 1-D x: M = 1 too
    assert torch.equal(y1, y[0])


# The AVX-VNNI GEMV (256-bit vpdpbusd): ACCELOPS_CPU_ISA=avxvnni runs it on a CPU with
# AVX-VNNI, and on one with AVX-512 VNNI but no AVX-VNNI through the EVEX form of the same
# instruction. Not a level of conftest's backends: it has no GEMM kernels (cpu_isas()).
def _avxvnni_gemv(monkeypatch):
    import io

    from .conftest import CPU_ISAS, use_backend

    if "avx512vnni" not in CPU_ISAS and "avxvnni" not in accelops.info(file=io.StringIO())["cpu_features"]:
        pytest.skip("this CPU has neither AVX-VNNI nor AVX-512 VNNI")
    use_backend(monkeypatch, "cpu-avxvnni")


@pytest.mark.parametrize("k", [1, 129, 255, 256, 384, 4096, 11008])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 33, 257])
def test_ternary_gemv_avxvnni_exact(monkeypatch, n, k):
    _avxvnni_gemv(monkeypatch)
    wq = random_ternary(n, k)
    x = integer_rows(1, k)
    y = ops.ternary_matmul(x, ops.pack_ternary(wq), torch.ones(1))
    assert torch.equal(y, (x.double() @ wq.double().t()).float())


@pytest.mark.parametrize("wv", [1, -1])
def test_ternary_gemv_avxvnni_extremes_at_large_k(monkeypatch, wv):
    _avxvnni_gemv(monkeypatch)
    k = 2**24  # sums kept modulo 2^32, folded every 2^16 blocks: exact to the contract's 2^31 / 127
    x = torch.full((1, k), -127.0)
    wq = torch.full((3, k), wv, dtype=torch.int8)
    wq[2] = 0
    y = ops.ternary_matmul(x, ops.pack_ternary(wq), torch.ones(1))
    assert torch.equal(y, torch.tensor([[-127.0 * wv * k, -127.0 * wv * k, 0.0]]))


@given(
    lead=st.sampled_from([(), (2,), (2, 3)]),
    m=st.sampled_from(MS),
    k=st.sampled_from(KS),
    n=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    per_channel=st.booleans(),
    with_bias=st.booleans(),
)
@SETTINGS
def test_ternary_matmul_matches_reference(backend, lead, m, k, n, dtype, per_channel, with_bias):
    w = torch.randn(n, k)
    packed, scale = R.quantize_weight_ternary(w, per_channel)
    x = torch.randn(*lead, m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = ops.ternary_matmul(x, packed, scale, bias)
    assert_close_to_reference(y, R.ternary_matmul(x, packed, scale, bias))


def test_ternary_matmul_non_contiguous(backend):
    k, n = 300, 24
    packed, scale = R.quantize_weight_ternary(torch.randn(n, k))
    x = torch.randn(k, 10).t()  # [10, K], column-major
    assert not x.is_contiguous()
    assert_close_to_reference(ops.ternary_matmul(x, packed, scale), R.ternary_matmul(x.contiguous(), packed, scale))
    xs = torch.randn(10, 2 * k)[:, ::2]
    assert_close_to_reference(ops.ternary_matmul(xs, packed, scale), R.ternary_matmul(xs.contiguous(), packed, scale))


def test_ternary_matmul_error_within_eager_bound(backend):
    """Against an fp64 evaluation of the same quantized product, accelops' error is at most
    twice what eager fp32 F.linear makes on the dequantized operands."""
    m, n, k = 9, 64, 4097
    w = torch.randn(n, k)
    packed, scale = R.quantize_weight_ternary(w, per_channel=True)
    x = torch.randn(m, k) * 4
    x_q, x_scale = R.quantize_activation_int8(x)
    wq = R.unpack_ternary(packed, k)
    exact = (x_q.double() * x_scale.double()) @ (wq.double() * scale.double()[:, None]).t()
    eager = torch.nn.functional.linear(x_q.float() * x_scale, wq.float() * scale[:, None])
    y = ops.ternary_matmul(x, packed, scale)
    eager_err = (eager.double() - exact).abs().max().item()
    assert (y.double() - exact).abs().max().item() <= 2 * eager_err + 1e-6


def test_ternary_matmul_nan_and_inf_stay_in_their_rows(backend):
    k, n = 200, 16
    packed, scale = R.quantize_weight_ternary(torch.randn(n, k))
    x = torch.randn(5, k)
    x[1, 7] = float("nan")
    x[3, 0] = float("inf")
    y = ops.ternary_matmul(x, packed, scale)
    assert torch.isnan(y[1]).all() and torch.isnan(y[3]).all()
    clean = [0, 2, 4]
    assert torch.isfinite(y[clean]).all()
    assert_close_to_reference(y[clean], R.ternary_matmul(x[clean], packed, scale))


def test_ternary_matmul_zero_rows_and_empty(backend):
    packed, scale = R.quantize_weight_ternary(torch.randn(8, 64))
    assert torch.equal(ops.ternary_matmul(torch.zeros(2, 64), packed, scale), torch.zeros(2, 8))
    empty = ops.ternary_matmul(torch.zeros(0, 64), packed, scale)
    assert empty.shape == (0, 8)
    assert ops.ternary_matmul(torch.zeros(3, 0, 64), packed, scale).shape == (3, 0, 8)


# ------------------------------------------------------------------ bad input


def test_bad_input_messages():
    packed, scale = R.quantize_weight_ternary(torch.randn(8, 64))
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16, got torch.int32"):
        ops.ternary_matmul(x.int(), packed, scale)
    with pytest.raises(ValueError, match=r"w_packed must have 64 columns .* K=200, got shape \(8, 32\)"):
        ops.ternary_matmul(torch.randn(2, 200), packed, scale)
    with pytest.raises(ValueError, match=r"w_packed must be 2-D"):
        ops.ternary_matmul(x, packed[0], scale)
    with pytest.raises(TypeError, match=r"w_packed must be torch.uint8, got torch.int8"):
        ops.ternary_matmul(x, packed.to(torch.int8), scale)
    with pytest.raises(ValueError, match=r"w_scale must hold 1 .* or N=8 .* got shape \(3,\)"):
        ops.ternary_matmul(x, packed, torch.ones(3))
    with pytest.raises(TypeError, match=r"w_scale must be torch.float32"):
        ops.ternary_matmul(x, packed, scale.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.ternary_matmul(x, packed, scale, torch.zeros(7))
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        ops.ternary_matmul(torch.tensor(1.0), packed, scale)
    with pytest.raises(ValueError, match=r"w_packed is on meta but x is on cpu"):
        ops.ternary_matmul(x, packed.to("meta"), scale)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        ops.ternary_matmul([1.0], packed, scale)
    with pytest.raises(ValueError, match=r"wq must hold only -1, 0 and 1"):
        ops.pack_ternary(torch.full((2, 3), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"w must be finite"):
        ops.quantize_weight_ternary(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"k must be a non-negative int"):
        ops.unpack_ternary(packed, -1)
    with pytest.raises(ValueError, match=r"ACCELOPS_BACKEND must be one of"):
        import os

        os.environ["ACCELOPS_BACKEND"] = "gpu"
        try:
            ops.ternary_matmul(x, packed, scale)
        finally:
            del os.environ["ACCELOPS_BACKEND"]


@given(
    k=st.integers(1, 300),
    cols=st.integers(0, 96),
)
@settings(max_examples=30, deadline=None)
def test_packed_shape_that_cannot_hold_k_is_rejected(k, cols):
    packed = torch.full((4, cols), 0x55, dtype=torch.uint8)  # all zero weights: padding as packing leaves it
    if cols == ops.packed_cols(k):
        assert ops.ternary_matmul(torch.randn(1, k), packed, torch.ones(1)).shape == (1, 4)
    else:
        with pytest.raises(ValueError, match=f"to hold K={k}"):
            ops.ternary_matmul(torch.randn(1, k), packed, torch.ones(1))


def test_missing_extension(monkeypatch):
    packed, scale = R.quantize_weight_ternary(torch.randn(8, 64))
    x = torch.randn(2, 64)
    monkeypatch.setattr(_backend, "extension", lambda: (None, "accelops._C could not be imported (simulated)"))
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setenv("ACCELOPS_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match=r"ACCELOPS_BACKEND=cpu but accelops._C could not be imported \(simulated\)"):
        ops.ternary_matmul(x, packed, scale)
    monkeypatch.delenv("ACCELOPS_BACKEND")
    with pytest.warns(RuntimeWarning, match="falling back to the PyTorch reference"):
        y = ops.ternary_matmul(x, packed, scale)
    assert torch.equal(y, R.ternary_matmul(x, packed, scale))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.ternary_matmul(x, packed, scale)  # warned once only


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    packed, scale = R.quantize_weight_ternary(torch.randn(8, 64))
    monkeypatch.setenv("ACCELOPS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.ternary_matmul(torch.randn(2, 64), packed, scale)


# ------------------------------------------------------------------ torch.library


def _opcheck_cases():
    w = torch.randn(12, 200)
    packed, scale = R.quantize_weight_ternary(w, per_channel=True)
    x = torch.randn(3, 200, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    return [
        (torch.ops.accelops.pack_ternary, (quantize_weight_ternary_values(w)[0],)),
        (torch.ops.accelops.unpack_ternary, (packed, 200)),
        (torch.ops.accelops.quantize_weight_ternary, (w, True)),
        (torch.ops.accelops.quantize_weight_ternary, (w, False)),
        (torch.ops.accelops.ternary_matmul, (x, packed, scale, bias)),
        (torch.ops.accelops.ternary_matmul, (torch.randn(2, 5, 200).bfloat16(), packed, scale[:1], None)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_straight_through_gradient():
    k, n = 130, 6
    packed, scale = R.quantize_weight_ternary(torch.randn(n, k), per_channel=True)
    x = torch.randn(4, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    y = ops.ternary_matmul(x, packed, scale, bias)
    g = torch.randn_like(y)
    y.backward(g)
    w_deq = R.unpack_ternary(packed, k).float() * scale[:, None]
    torch.testing.assert_close(x.grad, g @ w_deq)
    torch.testing.assert_close(bias.grad, g.sum(0))


def test_torch_compile_fullgraph():
    packed, scale = R.quantize_weight_ternary(torch.randn(16, 64))

    def f(x):
        return torch.relu(ops.ternary_matmul(x, packed, scale)) * 2

    x = torch.randn(3, 64)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))


def test_info_reports_backends(capsys):
    d = accelops.info()
    out = capsys.readouterr().out
    assert d["cpu_extension"] and d["cpu_isa"] in ("avx512vnni", "avx2", "scalar")
    from .conftest import AUTO_ISA

    assert d["cpu_isa"] == AUTO_ISA
    assert "cpu (C++)" in out and "triton" in out and "reference" in out


def test_info_cpu_features_read_linux_spellings():
    from accelops._info import cpu_features

    assert cpu_features({"avx2", "avx512f", "avx512_vnni", "avx_vnni"}) == ["avx2", "avx512f", "avx512vnni", "avxvnni"]
    assert cpu_features({"avx2", "fma"}) == ["avx2", "fma"]


def test_k_zero(backend):
    packed, scale = ops.quantize_weight_ternary(torch.randn(4, 0))
    assert packed.shape == (4, 0)
    bias = torch.randn(4)
    assert torch.equal(ops.ternary_matmul(torch.randn(2, 3, 0), packed, scale, bias), bias.expand(2, 3, 4))
