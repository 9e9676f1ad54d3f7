"""The base3 ternary format (five weights a byte): packing against the spec, every CPU path
exact against the reference (every byte value included), conversion to and from the other
formats, TernaryLinear with format="base3", bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelops import ops
from accelops.nn import TernaryLinear
from accelops.reference import ternary as R
from accelops.reference import ternary_base3 as RB

from .conftest import isa_skip_reason, use_backend
from .helpers import assert_close_to_reference, integer_rows

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# No Triton version; "cpu" is the widest path (the VBMI kernel on an AVX-512 VBMI machine).
B3_BACKENDS = ["reference", "cpu", "cpu-avx512vnni", "cpu-avx2", "cpu-scalar"]


@pytest.fixture(params=B3_BACKENDS)
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
    # weight k of row r: byte 64 (k // 320) + k % 64 of row r, digit (k % 320) // 64, as w + 1
    n, k = 3, 700
    wq = random_ternary(n, k)
    w_b3 = ops.pack_ternary_base3(wq)
    assert w_b3.shape == (3, 192) and w_b3.dtype == torch.uint8
    for r in range(n):
        for kk in (0, 63, 64, 319, 320, 383, 699):
            byte = int(w_b3[r, 64 * (kk // 320) + kk % 64])
            assert byte // 3 ** ((kk % 320) // 64) % 3 - 1 == int(wq[r, kk])
    # padding (weights >= 700) holds zero weights: digit 1
    assert int(w_b3[0, 64 * 2 + 63]) // 3**4 % 3 == 1  # k = 640 + 256 + 63 = 959
    assert int(ops.pack_ternary_base3(torch.zeros(1, 1, dtype=torch.int8))[0, 1]) == RB.ZERO_BYTE


@given(n=st.integers(0, 9), k=st.integers(0, 700))
@settings(max_examples=40, deadline=None)
def test_pack_unpack_and_convert_roundtrip(n, k):
    wq = random_ternary(n, k)
    w_b3 = ops.pack_ternary_base3(wq)
    assert w_b3.numel() == 0 or int(w_b3.max()) <= 242
    assert torch.equal(ops.unpack_ternary_base3(w_b3, k), wq)
    packed, w_lut = R.pack_ternary(wq), ops.pack_ternary_lut(wq)
    for src, w in (("i2", packed), ("lut3", w_lut), ("base3", w_b3)):
        assert torch.equal(ops.convert_ternary_format(w, src, "base3", n=n, k=k), w_b3)
    assert torch.equal(ops.convert_ternary_format(w_b3, "base3", "i2", n=n, k=k), packed)
    assert torch.equal(ops.convert_ternary_format(w_b3, "base3", "lut3", n=n, k=k), w_lut)


# ------------------------------------------------------------------ matmul


def test_every_byte_value_decodes_as_the_spec(backend):
    # Row v holds byte v everywhere (bytes 243-255 included: the spec's rule gives them
    # digits too), so each path's decode is checked for all 256 values against the spec.
    k = 3 * 320 - 7
    w_b3 = torch.arange(256, dtype=torch.uint8).reshape(256, 1).repeat(1, RB.base3_cols(k))
    x = integer_rows(1, k)
    y = ops.ternary_matmul_base3(x, w_b3, torch.ones(1), k=k)  # bytes fill the padding too
    assert torch.equal(y, exact(x, (RB.digits(w_b3)[:, :k] - 1).to(torch.int8)))


# M = 1 around the kernel's tiles: tiles of 4 rows and tasks of 32 (N around 4, 32),
# blocks of 320 weights (K not a multiple of 320 or 64).
@pytest.mark.parametrize("k", [1, 63, 64, 319, 320, 321, 1000, 2560, 6912])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 31, 33, 67])
def test_gemv_exact(backend, n, k):
    wq = random_ternary(n, k)
    x = integer_rows(1, k)
    w_b3 = ops.pack_ternary_base3(wq)
    y = ops.ternary_matmul_base3(x, w_b3, torch.ones(1))
    assert torch.equal(y, exact(x, wq))
    # the same call through ternary_matmul's format argument, and a 1-D x
    y1 = ops.ternary_matmul(x[0], w_b3, torch.ones(1), format="base3", n=n, k=k)
    assert torch.equal(y1, y[0])


@given(n=st.integers(1, 40), k=st.integers(1, 1400), m=st.integers(1, 3))
@SETTINGS
def test_exact_hypothesis(backend, n, k, m):
    wq = random_ternary(n, k)
    x = integer_rows(m, k)
    assert torch.equal(ops.ternary_matmul_base3(x, ops.pack_ternary_base3(wq), torch.ones(1)), exact(x, wq))


@pytest.mark.parametrize("n, k", [(5, 0), (0, 7), (0, 0)])
def test_empty(backend, n, k):
    w_b3 = ops.pack_ternary_base3(torch.zeros(n, k, dtype=torch.int8))
    for x in (torch.randn(2, k), torch.randn(0, k), torch.randn(3, 0, k)):
        y = ops.ternary_matmul_base3(x, w_b3, torch.ones(1))
        assert y.shape == (*x.shape[:-1], n) and torch.equal(y, torch.zeros_like(y))


# All activations +-127 and all weights one sign: each scaled accumulator at its largest.
@pytest.mark.parametrize("wv", [1, -1])
def test_extremes(backend, wv):
    k = 320 * 70 + 5
    x = torch.full((2, k), 127.0)
    x[1] = -127.0
    wq = torch.full((5, k), wv, dtype=torch.int8)
    wq[4] = 0
    y = ops.ternary_matmul_base3(x, ops.pack_ternary_base3(wq), torch.ones(1))
    assert torch.equal(y, exact(x, wq))


@given(
    lead=st.sampled_from([(), (2,)]),
    m=st.sampled_from([1, 3]),
    k=st.integers(1, 700),
    n=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    per_channel=st.booleans(),
    with_bias=st.booleans(),
)
@SETTINGS
def test_matches_the_two_bit_format(backend, lead, m, k, n, dtype, per_channel, with_bias):
    w = torch.randn(n, k)
    packed, scale = R.quantize_weight_ternary(w, per_channel)
    w_b3 = ops.convert_ternary_format(packed, "i2", "base3", n=n, k=k)
    x = torch.randn(*lead, m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = ops.ternary_matmul(x, w_b3, scale, bias, format="base3", k=k)
    # bit for bit the 2-bit format's result on the same machine
    assert torch.equal(y, ops.ternary_matmul(x, packed, scale, bias, k=k))
    assert_close_to_reference(y, RB.ternary_matmul_base3(x, w_b3, scale, bias))


def test_opcheck_and_gradient():
    n, k = 12, 400
    packed, scale = R.quantize_weight_ternary(torch.randn(n, k), per_channel=True)
    w_b3 = ops.convert_ternary_format(packed, "i2", "base3", n=n, k=k)
    x = torch.randn(3, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    torch.library.opcheck(torch.ops.accelops.ternary_matmul_base3, (x, w_b3, scale, bias))
    ops.ternary_matmul_base3(x, w_b3, scale, bias).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_()
    ops.ternary_matmul(x2, packed, scale, bias2).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(bias.grad, bias2.grad)


# ------------------------------------------------------------------ bad input


def test_bad_input_messages():
    n, k = 8, 64
    wq = random_ternary(n, k)
    w_b3, packed, scale = ops.pack_ternary_base3(wq), R.pack_ternary(wq), torch.ones(1)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match=r"w_b3 must have 128 columns \(ceil\(K/320\)\*64\) to hold K=400, got shape"):
        ops.ternary_matmul_base3(torch.randn(2, 400), w_b3, scale)
    with pytest.raises(TypeError, match=r"w_b3 must be torch.uint8, got torch.int16"):
        ops.ternary_matmul(x, ops.pack_ternary_lut(wq), scale, format="base3")  # a lut3 weight given as base3
    with pytest.raises(ValueError, match=r"w_b3 must have 64 columns .* got shape \(8, 32\)"):
        ops.ternary_matmul(x, packed, scale, format="base3")  # a 2-bit weight given as base3
    with pytest.raises(ValueError, match=r"w_b3 must be 2-D"):
        ops.ternary_matmul_base3(x, w_b3[0], scale)
    with pytest.raises(ValueError, match=r"x's last dim must equal k=63"):
        ops.ternary_matmul_base3(x, w_b3, scale, k=63)
    with pytest.raises(ValueError, match=r"n=9 does not match w_packed's 8 rows"):
        ops.ternary_matmul(x, w_b3, scale, format="base3", n=9)
    with pytest.raises(ValueError, match=r"w_scale must hold 1 .* or N=8"):
        ops.ternary_matmul_base3(x, w_b3, torch.ones(3))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.ternary_matmul_base3(x, w_b3, scale, torch.zeros(7))
    with pytest.raises(ValueError, match=r"wq must hold only -1, 0 and 1"):
        ops.pack_ternary_base3(torch.full((2, 3), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"k must be a non-negative int"):
        ops.unpack_ternary_base3(w_b3, -1)
    with pytest.raises(ValueError, match=r"w_b3 has 8 rows, n=9"):
        ops.convert_ternary_format(w_b3, "base3", "i2", n=9, k=k)
    with pytest.raises(TypeError, match=r"missing 1 required keyword-only argument: 'k'"):
        ops.convert_ternary_format(w_b3, "base3", "i2", n=n)


def test_cpp_kernel_checks_shapes():
    w_b3 = ops.pack_ternary_base3(random_ternary(8, 64))
    with pytest.raises(RuntimeError, match=r"w_b3 must have shape \[N, ceil\(K/320\)\*64\] = \[N, 128\] for K=400"):
        torch.ops.accelops.ternary_matmul_base3(torch.randn(1, 400), w_b3, torch.ones(1), None)
    with pytest.raises(RuntimeError, match=r"w_b3 must be uint8"):
        torch.ops.accelops.ternary_matmul_base3(torch.randn(1, 64), w_b3.to(torch.int16), torch.ones(1), None)


# ------------------------------------------------------------------ TernaryLinear


def test_layer_base3_and_state_dict():
    lin = torch.nn.Linear(700, 37)
    a = TernaryLinear.from_linear(lin, per_channel=True)
    b = TernaryLinear.from_linear(lin, per_channel=True, format="base3")
    assert "w_b3" in b.state_dict() and "w_packed" not in b.state_dict()
    assert "format='base3'" in repr(b)
    x = torch.randn(1, 700)
    assert torch.equal(a(x), b(x)) and torch.equal(a.weight, b.weight)
    c = TernaryLinear(700, 37, per_channel=True, format="base3")
    c.load_state_dict(b.state_dict())
    assert torch.equal(c(x), a(x))
    assert c.to_format("lut3") is c and not hasattr(c, "w_b3") and torch.equal(c(x), a(x))
    assert torch.equal(c.to_format("base3").w_b3, b.w_b3)
    # a checkpoint of another format is repacked on load, either way
    d = TernaryLinear(700, 37, per_channel=True, format="base3")
    d.load_state_dict(a.state_dict())
    assert torch.equal(d.w_b3, b.w_b3)
    e = TernaryLinear(700, 37, per_channel=True, format="lut3")
    e.load_state_dict(b.state_dict())
    assert torch.equal(e.to_format("i2").w_packed, a.w_packed)
    # an nn.Linear checkpoint is quantized into the layer's format
    f = TernaryLinear(700, 37, per_channel=True, format="base3")
    f.load_state_dict(lin.state_dict())
    assert torch.equal(f.w_b3, b.w_b3)
    # a wrong-shaped buffer is named
    state = b.state_dict()
    state["w_b3"] = state["w_b3"][:, :64]
    with pytest.raises(RuntimeError, match=r"size mismatch for w_b3: .* expects shape \(37, 192\)"):
        TernaryLinear(700, 37, per_channel=True, format="base3").load_state_dict(state)


def test_without_k_a_weight_packed_for_a_larger_k_is_refused():
    """w_b3's shape gives K only rounded up to 320: without k=, an x whose K stops inside the
    last block must not read a larger packing's weights as zero padding."""
    wq = torch.randint(-1, 2, (6, 310), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    wq[:, 300:] = 1  # nonzero weights where a packing for K=300 would hold zeros
    w_b3 = ops.pack_ternary_base3(wq)
    scale = torch.ones(6)
    with pytest.raises(ValueError, match="packed for a larger K"):
        ops.ternary_matmul_base3(torch.randn(2, 300), w_b3, scale)
    with pytest.raises(ValueError, match="must equal k=310"):
        ops.ternary_matmul_base3(torch.randn(2, 300), w_b3, scale, k=310)
    ops.ternary_matmul_base3(torch.randn(2, 310), w_b3, scale)  # the right K runs
    exact = ops.pack_ternary_base3(wq[:, :300].contiguous())  # a packing for K=300 passes
    ops.ternary_matmul_base3(torch.randn(2, 300), exact, scale)
