"""Fake-quant family: every backend against torch.fake_quantize_* and the reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelops import ops
from accelops.reference import fake_quant as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RANGES = [(-128, 127), (0, 255), (-8, 7), (0, 1), (-1000, 1000)]


def torch_fake_quantize(x, scale, zero_point, qmin, qmax, axis):
    if x.numel() == 0:
        return torch.empty_like(x)  # torch's per-channel op rejects an empty x
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), axis, qmin, qmax)


def make_qparams(x, axis, qmin, qmax, gen=None):
    """A scale that puts part of x outside the range, and a random zero point."""
    if axis is None:
        scale = float(torch.empty(()).uniform_(0.002, 0.1, generator=gen))
        zero = int(torch.randint(qmin, qmax + 1, (), generator=gen))
        return scale, zero
    c = x.shape[axis]
    scale = torch.empty(c).uniform_(0.002, 0.1, generator=gen)
    zero = torch.randint(qmin, qmax + 1, (c,), dtype=torch.int32, generator=gen)
    return scale, zero


def with_ties(x, scale, axis):
    """Put exact .5 ties (x = (k + 0.5) * scale) into x, where rounding modes differ."""
    x = x.clone()
    flat = x.reshape(-1)
    n = min(flat.numel(), 64)
    if n == 0:
        return x
    s = scale if axis is None else float(scale[0])
    idx = torch.arange(n) * max(1, flat.numel() // n)
    if axis is not None and axis != 0:
        return x  # ties placed along channel 0 only (its scale is known per element there)
    if axis == 0:
        inner = flat.numel() // x.shape[0]
        idx = torch.arange(min(n, inner))
    flat[idx] = ((torch.randint(-300, 300, (idx.numel(),)) + 0.5) * s).to(x.dtype)
    return x


# --------------------------------------------------------------------------- forward


@given(
    shape=st.sampled_from([(1,), (7,), (8,), (9,), (3, 5), (4, 16), (2, 3, 17), (5, 1, 8), (0, 4), (130, 3)]),
    axis_pick=st.integers(-1, 3),
    qrange=st.sampled_from(RANGES),
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([0.01, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_forward_and_grad_match_torch(backend, shape, axis_pick, qrange, dtype, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange
    axis = None if axis_pick < 0 or axis_pick >= len(shape) else axis_pick
    x = torch.randn(shape, generator=gen) * magnitude
    scale, zero = make_qparams(x, axis, qmin, qmax, gen)
    x = with_ties(x, scale, axis).to(dtype)
    expected = torch_fake_quantize(x, scale, zero, qmin, qmax, axis)
    xa = x.clone().requires_grad_()
    y = ops.fake_quantize(xa, scale, zero, qmin, qmax, axis)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, expected)

    g = torch.randn(shape, generator=gen).to(dtype)
    y.backward(g)
    if x.numel() == 0:
        assert xa.grad.shape == x.shape
        return
    xt = x.clone().requires_grad_()
    torch_fake_quantize(xt, scale, zero, qmin, qmax, axis).backward(g)
    assert torch.equal(xa.grad, xt.grad)


@pytest.mark.parametrize("axis", [None, 0, 1, 2])
def test_large_tensor_every_geometry(backend, axis):
    # Big enough for several threads and 8-element groups that straddle channels.
    shape = (5, 33, 131) if backend != "triton" else (3, 17, 45)
    x = torch.randn(shape) * 4
    scale, zero = make_qparams(x, axis, -128, 127)
    y = ops.fake_quantize(x, scale, zero, -128, 127, axis)
    assert torch.equal(y, torch_fake_quantize(x, scale, zero, -128, 127, axis))


def test_tensor_qparams_and_python_scalars_agree(backend):
    x = torch.randn(6, 10)
    a = ops.fake_quantize(x, 0.03, 5, 0, 255)
    b = ops.fake_quantize(x, torch.tensor([0.03]), torch.tensor([5]), 0, 255)
    c = ops.fake_quantize(x, torch.tensor(0.03), torch.tensor(5, dtype=torch.int64), 0, 255)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_negative_axis_and_non_contiguous(backend):
    base = torch.randn(12, 9) * 3
    x = base.t()  # [9, 12], non-contiguous
    scale, zero = make_qparams(x, 1, -128, 127)
    y = ops.fake_quantize(x, scale, zero, -128, 127, axis=-1)
    assert torch.equal(y, torch_fake_quantize(x.contiguous(), scale, zero, -128, 127, 1))


# --------------------------------------------------------------------------- special values


def test_nan_stays_nan_and_inf_clamps(backend):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, 1e30, -1e30, 0.0, 2.0])
    x = x.requires_grad_()
    y = ops.fake_quantize(x, 0.1, 3, -128, 127)
    s = torch.tensor(0.1)  # the range ends as the kernels compute them: (q - z) * s in fp32
    top, bottom = torch.tensor(127.0 - 3) * s, torch.tensor(-128.0 - 3) * s
    assert torch.isnan(y[0])
    assert y[1] == top and y[2] == bottom
    assert y[4] == y[1] and y[5] == y[2]
    y.backward(torch.ones(8))
    assert x.grad.tolist() == [0, 0, 0, 1, 0, 0, 1, 1]  # mask False for NaN, Inf and clamped values


def test_nan_touches_only_its_element(backend):
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    scale, zero = make_qparams(x, 0, -128, 127)
    y = ops.fake_quantize(x, scale, zero, -128, 127, axis=0)
    expected = torch_fake_quantize(x, scale, zero, -128, 127, 0)
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan], expected[~nan])


def test_nan_and_inf_gradient_follow_torch(backend):
    # torch multiplies dy by the mask: a NaN/Inf dy stays NaN even where the mask is 0.
    x = torch.tensor([0.0, 100.0, 0.0, 100.0], requires_grad=True)
    g = torch.tensor([float("nan"), float("nan"), float("inf"), float("inf")])
    ops.fake_quantize(x, 0.1, 0, -8, 7).backward(g)
    xt = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(xt, 0.1, 0, -8, 7).backward(g)
    assert torch.equal(torch.isnan(x.grad), torch.isnan(xt.grad))


# --------------------------------------------------------------------------- what autograd keeps


def test_backward_keeps_a_bit_mask_not_x(backend):
    x = torch.randn(64, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.fake_quantize(x, 0.02, 0, -128, 127)
    assert saved, "the backward must keep something"
    assert all(t.dtype == torch.uint8 for t in saved), [t.dtype for t in saved]
    assert sum(t.numel() for t in saved) == x.numel() // 8
    y.sum().backward()


def test_mask_bits_match_reference(backend):
    if backend == "reference":
        pytest.skip("the reference defines the layout")
    x = torch.randn(3, 7, 5) * 3
    scale, zero = make_qparams(x, 1, -16, 15)
    if backend == "triton":
        from accelops.kernels import fake_quant as K

        y, bits = K.fake_quantize(x, scale, zero, -16, 15, 1)
    else:
        y, bits = torch.ops.accelops.fake_quantize(x, scale, zero, -16, 15, 1)
    ry, rmask = R.fake_quantize_with_mask(x, scale, zero, -16, 15, 1)
    assert torch.equal(bits, R.pack_mask(rmask))
    assert torch.equal(R.unpack_mask(bits, x.shape), rmask)


@pytest.mark.parametrize("axis", [None, 0, 1, 2])
def test_vector_paths_every_geometry_with_grad_and_bits(backend, axis):
    # 16-lane vectors (AVX-512: two mask bytes each) that straddle channels, a channel axis
    # last (channels along the vector), odd channel lengths (vector tails), NaN and +-Inf,
    # several threads: y, the mask bits and dx bit-exact with torch and the reference.
    if backend == "triton":
        pytest.skip("the interpreter is too slow for this size; the small shapes cover triton")
    x = torch.randn(7, 35, 131) * 4
    x.view(-1)[::997] = float("nan")
    x.view(-1)[5::1009] = float("inf")
    x.view(-1)[9::1013] = -float("inf")
    scale, zero = make_qparams(x, axis, -128, 127)
    if axis is not None:
        zero = zero.to(torch.int32)
    finite = torch.isfinite(x)
    xa = x.clone().requires_grad_()
    y = ops.fake_quantize(xa, scale, zero, -128, 127, axis)
    expected = R.fake_quantize(
        x, torch.as_tensor(scale).reshape(-1), torch.as_tensor(zero).reshape(-1), -128, 127, axis
    )
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    assert torch.equal(y[finite], torch_fake_quantize(x, scale, zero, -128, 127, axis)[finite])
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())
    g = torch.randn(x.shape)
    y.backward(g)
    xt = x.clone().requires_grad_()
    torch_fake_quantize(xt, scale, zero, -128, 127, axis).backward(g)
    assert torch.equal(xa.grad, xt.grad)
    if backend != "reference":
        s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        z = torch.as_tensor(zero).reshape(-1)
        _, bits = torch.ops.accelops.fake_quantize(x, s, z, -128, 127, axis)
        _, rmask = R.fake_quantize_with_mask(x, s, z, -128, 127, axis)
        assert torch.equal(bits, R.pack_mask(rmask))


@pytest.mark.parametrize("axis", [None, 0, 1, 2])
@pytest.mark.parametrize("grad_factor", [1.0, 0.3])
def test_learnable_vector_paths_every_geometry(backend, axis, grad_factor):
    # Channel runs long and short, with vector tails, split between threads mid-channel:
    # forward and dx bit-exact with torch, dscale / dzero (fp64 sums in another order)
    # within the bound of test_learnable_matches_torch.
    if backend == "triton":
        pytest.skip("the interpreter is too slow for this size; the small shapes cover triton")
    shape = (8, 67, 131)
    gen = torch.Generator().manual_seed(axis or 0)
    x = torch.randn(shape, generator=gen) * 3
    c = 1 if axis is None else shape[axis]
    scale = torch.empty(c).uniform_(0.01, 0.3, generator=gen)
    zero = torch.empty(c).uniform_(-131, 130, generator=gen)
    g = torch.randn(shape, generator=gen)
    if axis is None:

        def theirs(a, s, z):
            return torch._fake_quantize_learnable_per_tensor_affine(a, s, z, -128, 127, grad_factor)
    else:

        def theirs(a, s, z):
            return torch._fake_quantize_learnable_per_channel_affine(a, s, z, axis, -128, 127, grad_factor)

    def ours(a, s, z):
        return ops.fake_quantize_learnable(a, s, z, -128, 127, axis, grad_factor)

    y, dx, ds, dz = lsq_pair(x, scale, zero, -128, 127, axis, grad_factor, g, ours)
    ty, tdx, tds, tdz = lsq_pair(x, scale, zero, -128, 127, axis, grad_factor, g, theirs)
    assert torch.equal(y, ty)
    assert torch.equal(dx, tdx)
    _, gold_s, gold_z = R.fake_quantize_learnable_backward(
        g.double(), x.double(), scale, zero, -128, 127, axis, grad_factor
    )
    per_channel = g.abs().sum() if axis is None else g.abs().transpose(0, axis).reshape(c, -1).sum(1)
    bound = per_channel * (x.abs().max() + 256) * 1e-6 * grad_factor + 1e-6
    assert ((ds.double() - gold_s.double()).abs() <= bound).all()
    assert ((dz.double() - gold_z.double()).abs() <= bound).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_scale_is_a_value_error(backend, scale):
    with pytest.raises(ValueError, match="scale must be positive"):
        ops.fake_quantize(torch.randn(4), scale, 0, -128, 127)
    with pytest.raises(ValueError, match="scale must be positive"):
        ops.fake_quantize(
            torch.randn(2, 3), torch.tensor([0.1, scale]), torch.zeros(2, dtype=torch.int32), -128, 127, axis=0
        )


def test_bad_range_and_zero_point(backend):
    x = torch.randn(4)
    with pytest.raises(ValueError, match="quant_min .* must be <= quant_max"):
        ops.fake_quantize(x, 0.1, 0, 5, 4)
    with pytest.raises(ValueError, match="zero_point 300"):
        ops.fake_quantize(x, 0.1, 300, 0, 255)
    with pytest.raises(ValueError, match="zero_point -1"):
        ops.fake_quantize(torch.randn(2, 2), torch.ones(2), torch.tensor([0, -1]), 0, 255, axis=0)
    with pytest.raises(ValueError, match="2\\^24"):
        ops.fake_quantize(x, 0.1, 0, -(2**25), 2**25)
    with pytest.raises(TypeError, match="quant_min must be an int"):
        ops.fake_quantize(x, 0.1, 0, -128.0, 127)


def test_bad_shapes_and_types(backend):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        ops.fake_quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), -128, 127, axis=1)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ops.fake_quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), -128, 127, axis=2)
    with pytest.raises(ValueError, match="one value per tensor"):
        ops.fake_quantize(x, torch.ones(2), 0, -128, 127)
    with pytest.raises(TypeError, match="integer tensor"):
        ops.fake_quantize(x, 0.1, torch.tensor([0.5]), -128, 127)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.fake_quantize(torch.ones(3, dtype=torch.int32), 0.1, 0, -128, 127)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.fake_quantize([1.0, 2.0], 0.1, 0, -128, 127)
    with pytest.raises(ValueError, match="per-channel axis"):
        ops.fake_quantize(x, 0.1, 0, -128, 127, axis=0)


@given(
    scale=st.floats(allow_nan=True, allow_infinity=True, width=32),
    qmin=st.integers(-300, 300),
    qmax=st.integers(-300, 300),
    zero=st.integers(-400, 400),
)
@SETTINGS
def test_any_qparams_either_work_or_raise_value_error(backend, scale, qmin, qmax, zero):
    x = torch.randn(5, 3)
    # A subnormal scale is refused too: its fp32 reciprocal, which the kernels multiply by, is inf.
    finite_reciprocal = bool(torch.isfinite(1.0 / torch.tensor(scale, dtype=torch.float32)))
    valid = scale > 0 and scale < float("inf") and finite_reciprocal and qmin <= qmax and qmin <= zero <= qmax
    if not valid:
        with pytest.raises(ValueError):
            ops.fake_quantize(x, scale, zero, qmin, qmax)
        return
    y = ops.fake_quantize(x, scale, zero, qmin, qmax)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax))


# --------------------------------------------------------------------------- learnable (LSQ)


def lsq_pair(x, scale, zero, qmin, qmax, axis, grad_factor, g, fn):
    xa, sa, za = (t.detach().clone().requires_grad_() for t in (x, scale, zero))
    y = fn(xa, sa, za)
    y.backward(g)
    return y, xa.grad, sa.grad, za.grad


@given(
    shape=st.sampled_from([(5,), (4, 9), (3, 4, 10), (16, 33)]),
    axis_pick=st.integers(-1, 2),
    qrange=st.sampled_from([(-128, 127), (0, 255), (-8, 7)]),
    grad_factor=st.sampled_from([1.0, 0.25, 1.7]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_learnable_matches_torch(backend, shape, axis_pick, qrange, grad_factor, seed):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange
    axis = None if axis_pick < 0 or axis_pick >= len(shape) else axis_pick
    if len(shape) == 1:
        axis = None  # torch's per-channel LSQ backward fails on 1-D x (its dscale comes out 0-D)
    x = torch.randn(shape, generator=gen) * 3
    c = 1 if axis is None else shape[axis]
    scale = torch.empty(c).uniform_(0.01, 0.3, generator=gen)
    zero = torch.empty(c).uniform_(qmin - 3, qmax + 3, generator=gen)  # outside the range too
    g = torch.randn(shape, generator=gen)
    if axis is None:

        def theirs(a, s, z):
            return torch._fake_quantize_learnable_per_tensor_affine(a, s, z, qmin, qmax, grad_factor)
    else:

        def theirs(a, s, z):
            return torch._fake_quantize_learnable_per_channel_affine(a, s, z, axis, qmin, qmax, grad_factor)

    def ours(a, s, z):
        return ops.fake_quantize_learnable(a, s, z, qmin, qmax, axis, grad_factor)

    y, dx, ds, dz = lsq_pair(x, scale, zero, qmin, qmax, axis, grad_factor, g, ours)
    ty, tdx, tds, tdz = lsq_pair(x, scale, zero, qmin, qmax, axis, grad_factor, g, theirs)
    assert torch.equal(y, ty)
    assert torch.equal(dx, tdx)
    # dscale / dzero_point are sums over a channel; only the summation order differs.
    bound = (g.abs() * (x.abs().max() + qmax - qmin + 1)).sum() * 1e-6 * grad_factor + 1e-6
    assert (ds - tds).abs().max() <= bound
    assert (dz - tdz).abs().max() <= bound
    assert ds.shape == scale.shape and dz.shape == zero.shape


def test_learnable_checks(backend):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="scale must be positive"):
        ops.fake_quantize_learnable(x, torch.tensor([0.0]), torch.tensor([0.0]), -8, 7)
    with pytest.raises(TypeError, match="floating-point"):
        ops.fake_quantize_learnable(x, torch.tensor([0.1]), torch.tensor([0]), -8, 7)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ops.fake_quantize_learnable(x, torch.ones(4), torch.zeros(4), -8, 7, axis=1)
    with pytest.raises(TypeError, match="grad_factor"):
        ops.fake_quantize_learnable(x, torch.tensor([0.1]), torch.tensor([0.0]), -8, 7, grad_factor="1")


# --------------------------------------------------------------------------- registration


def test_opcheck():
    x = torch.randn(6, 20, requires_grad=True)
    s = torch.rand(6) * 0.1 + 0.01
    z = torch.randint(-5, 5, (6,), dtype=torch.int32)
    torch.library.opcheck(torch.ops.accelops.fake_quantize.default, (x, s, z, -128, 127, 0))
    torch.library.opcheck(torch.ops.accelops.fake_quantize.default, (x, s[:1], z[:1], -128, 127, None))
    _, bits = torch.ops.accelops.fake_quantize(x.detach(), s, z, -128, 127, 0)
    torch.library.opcheck(torch.ops.accelops.fake_quantize_backward.default, (torch.randn(6, 20), bits))
    sl = s.clone().requires_grad_()
    zl = z.float().requires_grad_()
    torch.library.opcheck(torch.ops.accelops.fake_quantize_learnable.default, (x, sl, zl, -128, 127, 0, 0.5))
    torch.library.opcheck(
        torch.ops.accelops.fake_quantize_learnable_backward.default,
        (torch.randn(6, 20), x.detach(), s, z.float(), -128, 127, 0, 0.5),
    )


def test_compiles_fullgraph_in_a_model():
    lin = torch.nn.Linear(16, 8)
    scale = torch.nn.Parameter(torch.tensor([0.05]))
    zero = torch.nn.Parameter(torch.tensor([0.0]))

    def model(x, w_scale, w_zero):
        w = ops.fake_quantize(lin.weight, w_scale, w_zero, -127, 127, axis=0)
        h = torch.nn.functional.linear(x, w, lin.bias)
        return ops.fake_quantize_learnable(h, scale, zero, -128, 127)

    x = torch.randn(4, 16)
    w_scale = lin.weight.detach().abs().amax(1) / 127
    w_zero = torch.zeros(8, dtype=torch.int32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    y = compiled(x, w_scale, w_zero)
    assert torch.equal(y, model(x, w_scale, w_zero))
    y.sum().backward()
    assert lin.weight.grad is not None and scale.grad is not None and zero.grad is not None
