"""Quantization-aware training: the observers and FakeQuantize against torch.ao.quantization,
QATLinear against the references, and convert()'s "qat-int8" / "int8-from-qat" /
"dynamic-int8" modes."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization import FakeQuantize as TorchFakeQuantize
from torch.ao.quantization import observer as tao

import accelops
from accelops import reference as R
from accelops.nn import FakeQuantize, Int8Linear, MinMaxObserver, MovingAverageMinMaxObserver, QATLinear, convert

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PER_TENSOR = [torch.per_tensor_affine, torch.per_tensor_symmetric]
PER_CHANNEL = [torch.per_channel_affine, torch.per_channel_symmetric]
SYMMETRIC = [torch.per_tensor_symmetric, torch.per_channel_symmetric]


def _torch_observer(moving: bool, qscheme, **kwargs):
    """torch.ao's class for the same settings: it splits per tensor / per channel into classes."""
    per_channel = qscheme in PER_CHANNEL
    if per_channel:
        cls = tao.MovingAveragePerChannelMinMaxObserver if moving else tao.PerChannelMinMaxObserver
    else:
        kwargs.pop("ch_axis", None)
        cls = tao.MovingAverageMinMaxObserver if moving else tao.MinMaxObserver
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao warns that reduce_range will be deprecated
        return cls(qscheme=qscheme, **kwargs)


def _torch_qparams(obs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "must run observer before calling calculate_qparams"
        return obs.calculate_qparams()


def _assert_same_qparams(ours, theirs, observed=True):
    """torch.equal of values, shapes and dtypes. Before any observation torch.ao returns an
    int64 zero point whatever the scheme (decided on the host); ours keeps the scheme's dtype."""
    (s, z), (ts, tz) = ours, theirs
    assert s.dtype == ts.dtype == torch.float32 and s.shape == ts.shape
    assert z.shape == tz.shape and (z.dtype == tz.dtype or not observed)
    assert torch.equal(s, ts), (s, ts)
    assert torch.equal(z, tz), (z, tz)


@st.composite
def observer_case(draw):
    qscheme = draw(st.sampled_from(PER_TENSOR + PER_CHANNEL))
    # torch.ao's per-channel observers fail on 1-D input (flatten(start_dim=1)); ours take it
    ndim = draw(st.integers(1 if qscheme in PER_TENSOR else 2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([torch.qint8, torch.quint8]))
    symmetric_unsigned = qscheme in SYMMETRIC and dtype == torch.quint8
    reduce_range = draw(st.booleans()) and not symmetric_unsigned  # torch.ao refuses that combination
    kwargs = dict(dtype=dtype, reduce_range=reduce_range, ch_axis=draw(st.integers(-ndim, ndim - 1)))
    if draw(st.booleans()):  # a customized range, e.g. 4 bits
        lo, hi = (-8, 7) if dtype == torch.qint8 else (0, 15)
        # (reduce_range halves [0, 1] to the empty [0, 0], which ours rejects and torch.ao divides by)
        kwargs.update(quant_min=draw(st.integers(lo, 0)), quant_max=draw(st.integers(2 if reduce_range else 1, hi)))
    if draw(st.booleans()):
        kwargs["eps"] = draw(st.sampled_from([1e-3, 1e-8]))
    moving = draw(st.booleans())
    if moving:
        kwargs["averaging_constant"] = draw(st.sampled_from([0.01, 0.3, 1.0]))
    steps = draw(st.integers(1, 4))
    kinds = draw(
        st.lists(
            st.sampled_from(["randn", "randn", "zeros", "const", "positive", "tiny"]), min_size=steps, max_size=steps
        )
    )
    x_dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))  # inputs reproducible from the case
    return shape, qscheme, moving, kwargs, kinds, x_dtype, gen


def _input(kind, shape, x_dtype, gen):
    if kind == "zeros":
        x = torch.zeros(shape)
    elif kind == "const":
        x = torch.full(shape, float(torch.randn((), generator=gen) * 4))
    elif kind == "positive":
        x = torch.rand(shape, generator=gen) * 5 + 1
    elif kind == "tiny":
        x = torch.randn(shape, generator=gen) * 1e-9
    else:
        x = torch.randn(shape, generator=gen) * float(torch.rand((), generator=gen) * 10) + float(
            torch.randn((), generator=gen)
        )
    return x.to(x_dtype)


# ------------------------------------------------------------------ observers


@given(case=observer_case())
@SETTINGS
def test_observers_equal_torch_ao(case):
    """Scale and zero point equal torch.ao's (torch.equal, same dtypes and shapes) after every
    input of a sequence, from the first call's initialisation on, and before any input.

    One difference: with averaging_constant=1, min + 1 * (x_min - min) can round to an ulp
    above max + 1 * (x_max - max) for a constant input; torch.ao then raises an
    AssertionError ("min should be less than max"), ours computes the qparams of that range."""
    shape, qscheme, moving, kwargs, kinds, x_dtype, gen = case
    ours = (MovingAverageMinMaxObserver if moving else MinMaxObserver)(qscheme=qscheme, **kwargs)
    theirs = _torch_observer(moving, qscheme, **kwargs)
    assert (ours.quant_min, ours.quant_max) == (theirs.quant_min, theirs.quant_max)
    _assert_same_qparams(ours.calculate_qparams(), _torch_qparams(theirs), observed=False)
    for kind in kinds:
        x = _input(kind, shape, x_dtype, gen)
        assert ours(x) is x
        theirs(x)
        assert torch.equal(ours.min_val, theirs.min_val) and torch.equal(ours.max_val, theirs.max_val)
        if bool((ours.min_val > ours.max_val).any()):
            with pytest.raises(AssertionError, match="should be less than max"):
                _torch_qparams(theirs)
            scale, zero_point = ours.calculate_qparams()
            assert bool((scale > 0).all()) and bool(
                ((zero_point >= ours.quant_min) & (zero_point <= ours.quant_max)).all()
            )
            continue
        _assert_same_qparams(ours.calculate_qparams(), _torch_qparams(theirs))


def test_observer_empty_input_changes_nothing_and_sized_per_channel_start():
    obs = MovingAverageMinMaxObserver(qscheme=torch.per_channel_affine, ch_axis=1, num_channels=3)
    theirs = _torch_observer(True, torch.per_channel_affine, ch_axis=1)
    # preallocated statistics: unobserved channels give torch.ao's defaults (1.0, 0)
    s, z = obs.calculate_qparams()
    assert torch.equal(s, torch.ones(3)) and torch.equal(z, torch.zeros(3, dtype=torch.int32))
    obs(torch.empty(0, 3))
    assert torch.isinf(obs.min_val).all()
    for _ in range(3):
        x = torch.randn(4, 3, 2)
        obs(x)
        theirs(x)
        _assert_same_qparams(obs.calculate_qparams(), _torch_qparams(theirs))
    obs.reset_min_max_vals()
    assert torch.isinf(obs.min_val).all() and torch.isinf(obs.max_val).all()


def test_per_channel_observer_takes_1d_input():
    # each element is its own channel: torch.ao's result for the same values as a column
    x = torch.randn(6) * 3
    ours = MovingAverageMinMaxObserver(qscheme=torch.per_channel_affine)
    theirs = _torch_observer(True, torch.per_channel_affine)
    ours(x)
    theirs(x.reshape(6, 1))
    _assert_same_qparams(ours.calculate_qparams(), _torch_qparams(theirs))


def test_observer_state_dict_round_trips_and_loads_torch_ao_state():
    theirs = _torch_observer(False, torch.per_channel_symmetric, dtype=torch.qint8, ch_axis=0)
    ours = MinMaxObserver(qscheme=torch.per_channel_symmetric, dtype=torch.qint8)
    x = torch.randn(5, 7)
    theirs(x)
    ours.load_state_dict(theirs.state_dict())  # same buffer names, sized on load
    assert set(ours.state_dict()) == {"eps", "min_val", "max_val"}
    _assert_same_qparams(ours.calculate_qparams(), _torch_qparams(theirs))
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    again = MinMaxObserver(qscheme=torch.per_channel_symmetric, dtype=torch.qint8)
    again.load_state_dict(torch.load(buf))
    _assert_same_qparams(again.calculate_qparams(), ours.calculate_qparams())


def test_observer_bad_input():
    with pytest.raises(ValueError, match="qscheme must be .*got torch.per_channel_affine_float_qparams"):
        MinMaxObserver(qscheme=torch.per_channel_affine_float_qparams)
    with pytest.raises(ValueError, match="qscheme must be"):
        MinMaxObserver(qscheme="per_tensor")
    with pytest.raises(TypeError, match="dtype must be one of .*got torch.float32"):
        MinMaxObserver(dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype must be one of .*got torch.qint32"):
        MovingAverageMinMaxObserver(dtype=torch.qint32)
    for bad in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"averaging_constant must lie in \(0, 1\]"):
            MovingAverageMinMaxObserver(averaging_constant=bad)
    with pytest.raises(TypeError, match="averaging_constant must be a float"):
        MovingAverageMinMaxObserver(averaging_constant="0.1")
    with pytest.raises(TypeError, match="ch_axis must be an int, got 1.0"):
        MinMaxObserver(qscheme=torch.per_channel_affine, ch_axis=1.0)
    obs = MinMaxObserver(qscheme=torch.per_channel_affine, ch_axis=2)
    with pytest.raises(ValueError, match=r"ch_axis 2 is out of range for x of shape \(3, 4\)"):
        obs(torch.randn(3, 4))
    obs = MinMaxObserver(qscheme=torch.per_channel_affine, ch_axis=-3)
    with pytest.raises(ValueError, match=r"ch_axis -3 is out of range"):
        obs(torch.randn(3, 4))
    obs = MinMaxObserver(qscheme=torch.per_channel_affine)
    obs(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"x has 5 channels along ch_axis=0 .* statistics for 3"):
        obs(torch.randn(5, 4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        MinMaxObserver()(torch.arange(4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        MinMaxObserver()([1.0])
    with pytest.raises(ValueError, match="quant_min and quant_max must be given together"):
        MinMaxObserver(quant_min=0)
    with pytest.raises(ValueError, match=r"must include 0, got \[1, 10\]"):
        MinMaxObserver(quant_min=1, quant_max=10)
    with pytest.raises(ValueError, match=r"\[quant_min, quant_max\] = \[-1, 10\] must lie within torch.quint8"):
        MinMaxObserver(quant_min=-1, quant_max=10)
    with pytest.raises(TypeError, match="quant_max must be an int, got 7.0"):
        MinMaxObserver(dtype=torch.qint8, quant_min=-8, quant_max=7.0)
    with pytest.raises(ValueError, match=r"reduce_range=True halves \[0, 1\] to \[0, 0\]"):
        MinMaxObserver(quant_min=0, quant_max=1, reduce_range=True)
    with pytest.raises(ValueError, match="reduce_range=True is not supported with a symmetric qscheme"):
        MinMaxObserver(qscheme=torch.per_tensor_symmetric, reduce_range=True)
    with pytest.raises(TypeError, match="reduce_range must be a bool"):
        MinMaxObserver(reduce_range=1)
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        MinMaxObserver(eps=0.0)
    with pytest.raises(ValueError, match="num_channels applies to per-channel qschemes only"):
        MinMaxObserver(num_channels=4)
    with pytest.raises(TypeError, match="observer must be MinMaxObserver or MovingAverageMinMaxObserver"):
        FakeQuantize(tao.MinMaxObserver)


@given(
    ndim=st.integers(1, 4),
    ch_axis=st.integers(-6, 6),
    constant=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2)),
    x_dtype=st.sampled_from([torch.float32, torch.float64, torch.int32, torch.bool, torch.complex64]),
)
@SETTINGS
def test_observer_bad_input_hypothesis(ndim, ch_axis, constant, x_dtype):
    """Every bad value is refused with an error naming the argument, every good one accepted."""
    if isinstance(constant, float) and 0 < constant <= 1:
        MovingAverageMinMaxObserver(averaging_constant=constant)
    elif isinstance(constant, int) and constant == 1:
        MovingAverageMinMaxObserver(averaging_constant=constant)
    else:
        with pytest.raises(ValueError, match=r"averaging_constant must lie in \(0, 1\]"):
            MovingAverageMinMaxObserver(averaging_constant=constant)
    obs = MinMaxObserver(qscheme=torch.per_channel_affine, ch_axis=ch_axis)
    x = torch.ones((2,) * ndim, dtype=x_dtype)
    if not x_dtype.is_floating_point:
        with pytest.raises(TypeError, match=f"x must be a floating-point tensor, got {x_dtype}"):
            obs(x)
    elif not -ndim <= ch_axis < ndim:
        with pytest.raises(ValueError, match=f"ch_axis {ch_axis} is out of range for x of shape"):
            obs(x)
    else:
        obs(x)
        assert obs.min_val.shape == (2,) and obs.min_val.dtype == torch.float32
    fq = FakeQuantize(qscheme=torch.per_tensor_affine)
    if x_dtype == torch.float64:  # the observer takes it; accelops.ops.fake_quantize does not
        with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got torch.float64"):
            fq(x)


# ------------------------------------------------------------------ FakeQuantize


@st.composite
def fake_quant_case(draw):
    qscheme = draw(st.sampled_from(PER_TENSOR + PER_CHANNEL))
    dtype = draw(st.sampled_from([torch.qint8, torch.quint8]))
    moving = draw(st.booleans())
    kwargs = dict(dtype=dtype, qscheme=qscheme)
    if qscheme in PER_CHANNEL:
        kwargs["ch_axis"] = draw(st.sampled_from([0, 1, -1]))
    if moving:
        kwargs["averaging_constant"] = draw(st.sampled_from([0.01, 0.5]))
    if draw(st.booleans()):
        kwargs.update(quant_min=-8, quant_max=7) if dtype == torch.qint8 else kwargs.update(quant_min=0, quant_max=15)
    toggles = draw(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=4))
    return moving, kwargs, toggles


@given(case=fake_quant_case(), x_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@SETTINGS
def test_fake_quantize_equals_torch_ao(case, x_dtype):
    """Same outputs, qparams buffers and straight-through gradients as torch.ao's FakeQuantize
    over a sequence of inputs, with the observer / fake-quant switches toggled in between."""
    moving, kwargs, toggles = case
    ours = FakeQuantize(MovingAverageMinMaxObserver if moving else MinMaxObserver, **kwargs)
    if kwargs.get("ch_axis") == -1:  # torch.fake_quantize_per_channel_affine rejects a negative axis
        kwargs["ch_axis"] = 2
    theirs_obs = _torch_observer(moving, kwargs["qscheme"], **{k: v for k, v in kwargs.items() if k != "qscheme"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TorchFakeQuantize(type(theirs_obs), **kwargs)
    for observe, fake_quant in [(True, True)] + toggles:
        ours.enable_observer(observe).enable_fake_quant(fake_quant)
        theirs.enable_observer(observe)
        theirs.enable_fake_quant(fake_quant)
        x = (torch.randn(3, 4, 5) * 3 + torch.randn(())).to(x_dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), theirs(xb)
        assert ya.dtype == yb.dtype and torch.equal(ya, yb)
        assert torch.equal(ours.scale, theirs.scale) and torch.equal(ours.zero_point, theirs.zero_point)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(xa.grad, xb.grad)


def test_fake_quantize_backends_agree_with_torch_ao(backend):
    for qscheme, axis in ((torch.per_tensor_affine, 0), (torch.per_channel_symmetric, 1)):
        kwargs = dict(dtype=torch.qint8, qscheme=qscheme, averaging_constant=0.1)
        if qscheme in PER_CHANNEL:
            kwargs["ch_axis"] = axis
        ours = FakeQuantize(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs = (
                tao.MovingAveragePerChannelMinMaxObserver if qscheme in PER_CHANNEL else tao.MovingAverageMinMaxObserver
            )
            theirs = TorchFakeQuantize(obs, **kwargs)
        for _ in range(3):
            x = torch.randn(6, 9) * 2
            assert torch.equal(ours(x), theirs(x))


def test_fake_quantize_state_dict_and_eval_use_of_stored_qparams():
    fq = FakeQuantize(dtype=torch.qint8, qscheme=torch.per_channel_affine, ch_axis=0)
    x = torch.randn(4, 6)
    y = fq(x)
    state = fq.state_dict()
    assert set(state) == {
        "scale",
        "zero_point",
        "activation_post_process.eps",
        "activation_post_process.min_val",
        "activation_post_process.max_val",
    }
    other = FakeQuantize(dtype=torch.qint8, qscheme=torch.per_channel_affine, ch_axis=0)
    other.load_state_dict(state)  # per-channel buffers sized on load
    assert torch.equal(other.fake_quant(x), y)
    other.disable_observer()
    assert torch.equal(other(x * 10), fq.fake_quant(x * 10))  # the stored qparams, not re-observed
    assert torch.equal(other.activation_post_process.min_val, fq.activation_post_process.min_val)


def test_fake_quantize_torch_compile_fullgraph_eager_backend():
    """fullgraph=True: no graph break, so no .item() or host branch on a tensor value; the
    first call, which sizes the per-channel statistics, traces too."""

    def make():
        return (
            FakeQuantize(dtype=torch.qint8, qscheme=torch.per_tensor_affine),
            FakeQuantize(MinMaxObserver, qscheme=torch.per_channel_symmetric, ch_axis=1),
            FakeQuantize(qscheme=torch.per_channel_affine, ch_axis=0, num_channels=4),
        )

    eager, twin = make(), make()
    step = torch.compile(lambda fqs, x: fqs[2](fqs[1](fqs[0](x))), fullgraph=True, backend="eager")
    for i in range(3):
        x = torch.randn(4, 6) * (i + 1)
        assert torch.equal(step(twin, x), eager[2](eager[1](eager[0](x))))
    for a, b in zip(eager, twin):
        for (name, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
            assert torch.equal(u, v), name


# ------------------------------------------------------------------ QATLinear


def _codes(w: torch.Tensor):
    """The spec of QATLinear's int8 weight quantization, from the references: Int8Linear's
    scale, and the codes of fake_quantize (round(w * (1 / scale)), reference/fake_quant.py)."""
    _, scale = R.quantize_weight_int8(w.detach())
    inv = torch.ones_like(scale) / scale
    q = torch.round(w.detach().float() * inv.reshape(-1, 1)).clamp(-127, 127).to(torch.int8)
    return q, scale


@given(
    lead=st.sampled_from([(), (0,), (1,), (3,), (2, 4)]),
    k=st.sampled_from([1, 5, 64, 129]),
    n=st.integers(1, 20),
    with_bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
@settings(max_examples=20, deadline=None)
def test_qat_linear_per_token_forward_is_the_int8_computation(lead, k, n, with_bias, dtype):
    layer = QATLinear(k, n, bias=with_bias, dtype=dtype)
    x = (torch.randn(*lead, k) * 3).to(dtype)
    w_q, w_scale = _codes(layer.weight)
    q, s = layer.quantized_weight()
    assert torch.equal(q, w_q) and torch.equal(s, w_scale)
    # the weight the gradient sees is codes * scale, exactly
    assert torch.equal(layer.fake_quantized_weight(), w_q.float() * w_scale.reshape(-1, 1))
    x_q, x_scale = R.quantize_activation_int8(x)
    expected = R.int8_matmul(x_q, x_scale, w_q, w_scale, layer.bias, out_dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert torch.equal(y, expected)


def test_qat_weight_codes_are_fake_quantize_codes():
    """Scales always equal Int8Linear.from_linear's; the codes are fake_quantize's
    round(w * (1 / scale)), which differs from quantize_weight_int8's round(w * (127 / absmax))
    by one step only where w sits within an ulp of a rounding tie (~2 weights in a million
    here). That is why "int8-from-qat" takes the codes from the QAT layer, not from the weight."""
    torch.manual_seed(3)
    differ = total = 0
    for _ in range(20):
        layer = QATLinear(257, 64)
        with torch.no_grad():
            layer.weight.mul_(torch.rand(64, 1) * 10)
        q, s = layer.quantized_weight()
        rq, rs = R.quantize_weight_int8(layer.weight.detach())
        assert torch.equal(s, rs)
        assert (q.int() - rq.int()).abs().max() <= 1
        differ += int((q != rq).sum())
        total += q.numel()
    assert differ <= total * 1e-4


def test_qat_linear_backends(backend):
    layer = QATLinear(70, 9)
    x = torch.randn(5, 70)
    w_q, w_scale = _codes(layer.weight)
    x_q, x_scale = R.quantize_activation_int8(x)
    assert torch.equal(layer(x), R.int8_matmul(x_q, x_scale, w_q, w_scale, layer.bias))
    assert torch.equal(layer.to_int8_linear()(x), layer(x))


@pytest.mark.parametrize(
    "activation,weight", [("per_token", "int8"), ("per_token", "int4"), ("per_tensor", "int8"), ("per_tensor", "int4")]
)
def test_qat_linear_gradients_are_straight_through(activation, weight):
    """Gradients are F.linear's at the fake-quantized x and w (the quantizers pass them
    through unchanged: absmax scales never clip)."""
    torch.manual_seed(1)
    layer = QATLinear(40, 12, activation=activation, weight=weight, group_size=16)
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    w_fq = layer.fake_quantized_weight().detach()
    if activation == "per_token":
        x_q, x_scale = R.quantize_activation_int8(x.detach())
        x_fq = x_q.float() * x_scale
    else:
        x_fq = layer.act_fake_quant.fake_quant(x.detach())
    g2 = g.reshape(-1, 12)
    torch.testing.assert_close(x.grad, (g2 @ w_fq).reshape(x.shape))
    torch.testing.assert_close(layer.weight.grad, g2.t() @ x_fq.reshape(-1, 40))
    torch.testing.assert_close(layer.bias.grad, g2.sum(0))
    with torch.no_grad():
        torch.testing.assert_close(y, F.linear(x_fq, w_fq, layer.bias), rtol=1e-5, atol=1e-5)


def test_qat_linear_per_tensor_is_torch_ao_fake_quantize_and_observes_in_training_only():
    torch.manual_seed(2)
    layer = QATLinear(16, 8, activation="per_tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TorchFakeQuantize(
            tao.MovingAverageMinMaxObserver,
            quant_min=-127,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
            averaging_constant=0.01,
        )
    w_fq = layer.fake_quantized_weight().detach()
    for _ in range(3):
        x = torch.randn(5, 16) * 4
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(theirs(x), w_fq, layer.bias))
    layer.eval()
    theirs.disable_observer()
    before = layer.act_fake_quant.activation_post_process.min_val.clone()
    x = torch.randn(5, 16) * 40
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(theirs(x), w_fq, layer.bias))
    assert torch.equal(layer.act_fake_quant.activation_post_process.min_val, before)


def test_qat_linear_int4_groups():
    torch.manual_seed(4)
    layer = QATLinear(20, 3, weight="int4", group_size=8)  # groups 8, 8, 4 (last one padded)
    q, s = layer.quantized_weight()
    assert s.shape == (3, 3) and q.shape == (3, 20) and q.abs().max() <= 7
    w = layer.weight.detach()
    for gi, (a, b) in enumerate(((0, 8), (8, 16), (16, 20))):
        absmax = w[:, a:b].abs().amax(1).clamp_min(1e-5)
        assert torch.equal(s[:, gi], absmax / torch.full_like(absmax, 7.0))
        assert torch.equal(q[:, a:b].abs().amax(1), torch.full((3,), 7, dtype=torch.int8))
    w_fq = layer.fake_quantized_weight()
    assert torch.equal(w_fq, q.float() * s.repeat_interleave(8, dim=1)[:, :20])
    assert len(torch.unique(w_fq[0, :8])) <= 15
    with pytest.raises(ValueError, match="weight='int4' has no Int8Linear form"):
        layer.to_int8_linear()


def test_qat_linear_is_an_nn_linear_and_round_trips():
    torch.manual_seed(1)
    lin = nn.Linear(30, 6)
    torch.manual_seed(1)
    qat = QATLinear(30, 6)
    assert isinstance(qat, nn.Linear) and torch.equal(qat.weight, lin.weight)  # same init
    assert set(qat.state_dict()) == {"weight", "bias"}
    other = QATLinear(30, 6)
    other.load_state_dict(lin.state_dict())
    lin.load_state_dict(other.state_dict())
    shared = QATLinear.from_linear(lin, activation="per_tensor")
    assert shared.weight is lin.weight and shared.bias is lin.bias
    back = shared.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight
    assert "activation='per_tensor'" in repr(shared) and "weight='int8'" in repr(shared)
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got ReLU"):
        QATLinear.from_linear(nn.ReLU())


def test_qat_linear_per_tensor_state_dict_round_trip():
    torch.manual_seed(5)
    layer = QATLinear(12, 4, activation="per_tensor")
    for _ in range(3):
        layer(torch.randn(8, 12))
    layer.eval()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    again = QATLinear(12, 4, activation="per_tensor").eval()
    again.load_state_dict(torch.load(buf))
    x = torch.randn(3, 12)
    assert torch.equal(again(x), layer(x))
    assert "act_fake_quant.activation_post_process.min_val" in layer.state_dict()


def test_qat_linear_constructor_and_input_checks():
    with pytest.raises(ValueError, match=r"activation must be one of \('per_token', 'per_tensor'\), got 'per_row'"):
        QATLinear(4, 4, activation="per_row")
    with pytest.raises(ValueError, match=r"weight must be one of \('int8', 'int4'\), got 'int2'"):
        QATLinear(4, 4, weight="int2")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            QATLinear(4, 4, group_size=bad)
    with pytest.raises(ValueError, match=r"x's last dim must equal in_features=4, got shape \(2, 5\)"):
        QATLinear(4, 4)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got torch.int64"):
        QATLinear(4, 4)(torch.ones(2, 4, dtype=torch.long))
    layer = QATLinear(4, 4)
    with torch.no_grad():
        layer.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        layer(torch.randn(2, 4))


def test_qat_training_loss_goes_down():
    """A toy regression trained through QAT: the loss falls well below its start."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    target = torch.sin(x @ torch.randn(8, 3))
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    convert(model, "qat-int8")
    model[2] = QATLinear.from_linear(model[2].to_linear(), activation="per_tensor")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = QATLinear(16, 24)
        self.b = QATLinear(24, 24, activation="per_tensor")
        self.c = QATLinear(24, 8, weight="int4", group_size=8)
        self.fq = FakeQuantize(dtype=torch.qint8, qscheme=torch.per_tensor_affine)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(self.fq(x))))))


def _run(model, xs):
    outs = []
    for x in xs:
        x = x.clone().requires_grad_(True)
        y = model(x)
        y.sum().backward()
        outs.append((y.detach(), x.grad))
    return outs


def test_qat_torch_compile_fullgraph_eager_backend():
    """fullgraph=True: no graph break anywhere, so no .item() or host branch on a tensor value
    in the observers, FakeQuantize or QATLinear; outputs, gradients and observer state as eager."""
    torch.manual_seed(0)
    model = _Toy()
    twin = copy.deepcopy(model)
    xs = [torch.randn(2, 5, 16) * s for s in (1.0, 3.0, 0.5)]
    compiled = torch.compile(twin, fullgraph=True, backend="eager")
    for (y, gx), (yc, gxc) in zip(_run(model, xs), _run(compiled, xs)):
        assert torch.equal(y, yc) and torch.equal(gx, gxc)
    for (name, p), (_, pc) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, pc.grad), name
    for (name, b), (_, bc) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, bc), name


def test_qat_torch_compile_fullgraph_inductor():
    # One small layer of each kind: inductor's first compile costs g++ time on a cold cache.
    torch.manual_seed(0)
    model = nn.Sequential(QATLinear(16, 8), QATLinear(8, 8, activation="per_tensor"))
    twin = copy.deepcopy(model)
    xs = [torch.randn(4, 16), torch.randn(4, 16) * 2]
    compiled = torch.compile(twin, fullgraph=True)
    for (y, gx), (yc, gxc) in zip(_run(model, xs), _run(compiled, xs)):
        # inductor may fuse the moving average differently (an fma): judge by a tolerance
        torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gxc, gx, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ convert


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 33, bias=False), nn.ReLU(), nn.Linear(33, 7))


def test_convert_qat_then_int8_parity_over_100_seeds():
    """prepare ("qat-int8") -> a training step -> convert ("int8-from-qat"): for 100 seeds the
    Int8Linear model's output equals the QAT model's bit for bit (torch.equal), since each
    QATLinear with per-token activations computes its forward with the int8 kernel on the
    codes Int8Linear stores: same weight codes and scales, same per-token activation codes,
    same exact int32 sums and the same fp32 epilogue. Checked layer by layer too."""
    for seed in range(100):
        model = _mlp(seed)
        report = convert(model, "qat-int8")
        assert report.num_swapped == 3
        x = torch.randn(3, 5, 24) * (1 + seed % 7)
        loss = model(x).square().mean()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
        model.eval()
        int8 = copy.deepcopy(model)
        report = convert(int8, "int8-from-qat")
        assert [s.to_type for s in report.swapped] == ["Int8Linear"] * 3
        with torch.no_grad():
            assert torch.equal(int8(x), model(x)), seed
            if seed % 10 == 0:
                for i in (0, 2, 4):
                    q, s = model[i].quantized_weight()
                    assert torch.equal(int8[i].w_q, q) and torch.equal(int8[i].w_scale, s)


def test_convert_parity_low_precision_and_backends(backend):
    model = _mlp(0).to(torch.bfloat16)
    convert(model, "qat-int8")
    int8 = copy.deepcopy(model)
    convert(int8, "int8-from-qat")
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
        assert y.dtype == torch.bfloat16 and torch.equal(int8(x), y)


def test_qat_low_precision_model_keeps_fp32_observer_state():
    model = nn.Sequential(QATLinear(16, 8, activation="per_tensor"), QATLinear(8, 4)).to(torch.bfloat16)
    fq = model[0].act_fake_quant
    assert fq.scale.dtype == fq.activation_post_process.min_val.dtype == torch.float32
    assert fq.activation_post_process.eps.item() == torch.finfo(torch.float32).eps
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    with torch.no_grad():  # what the layer computes: fp32 fake quantization of the bf16 values
        x_fq = fq.fake_quant(x.float())
        expected = F.linear(x_fq, model[0].fake_quantized_weight(), model[0].bias.float()).to(torch.bfloat16)
        assert torch.equal(model[0].eval()(x), expected)


def test_convert_qat_modes_and_reports():
    model = _mlp(1)
    params = {id(p) for p in model.parameters()}
    report = convert(model, "qat-int8", activation="per_tensor", filter=lambda m, fqn: fqn != "4")
    assert [s.fqn for s in report.swapped] == ["0", "2"] and report.skipped == [("4", "filter returned False")]
    assert {id(p) for p in model.parameters()} == params  # shared: optimizer references stay valid
    assert model[0].activation == "per_tensor" and type(model[4]) is nn.Linear
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="0 is a QATLinear with activation='per_tensor'.*skip it with filter="):
        convert(model, "int8-from-qat")
    assert all(type(a) is type(b) for a, b in zip(model, before))  # nothing was swapped
    report = convert(model, "int8-from-qat", filter=lambda m, fqn: fqn != "0" and fqn != "2")
    assert report.num_swapped == 0
    assert ("4", "a plain nn.Linear, not a QATLinear (mode='int8-from-qat' converts QATLinear only)") in report.skipped
    report = convert(model, "int8")
    assert [s.fqn for s in report.swapped] == ["4"]
    assert (
        "0",
        "already a QATLinear; mode='int8' converts only plain nn.Linear (use mode='int8-from-qat')",
    ) in report.skipped
    with pytest.raises(ValueError, match="activation, weight and group_size apply to mode='qat-int8' only"):
        convert(_mlp(0), "int8", activation="per_tensor")
    with pytest.raises(ValueError, match="weight must be one of"):
        convert(_mlp(0), "qat-int8", weight="int3")
    model = _mlp(2)
    convert(model, "qat-int8", weight="int4", group_size=16)
    assert model[2].weight_bits == "int4" and model[2].group_size == 16


def test_convert_dynamic_int8_is_int8():
    a, b = _mlp(3), _mlp(3)
    ra, rb = convert(a, "dynamic-int8"), convert(b, "int8")
    assert ra.mode == "dynamic-int8" and ra.num_swapped == rb.num_swapped == 3
    assert all(type(m) is Int8Linear for m in (a[0], a[2], a[4]))
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert torch.equal(a[0].w_q, R.quantize_weight_int8(_mlp(3)[0].weight.detach())[0])  # quantized once, here


def test_qat_names_are_exported():
    for name in ("QATLinear", "FakeQuantize", "MinMaxObserver", "MovingAverageMinMaxObserver"):
        assert name in accelops.nn.__all__
    assert {"dynamic-int8", "qat-int8", "int8-from-qat"} <= set(accelops.nn.MODES)
