"""Quantization-aware training: the observers and FakeQuantize against torch.ao.quantization."""
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.ao.quantization import FakeQuantize as TorchFakeQuantize
from torch.ao.quantization import observer as tao

from accelops.nn import FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver

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
    kinds = draw(st.lists(st.sampled_from(["randn", "randn", "zeros", "const", "positive", "tiny"]),
                          min_size=steps, max_size=steps))
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
            torch.randn((), generator=gen))
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
            assert bool((scale > 0).all()) and bool(((zero_point >= ours.quant_min) & (zero_point <= ours.quant_max)).all())
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
            obs = tao.MovingAveragePerChannelMinMaxObserver if qscheme in PER_CHANNEL else tao.MovingAverageMinMaxObserver
            theirs = TorchFakeQuantize(obs, **kwargs)
        for _ in range(3):
            x = torch.randn(6, 9) * 2
            assert torch.equal(ours(x), theirs(x))


def test_fake_quantize_state_dict_and_eval_use_of_stored_qparams():
    fq = FakeQuantize(dtype=torch.qint8, qscheme=torch.per_channel_affine, ch_axis=0)
    x = torch.randn(4, 6)
    y = fq(x)
    state = fq.state_dict()
    assert set(state) == {"scale", "zero_point", "activation_post_process.eps", "activation_post_process.min_val",
                          "activation_post_process.max_val"}
    other = FakeQuantize(dtype=torch.qint8, qscheme=torch.per_channel_affine, ch_axis=0)
    other.load_state_dict(state)  # per-channel buffers sized on load
    assert torch.equal(other.fake_quant(x), y)
    other.disable_observer()
    assert torch.equal(other(x * 10), fq.fake_quant(x * 10))  # the stored qparams, not re-observed
    assert torch.equal(other.activation_post_process.min_val, fq.activation_post_process.min_val)


def test_fake_quantize_torch_compile_fullgraph_eager_backend():
    """fullgraph=True: no graph break, so no .item() or host branch on a tensor value."""
    def make():
        torch.manual_seed(0)
        return (FakeQuantize(dtype=torch.qint8, qscheme=torch.per_tensor_affine),
                FakeQuantize(MinMaxObserver, qscheme=torch.per_channel_symmetric, ch_axis=1))
    eager, twin = make(), make()
    step = torch.compile(lambda fqs, x: fqs[1](fqs[0](x)), fullgraph=True, backend="eager")
    for i in range(3):
        x = torch.randn(4, 6) * (i + 1)
        twin[1](x)  # size the per-channel statistics eagerly (a shape, set on the first call)
        eager[1](x)
        assert torch.equal(step(twin, x), eager[1](eager[0](x)))
    for a, b in zip(eager, twin):
        for (name, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
            assert torch.equal(u, v), name
