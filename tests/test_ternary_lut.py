"""The lut3 ternary format (lookup-table GEMV): packing against the spec, every CPU path
exact against the reference, conversion to and from the 2-bit format, TernaryLinear with
format="lut3", bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelops import ops
from accelops.nn import TernaryLinear
from accelops.reference import ternary as R
from accelops.reference import ternary_lut as RL

from .conftest import isa_skip_reason, use_backend
from .helpers import assert_close_to_reference, integer_rows

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# The lut3 kernel has no Triton version; "cpu" is the widest path (AVX-512 on an AVX-512 machine).
LUT_BACKENDS = ["reference", "cpu", "cpu-avx512vnni", "cpu-avx2", "cpu-scalar"]


@pytest.fixture(params=LUT_BACKENDS)
def backend(request, monkeypatch):
    reason = isa_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    use_backend(monkeypatch, request.param)
    return request.param


def random_ternary(n, k):
    return torch.randint(-1, 2, (n, k), dtype=torch.int8)


def exact(x, wq):
    return (x.double() @ wq.double().t()).float()


# ------------------------------------------------------------------ format


def test_layout_is_the_documented_one():
    # weight k of row r: word k // 9 of block r // 32, lane r % 32, group (k % 9) // 3,
    # digit k % 3, as the code w + 1.
    n, k = 35, 20
    wq = random_ternary(n, k)
    w_lut = ops.pack_ternary_lut(wq)
    assert w_lut.shape == (2, 3, 32) and w_lut.dtype == torch.int16
    for r in (0, 31, 34):
        for kk in (0, 4, 8, 9, 19):
            word = int(w_lut[r // 32, kk // 9, r % 32]) & 0xFFFF
            index = (word >> (5 * ((kk % 9) // 3))) & 31
            assert (index // 3 ** (kk % 3)) % 3 - 1 == int(wq[r, kk])
    # padding (rows >= 35, weights >= 20) holds zero weights: index 13 in every field
    assert int(w_lut[1, 0, 3]) == 13 | 13 << 5 | 13 << 10
    assert (int(w_lut[0, 2, 0]) >> 10) & 31 == 13


@given(n=st.integers(0, 70), k=st.integers(0, 40))
@settings(max_examples=40, deadline=None)
def test_pack_unpack_and_convert_roundtrip(n, k):
    wq = random_ternary(n, k)
    w_lut = ops.pack_ternary_lut(wq)
    assert torch.equal(ops.unpack_ternary_lut(w_lut, n, k), wq)
    packed = R.pack_ternary(wq)
    assert torch.equal(ops.convert_ternary_format(packed, "i2", "lut3", n=n, k=k), w_lut)
    assert torch.equal(ops.convert_ternary_format(w_lut, "lut3", "i2", n=n, k=k), packed)
    assert torch.equal(ops.convert_ternary_format(w_lut, "lut3", "lut3", n=n, k=k), w_lut)


# ------------------------------------------------------------------ matmul


# M = 1 around the kernels' tiles: blocks of 32 rows (N around 32, 64 and the 4-block tile
# of 128 rows), words of 9 weights (K not a multiple of 9 or 3), windows of 28 words
# (K around 252) before the int16 sums widen.
@pytest.mark.parametrize("k", [1, 2, 3, 8, 9, 10, 251, 252, 253, 4096, 11008])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 97, 129, 257])
def test_gemv_exact(backend, n, k):
    wq = random_ternary(n, k)
    x = integer_rows(1, k)
    y = ops.ternary_matmul_lut(x, ops.pack_ternary_lut(wq), torch.ones(1), n=n)
    assert torch.equal(y, exact(x, wq))
    # the same call through ternary_matmul's format argument, and a 1-D x
    y1 = ops.ternary_matmul(x[0], ops.pack_ternary_lut(wq), torch.ones(1), format="lut3", n=n)
    assert torch.equal(y1, y[0])


@pytest.mark.parametrize("m", [0, 2, 5])
def test_small_m_exact(backend, m):
    n, k = 45, 300
    wq = random_ternary(n, k)
    x = integer_rows(m, k)
    y = ops.ternary_matmul_lut(x, ops.pack_ternary_lut(wq), torch.ones(1), n=n)
    assert torch.equal(y, exact(x, wq))


@pytest.mark.parametrize("n, k", [(5, 0), (0, 7), (0, 0)])
def test_empty(backend, n, k):
    w_lut = ops.pack_ternary_lut(torch.zeros(n, k, dtype=torch.int8))
    for x in (torch.randn(2, k), torch.randn(0, k), torch.randn(3, 0, k)):
        y = ops.ternary_matmul_lut(x, w_lut, torch.ones(1), n=n)
        assert y.shape == (*x.shape[:-1], n) and torch.equal(y, torch.zeros_like(y))


# Every table entry at its largest magnitude: all activations -127 or 127 and all weights
# one sign, so each group adds +-381 and each int16 window sits at its bound.
@pytest.mark.parametrize("wv", [1, -1])
def test_extremes(backend, wv):
    k = 9 * 28 * 40 + 5
    x = torch.full((2, k), 127.0)
    x[1] = -127.0
    wq = torch.full((33, k), wv, dtype=torch.int8)
    wq[32] = 0
    y = ops.ternary_matmul_lut(x, ops.pack_ternary_lut(wq), torch.ones(1), n=33)
    assert torch.equal(y, exact(x, wq))


@given(
    lead=st.sampled_from([(), (2,)]),
    m=st.sampled_from([1, 3]),
    k=st.integers(1, 600),
    n=st.integers(1, 80),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    per_channel=st.booleans(),
    with_bias=st.booleans(),
)
@SETTINGS
def test_matches_the_two_bit_format(backend, lead, m, k, n, dtype, per_channel, with_bias):
    w = torch.randn(n, k)
    packed, scale = R.quantize_weight_ternary(w, per_channel)
    w_lut = ops.convert_ternary_format(packed, "i2", "lut3", n=n, k=k)
    x = torch.randn(*lead, m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = ops.ternary_matmul(x, w_lut, scale, bias, format="lut3", n=n, k=k)
    assert_close_to_reference(y, R.ternary_matmul(x, packed, scale, bias))
    assert_close_to_reference(y, RL.ternary_matmul_lut(x, w_lut, scale, n, bias))


def test_opcheck_and_gradient():
    n, k = 12, 200
    packed, scale = R.quantize_weight_ternary(torch.randn(n, k), per_channel=True)
    w_lut = ops.convert_ternary_format(packed, "i2", "lut3", n=n, k=k)
    x = torch.randn(3, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    torch.library.opcheck(torch.ops.accelops.ternary_matmul_lut, (x, w_lut, scale, n, bias))
    ops.ternary_matmul_lut(x, w_lut, scale, bias, n=n).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_()
    ops.ternary_matmul(x2, packed, scale, bias2).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(bias.grad, bias2.grad)


# ------------------------------------------------------------------ bad input


def test_bad_input_messages():
    n, k = 8, 64
    wq = random_ternary(n, k)
    w_lut, packed, scale = ops.pack_ternary_lut(wq), R.pack_ternary(wq), torch.ones(1)
    x = torch.randn(2, k)
    with pytest.raises(
        ValueError, match=r"w_lut must have shape \(1, 23, 32\) .* for N=8, K=200, got shape \(1, 8, 32\)"
    ):
        ops.ternary_matmul_lut(torch.randn(2, 200), w_lut, scale, n=n)
    with pytest.raises(ValueError, match=r"w_lut must have shape \(2, 8, 32\) .* for N=40"):
        ops.ternary_matmul_lut(x, w_lut, scale, n=40)
    with pytest.raises(TypeError, match=r"w_lut must be torch.int16, got torch.uint8"):
        ops.ternary_matmul(x, packed, scale, format="lut3", n=n)  # a 2-bit weight given as lut3
    with pytest.raises(ValueError, match=r"w_lut must be 3-D"):
        ops.ternary_matmul_lut(x, w_lut[0], scale, n=n)
    with pytest.raises(ValueError, match=r"x's last dim must equal k=63"):
        ops.ternary_matmul_lut(x, w_lut, scale, n=n, k=63)
    with pytest.raises(ValueError, match=r"format='lut3' needs n="):
        ops.ternary_matmul(x, w_lut, scale, format="lut3")
    with pytest.raises(ValueError, match=r"format must be one of \('i2', 'lut3', 'base3'\), got 'tl2'"):
        ops.ternary_matmul(x, w_lut, scale, format="tl2", n=n)
    with pytest.raises(ValueError, match=r"n= applies to format='lut3' and 'base3' only"):
        ops.ternary_matmul(x, packed, scale, n=n)
    with pytest.raises(ValueError, match=r"w_scale must hold 1 .* or N=8"):
        ops.ternary_matmul_lut(x, w_lut, torch.ones(3), n=n)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.ternary_matmul_lut(x, w_lut, scale, torch.zeros(7), n=n)
    with pytest.raises(ValueError, match=r"n must be a non-negative int"):
        ops.ternary_matmul_lut(x, w_lut, scale, n=-1)
    with pytest.raises(ValueError, match=r"wq must hold only -1, 0 and 1"):
        ops.pack_ternary_lut(torch.full((2, 3), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"dst must be one of"):
        ops.convert_ternary_format(packed, "i2", "tl2", n=n, k=k)
    with pytest.raises(ValueError, match=r"w_packed must have 96 columns .* K=300, got shape \(8, 32\)"):
        ops.convert_ternary_format(packed, "i2", "lut3", n=n, k=300)


def test_cpp_kernel_checks_shapes():
    w_lut = ops.pack_ternary_lut(random_ternary(8, 64))
    with pytest.raises(RuntimeError, match=r"w_lut must have shape \[ceil\(N/32\), ceil\(K/9\), 32\]"):
        torch.ops.accelops.ternary_matmul_lut(torch.randn(1, 80), w_lut, torch.ones(1), 8, None)
    with pytest.raises(RuntimeError, match=r"w_lut must be int16"):
        torch.ops.accelops.ternary_matmul_lut(torch.randn(1, 64), w_lut.to(torch.int32), torch.ones(1), 8, None)


# ------------------------------------------------------------------ TernaryLinear


def test_layer_formats_convert_both_ways():
    lin = torch.nn.Linear(100, 37)
    a = TernaryLinear.from_linear(lin, per_channel=True)
    b = TernaryLinear.from_linear(lin, per_channel=True, format="lut3")
    assert "w_lut" in b.state_dict() and "w_packed" not in b.state_dict()
    assert "format='lut3'" in repr(b)
    x = torch.randn(1, 100)
    assert torch.equal(a(x), b(x)) and torch.equal(a.weight, b.weight)
    c = TernaryLinear(100, 37, per_channel=True).to_format("lut3")
    c.load_state_dict(b.state_dict())
    assert torch.equal(c(x), a(x))
    assert c.to_format("i2") is c and torch.equal(c.w_packed, a.w_packed) and not hasattr(c, "w_lut")
    # a checkpoint of the other format is repacked on load, either way
    d = TernaryLinear(100, 37, per_channel=True, format="lut3")
    d.load_state_dict(a.state_dict())
    assert torch.equal(d.w_lut, b.w_lut)
    e = TernaryLinear(100, 37, per_channel=True)
    e.load_state_dict(b.state_dict())
    assert torch.equal(e.w_packed, a.w_packed)
    # and an nn.Linear checkpoint is quantized into the layer's format
    f = TernaryLinear(100, 37, per_channel=True, format="lut3")
    f.load_state_dict(lin.state_dict())
    assert torch.equal(f.w_lut, b.w_lut)


def test_layer_bad_format():
    with pytest.raises(ValueError, match=r"format must be one of \('i2', 'lut3', 'base3'\), got 'tl2'"):
        TernaryLinear(8, 8, format="tl2")
    with pytest.raises(ValueError, match=r"format must be one of"):
        TernaryLinear(8, 8).to_format("tl2")
    layer = TernaryLinear(64, 8, format="lut3")
    state = layer.state_dict()
    state["w_lut"] = state["w_lut"][:, :3]
    with pytest.raises(RuntimeError, match=r"size mismatch for w_lut: .* expects shape \(1, 8, 32\)"):
        layer.load_state_dict(state)
