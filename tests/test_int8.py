"""INT8 family: every backend against accelops.reference.int8."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelops import ops
from accelops import reference as R

from .helpers import assert_close_to_reference, integer_rows

KS = [1, 3, 4, 5, 127, 4097]
MS = [0, 1, 17, 255]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@given(
    lead=st.sampled_from([(), (3,), (2, 2)]),
    m=st.sampled_from(MS),
    k=st.sampled_from(KS + [0, 64, 300]),
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([1e-8, 1.0, 1e4]),
)
@SETTINGS
def test_quantize_activation_matches_reference(backend, lead, m, k, dtype, magnitude):
    x = (torch.randn(*lead, m, k) * magnitude).to(dtype)
    q, s = ops.quantize_activation_int8(x)
    rq, rs = R.quantize_activation_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == (*x.shape[:-1], 1)
    assert torch.equal(q, rq)
    assert torch.equal(s, rs)


def test_quantize_activation_properties(backend):
    x = torch.randn(6, 100)
    x[2] = 0
    x[4, 3] = float("nan")
    x[5, 9] = float("-inf")
    q, s = ops.quantize_activation_int8(x)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q[2], torch.zeros(100, dtype=torch.int8)) and torch.isfinite(s[2]).all()
    assert torch.equal(q[4], torch.zeros(100, dtype=torch.int8)) and torch.isnan(s[4]).all()
    assert torch.equal(q[5], torch.zeros(100, dtype=torch.int8)) and torch.isnan(s[5]).all()
    deq = q[[0, 1, 3]].float() * s[[0, 1, 3]]
    assert ((deq - x[[0, 1, 3]]).abs() <= s[[0, 1, 3]] / 2 + 1e-7).all()


@given(n=st.integers(1, 20), k=st.sampled_from(KS), scale=st.sampled_from([1e-3, 1.0, 50.0]))
@SETTINGS
def test_quantize_weight_int8_matches_reference(backend, n, k, scale):
    w = torch.randn(n, k) * scale
    q, s = ops.quantize_weight_int8(w)
    rq, rs = R.quantize_weight_int8(w)
    assert torch.equal(q, rq) and torch.equal(s, rs) and s.shape == (n,)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_int8_matmul_integer_sums_exact(backend, m, k):
    n = 11
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8)  # the full int8 range, -128 too
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    y = ops.int8_matmul(x_q, torch.ones(m, 1), w_q, torch.ones(n))
    expected = x_q.long() @ w_q.long().t()
    assert torch.equal(y.double(), expected.double())


# Shapes around every path's tiles: K around the 16/32/64-byte vectors and the 2048 chunk,
# M around the 1/3/4-row tiles, N around the 1/2/3/4-column tiles.
@pytest.mark.parametrize("k", [1, 15, 63, 64, 65, 2047, 2049])
@pytest.mark.parametrize("m", [2, 3, 4, 5, 7])
def test_int8_matmul_tile_edges_exact(backend, m, k):
    n = 9
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    x_q[0, 0] = -128  # a user's x_q may hold -128
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    y = ops.int8_matmul(x_q, torch.ones(m, 1), w_q, torch.ones(n))
    assert torch.equal(y.double(), (x_q.long() @ w_q.long().t()).double())


@pytest.mark.parametrize("xv,wv", [(-128, -128), (127, 127), (-128, 127), (127, -128), (0, -128)])
def test_int8_matmul_extremes_at_the_contract_limit(backend, xv, wv):
    """K = 2^31 / 128^2 - 1, every product at its extreme: the largest sums the contract
    promises (the VNNI path's x + 128 sums pass 2^31 here and must wrap back exactly)."""
    k = 2**31 // 128**2 - 1
    x_q = torch.full((3, k), xv, dtype=torch.int8)
    x_q[1, ::2] = 0
    w_q = torch.full((5, k), wv, dtype=torch.int8)
    y = ops.int8_matmul(x_q, torch.ones(3, 1), w_q, torch.ones(5))
    expected = (x_q.double() @ w_q.double().t()).float()  # the op's own fp32 rounding of the exact sum
    assert torch.equal(y, expected)


def test_int8_matmul_non_contiguous_x_q(backend):
    w_q = torch.randint(-128, 128, (6, 130), dtype=torch.int8)
    x_q = torch.randint(-128, 128, (130, 5), dtype=torch.int8).t()
    assert not x_q.is_contiguous()
    y = ops.int8_matmul(x_q, torch.ones(5, 1), w_q, torch.ones(6))
    assert torch.equal(y.double(), (x_q.long() @ w_q.long().t()).double())
    y = ops.int8_matmul(x_q[:, ::2], torch.ones(5, 1), w_q[:, ::2], torch.ones(6))
    assert torch.equal(y.double(), (x_q[:, ::2].long() @ w_q[:, ::2].long().t()).double())


def test_forced_cpu_isa_is_the_one_in_use(backend):
    import accelops._C as C

    from .conftest import AUTO_ISA

    if backend.startswith("cpu-"):
        assert C.cpu_isa() == backend[len("cpu-") :]
    elif backend == "cpu":
        assert C.cpu_isa() == AUTO_ISA


def test_bad_cpu_isa_is_rejected(monkeypatch):
    monkeypatch.setenv("ACCELOPS_BACKEND", "cpu")
    monkeypatch.setenv("ACCELOPS_CPU_ISA", "avx1024")
    w_q = torch.ones(2, 8, dtype=torch.int8)
    with pytest.raises((RuntimeError, ValueError), match="ACCELOPS_CPU_ISA must be one of scalar, avx2"):
        ops.int8_linear(torch.randn(1, 8), w_q, torch.ones(2))


@given(
    lead=st.sampled_from([(), (2,), (2, 3)]),
    m=st.sampled_from(MS),
    k=st.sampled_from(KS),
    n=st.integers(1, 40),
    out_dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
)
@SETTINGS
def test_int8_matmul_matches_reference(backend, lead, m, k, n, out_dtype, with_bias):
    x_q = torch.randint(-127, 128, (*lead, m, k), dtype=torch.int8)
    x_scale = torch.rand(*lead, m, 1) + 0.01
    w_q, w_scale = R.quantize_weight_int8(torch.randn(n, k))
    bias = torch.randn(n) if with_bias else None
    y = ops.int8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    assert_close_to_reference(y, R.int8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype))


@given(
    lead=st.sampled_from([(), (2,), (2, 3)]),
    m=st.sampled_from(MS),
    k=st.sampled_from(KS),
    n=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
)
@SETTINGS
def test_int8_linear_matches_reference(backend, lead, m, k, n, dtype, with_bias):
    x = torch.randn(*lead, m, k).to(dtype)
    w_q, w_scale = R.quantize_weight_int8(torch.randn(n, k))
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = ops.int8_linear(x, w_q, w_scale, bias)
    assert y.dtype == dtype
    assert_close_to_reference(y, R.int8_linear(x, w_q, w_scale, bias))


def test_int8_linear_integer_exact(backend):
    x = integer_rows(17, 4097)
    w_q = torch.randint(-127, 128, (9, 4097), dtype=torch.int8)
    y = ops.int8_linear(x, w_q, torch.ones(9))
    assert torch.equal(y.double(), x.double() @ w_q.double().t())


def test_int8_linear_non_contiguous_and_nan_rows(backend):
    w_q, w_scale = R.quantize_weight_int8(torch.randn(16, 300))
    x = torch.randn(300, 6).t()
    assert_close_to_reference(ops.int8_linear(x, w_q, w_scale), R.int8_linear(x.contiguous(), w_q, w_scale))
    x = torch.randn(4, 300)
    x[2, 5] = float("nan")
    y = ops.int8_linear(x, w_q, w_scale)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()


def test_int8_linear_error_within_eager_bound(backend):
    m, n, k = 7, 48, 4097
    w_q, w_scale = R.quantize_weight_int8(torch.randn(n, k))
    x = torch.randn(m, k) * 3
    x_q, x_scale = R.quantize_activation_int8(x)
    exact = (x_q.double() * x_scale.double()) @ (w_q.double() * w_scale.double()[:, None]).t()
    eager = torch.nn.functional.linear(x_q.float() * x_scale, w_q.float() * w_scale[:, None])
    y = ops.int8_linear(x, w_q, w_scale)
    assert (y.double() - exact).abs().max().item() <= 2 * (eager.double() - exact).abs().max().item() + 1e-6


def test_bad_input_messages():
    w_q, w_scale = R.quantize_weight_int8(torch.randn(8, 64))
    x = torch.randn(2, 64)
    x_q, x_scale = R.quantize_activation_int8(x)
    with pytest.raises(TypeError, match=r"x_q must be torch.int8, got torch.float32"):
        ops.int8_matmul(x, x_scale, w_q, w_scale)
    with pytest.raises(ValueError, match=r"x_q's last dim must equal w_q's K=64, got shape \(2, 65\)"):
        ops.int8_matmul(torch.zeros(2, 65, dtype=torch.int8), x_scale, w_q, w_scale)
    with pytest.raises(ValueError, match=r"x_scale must have shape \(2, 1\)"):
        ops.int8_matmul(x_q, x_scale.reshape(2), w_q, w_scale)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(8,\)"):
        ops.int8_matmul(x_q, x_scale, w_q, w_scale[:3])
    with pytest.raises(ValueError, match=r"w_q must be 2-D"):
        ops.int8_linear(x, w_q[0], w_scale)
    with pytest.raises(TypeError, match=r"out_dtype must be float32, bfloat16 or float16, got torch.int32"):
        ops.int8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x's last dim must equal w_q's K=64 \(in_features\), got shape \(2, 3\)"):
        ops.int8_linear(torch.randn(2, 3), w_q, w_scale)
    with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16, got torch.float64"):
        ops.int8_linear(x.double(), w_q, w_scale)
    with pytest.raises(ValueError, match=r"w_q is on meta but x is on cpu"):
        ops.int8_linear(x, w_q.to("meta"), w_scale)
    with pytest.raises(ValueError, match=r"w must be finite"):
        ops.quantize_weight_int8(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match=r"w must be 2-D"):
        ops.quantize_weight_int8(torch.randn(3))


@given(k=st.integers(1, 64), bad_k=st.integers(1, 64), m=st.integers(0, 4))
@settings(max_examples=30, deadline=None)
def test_mismatched_k_is_rejected(k, bad_k, m):
    w_q, w_scale = R.quantize_weight_int8(torch.randn(3, k))
    x = torch.randn(m, bad_k)
    if k == bad_k:
        assert ops.int8_linear(x, w_q, w_scale).shape == (m, 3)
    else:
        with pytest.raises(ValueError, match=f"K={k}"):
            ops.int8_linear(x, w_q, w_scale)


def _opcheck_cases():
    w = torch.randn(12, 200)
    w_q, w_scale = R.quantize_weight_int8(w)
    x = torch.randn(2, 3, 200)
    x_q, x_scale = R.quantize_activation_int8(x)
    return [
        (torch.ops.accelops.quantize_activation_int8, (x,)),
        (torch.ops.accelops.quantize_activation_int8, (x.half(),)),
        (torch.ops.accelops.quantize_weight_int8, (w,)),
        (torch.ops.accelops.int8_matmul, (x_q, x_scale, w_q, w_scale, torch.randn(12), torch.bfloat16)),
        (torch.ops.accelops.int8_matmul, (x_q, x_scale, w_q, w_scale)),
        (
            torch.ops.accelops.int8_linear,
            (x.clone().requires_grad_(), w_q, w_scale, torch.randn(12, requires_grad=True)),
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_int8_linear_gradient():
    w_q, w_scale = R.quantize_weight_int8(torch.randn(5, 40))
    x = torch.randn(3, 40, requires_grad=True)
    y = ops.int8_linear(x, w_q, w_scale)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ (w_q.float() * w_scale[:, None]))


def test_k_zero(backend):
    """An empty reduction: the sums are 0, so the output is the bias (or zeros)."""
    w_q, w_scale = ops.quantize_weight_int8(torch.randn(4, 0))
    assert w_q.shape == (4, 0) and torch.isfinite(w_scale).all()
    bias = torch.randn(4)
    y = ops.int8_linear(torch.randn(2, 3, 0), w_q, w_scale, bias)
    assert torch.equal(y, bias.expand(2, 3, 4))
    x_q, x_scale = ops.quantize_activation_int8(torch.randn(5, 0))
    assert torch.equal(ops.int8_matmul(x_q, x_scale, w_q, w_scale), torch.zeros(5, 4))
