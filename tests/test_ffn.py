"""Fused FFN family: every backend against accelops.reference.ffn, with float error judged
against eager PyTorch's own error versus an fp64 computation; the op registration
(opcheck, torch.compile), what backward saves, and the FusedFFN module."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from accelops import ops
from accelops.nn import FFN, BitLinear, FusedFFN, Int8Linear
from accelops.reference import ffn as RF

from .helpers import compiled_matches, grads_after_backward

ACTS = ["swiglu", "geglu", "gelu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------ helpers


def _inputs(lead, d, h, activation, dtype=torch.float32, bias=False, requires_grad=True):
    """x [*lead, D] and weights scaled so every projection is O(1)."""

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_(requires_grad)

    x = leaf(*lead, d)
    w_gate = leaf(h, d, scale=d**-0.5) if RF.gated(activation) else None
    w_up = leaf(h, d, scale=d**-0.5)
    w_down = leaf(d, h, scale=h**-0.5)
    b = None
    if bias:
        b = (leaf(h, scale=0.5) if RF.gated(activation) else None, leaf(h, scale=0.5), leaf(d, scale=0.5))
    return x, w_gate, w_up, w_down, b


def _flat(x, w_gate, w_up, w_down, b):
    return [t for t in (x, w_gate, w_up, w_down, *(b or ())) if t is not None]


def _run(fn, args, activation, dy=None):
    """-> (y, dy, grads of every tensor input) for y = fn(...), backward with dy."""
    x, w_gate, w_up, w_down, b = args
    y = fn(x, w_gate, w_up, w_down, b, activation)
    if dy is None:
        dy = torch.randn(y.shape).to(y.dtype)
    leaves = _flat(*args)
    grads = (
        torch.autograd.grad(y, leaves, dy, allow_unused=True) if y.numel() else [torch.zeros_like(t) for t in leaves]
    )
    return y, dy, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def _as(args, dtype):
    x, w_gate, w_up, w_down, b = args
    cast = lambda t: None if t is None else t.detach().to(dtype).requires_grad_(True)  # noqa: E731
    return cast(x), cast(w_gate), cast(w_up), cast(w_down), None if b is None else tuple(cast(t) for t in b)


def _err(a, exact):
    return (a.double() - exact).abs().max().item() if a.numel() else 0.0


def _abs(args):
    f = lambda t: None if t is None else t.detach().double().abs().requires_grad_(True)  # noqa: E731
    x, w_gate, w_up, w_down, b = args
    return f(x), f(w_gate), f(w_up), f(w_down), None if b is None else tuple(f(t) for t in b)


def assert_within_eager_error(args, activation, fn=ops.fused_ffn):
    """Output and every gradient of `fn` are at most 2x as far (max abs) from an fp64
    computation as eager PyTorch in the inputs' dtype (the reference, run eagerly), plus a
    floor of 2 ulps of the magnitude of the summed terms (the fp64 computation on |inputs|
    and |dy|). The floor matters only where a tiny tensor's sum cancels and eager happened
    to round luckily: over 5184 small-shape checks of the C++ kernel the floor-free
    criterion failed 14 times while the mean error matched eager's (ratio 0.6-1.05)."""
    dtype = args[0].dtype
    y, dy, grads = _run(fn, args, activation)
    y_e, _, grads_e = _run(RF.fused_ffn, _as(args, dtype), activation, dy)
    y_x, _, grads_x = _run(RF.fused_ffn, _as(args, torch.float64), activation, dy.double())
    y_a, _, grads_a = _run(RF.fused_ffn, _abs(args), activation, dy.double().abs())
    assert y.shape == y_e.shape and y.dtype == dtype
    eps = torch.finfo(dtype).eps
    names = ["y"] + [f"grad {i}" for i in range(len(grads))]
    for name, mine, eager, exact, mag in zip(names, [y, *grads], [y_e, *grads_e], [y_x, *grads_x], [y_a, *grads_a]):
        assert mine.shape == exact.shape and mine.dtype == dtype, name
        floor = 2 * eps * (mag.abs().max().item() if mag.numel() else 0.0) + 1e-30
        e_mine, e_eager = _err(mine, exact), _err(eager, exact)
        assert e_mine <= 2 * e_eager + floor, f"{name}: error {e_mine:.3g} vs eager {e_eager:.3g} ({dtype})"


# ------------------------------------------------------------------ every backend against the spec


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_matches_reference_within_eager_error(backend, activation, dtype):
    args = _inputs((2, 5), 24, 40, activation, dtype, bias=dtype == torch.float32)
    assert_within_eager_error(args, activation)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize(
    "lead,d,h",
    [((3,), 1, 7), ((3,), 9, 1), ((1,), 1, 1), ((0,), 8, 16), ((2, 0, 3), 8, 16), ((2, 3, 2), 17, 33), ((), 12, 20)],
)
def test_odd_shapes(backend, activation, lead, d, h):
    assert_within_eager_error(_inputs(lead, d, h, activation, bias=True), activation)


def test_non_contiguous_x_and_partial_bias(backend):
    x, w_gate, w_up, w_down, _ = _inputs((5,), 24, 40, "swiglu")
    x_t = torch.randn(24, 5).t().requires_grad_(True)  # [5, 24], strides (1, 5)
    b = (None, torch.randn(40, requires_grad=True), None)
    assert_within_eager_error((x_t, w_gate, w_up, w_down, b), "swiglu")


def test_nan_stays_in_its_row(backend):
    x, w_gate, w_up, w_down, _ = _inputs((4,), 16, 24, "swiglu", requires_grad=False)
    x[2, 3] = float("nan")
    y = ops.fused_ffn(x, w_gate, w_up, w_down)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()


@given(
    lead=st.sampled_from([(0,), (1,), (3,), (2, 3), (17,)]),
    d=st.sampled_from([1, 2, 7, 33]),
    h=st.sampled_from([1, 5, 40]),
    activation=st.sampled_from(ACTS),
    bias=st.booleans(),
)
@SETTINGS
def test_shapes_hypothesis(backend, lead, d, h, activation, bias):
    assert_within_eager_error(_inputs(lead, d, h, activation, bias=bias), activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_ffn_activation_matches_reference(backend, activation, dtype):
    g = None if activation == "gelu" else (torch.randn(3, 50) * 3).to(dtype).requires_grad_(True)
    u = (torch.randn(3, 50) * 3).to(dtype).requires_grad_(True)
    h = ops.ffn_activation(g, u, activation)
    dh = torch.randn(h.shape).to(dtype)
    leaves = [t for t in (g, u) if t is not None]
    grads = torch.autograd.grad(h, leaves, dh)
    g64 = None if g is None else g.detach().double().requires_grad_(True)
    u64 = u.detach().double().requires_grad_(True)
    h64 = RF.ffn_activation(g64, u64, activation)
    grads64 = torch.autograd.grad(h64, [t for t in (g64, u64) if t is not None], dh.double())
    g_e = None if g is None else g.detach().requires_grad_(True)
    u_e = u.detach().requires_grad_(True)
    h_e = RF.ffn_activation(g_e, u_e, activation)
    grads_e = torch.autograd.grad(h_e, [t for t in (g_e, u_e) if t is not None], dh)
    eps = torch.finfo(dtype).eps
    for mine, eager, exact in zip([h, *grads], [h_e, *grads_e], [h64, *grads64]):
        assert mine.dtype == dtype
        assert _err(mine, exact) <= 2 * _err(eager, exact) + 2 * eps * exact.abs().max().item()


# ------------------------------------------------------------------ what is saved


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, shapes


@pytest.mark.parametrize("activation", ACTS)
def test_backward_saves_only_g_and_u_of_the_hidden_width(activation):
    t, d, h = 6, 8, 24
    args = _inputs((t,), d, h, activation, bias=True)
    _, shapes = _saved_shapes(lambda: ops.fused_ffn(*args[:4], args[4], activation))
    hidden = [s for s in shapes if s == (t, h)]
    assert len(hidden) == (2 if RF.gated(activation) else 1), shapes  # g and u; u alone for gelu
    # eager PyTorch saves more: act(g) (or its input) and h as well
    _, eager = _saved_shapes(lambda: RF.fused_ffn(*args[:4], args[4], activation))
    assert len([s for s in eager if s == (t, h)]) > len(hidden)


def test_inference_saves_nothing():
    x, w_gate, w_up, w_down, _ = _inputs((5,), 8, 16, "swiglu", requires_grad=False)
    y, g, u = torch.ops.accelops.fused_ffn(x, w_gate, w_up, w_down, None, None, None, "swiglu", False, False)
    assert g.numel() == 0 and u.numel() == 0
    with torch.no_grad():
        w = w_up.clone().requires_grad_(True)
        _, shapes = _saved_shapes(lambda: ops.fused_ffn(x, w_gate, w, w_down))
    assert shapes == []


def test_backward_without_saved_tensors_raises():
    x, w_gate, w_up, w_down, _ = _inputs((5,), 8, 16, "swiglu")
    y, _, _ = torch.ops.accelops.fused_ffn(x, w_gate, w_up, w_down, None, None, None, "swiglu", False, False)
    with pytest.raises(RuntimeError, match="saved nothing"):
        y.sum().backward()


def test_blocks_larger_than_one_agree():
    # More tokens than one CPU block (512 rows): the blocked accumulation of the weight
    # gradients must equal the single-block result up to rounding.
    args = _inputs((1100,), 16, 24, "swiglu", bias=True)
    assert_within_eager_error(args, "swiglu")


# ------------------------------------------------------------------ consuming backward
# On float32 CPU tensors whose graph is not retained, backward overwrites the saved g/u
# with dg/du and returns their pages as it goes (fused_ffn_backward_consume_); the
# gradients must be bit-identical to the plain backward's, and it must never run when
# someone could still read g or u.


def _backward_kernels(monkeypatch):
    from accelops.ops import ffn as ffn_ops

    used = []
    real = ffn_ops._backward

    def spy(kernel, *args):
        used.append(kernel.__name__)
        return real(kernel, *args)

    monkeypatch.setattr(ffn_ops, "_backward", spy)
    return used


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_consuming_backward_equals_plain_backward(monkeypatch, activation, act_quant):
    used = _backward_kernels(monkeypatch)
    # 1100 tokens: three CPU blocks of 512, so pages are released between blocks
    args = _inputs((2, 550), 16, 40, activation, bias=True)
    dy = torch.randn(2, 550, 16)
    leaves = _flat(*args)

    def grads(**kw):
        y = ops.fused_ffn(*args[:4], args[4], activation, act_quant=act_quant)
        return torch.autograd.grad(y, leaves, dy, **kw)

    lean, plain = grads(), grads(retain_graph=True)
    assert used == ["fused_ffn_backward_consume_", "fused_ffn_backward"]
    for a, b in zip(lean, plain):
        assert torch.equal(a, b)


def test_retained_graph_backward_twice_is_right(monkeypatch):
    used = _backward_kernels(monkeypatch)
    args = _inputs((700,), 8, 24, "swiglu")
    y = ops.fused_ffn(*args[:4], None, "swiglu")
    first = torch.autograd.grad(y.sum(), _flat(*args), retain_graph=True)
    second = torch.autograd.grad(y.sum(), _flat(*args))
    assert used == ["fused_ffn_backward", "fused_ffn_backward_consume_"]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_held_outputs_are_never_consumed(monkeypatch):
    used = _backward_kernels(monkeypatch)
    x, w_gate, w_up, w_down, _ = _inputs((600,), 8, 24, "swiglu")
    y, g, u = torch.ops.accelops.fused_ffn(x, w_gate, w_up, w_down, None, None, None, "swiglu", True, False)
    g_copy, u_copy = g.detach().clone(), u.detach().clone()
    y.sum().backward()
    assert used == ["fused_ffn_backward"]
    assert torch.equal(g, g_copy) and torch.equal(u, u_copy)


@pytest.mark.parametrize("hooks", ["identity", "save_on_cpu"])
def test_consuming_backward_under_saved_tensor_hooks(hooks):
    args = _inputs((600,), 8, 24, "geglu", bias=True)
    expected = _run(lambda *a: ops.fused_ffn(*a[:4], a[4], a[5]), args, "geglu")
    ctx = (
        torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        if hooks == "identity"
        else torch.autograd.graph.save_on_cpu()
    )
    with ctx:
        got = _run(lambda *a: ops.fused_ffn(*a[:4], a[4], a[5]), args, "geglu", dy=expected[1])
    for a, b in zip(expected[2], got[2]):
        assert torch.equal(a, b)


def test_consuming_backward_opcheck():
    x, w_gate, w_up, w_down, b = _inputs((600,), 8, 12, "swiglu", bias=True, requires_grad=False)
    y, g, u = torch.ops.accelops.fused_ffn(x, w_gate, w_up, w_down, *b, "swiglu", True, False)
    op = torch.ops.accelops.fused_ffn_backward_consume_.default
    torch.library.opcheck(
        op, (torch.randn_like(y), x, g, u, w_gate, w_up, w_down, "swiglu", True, True, True, False, True, True)
    )
    xg, _, wu, wd, _ = _inputs((5,), 8, 12, "gelu", requires_grad=False)
    y, g, u = torch.ops.accelops.fused_ffn(xg, None, wu, wd, None, None, None, "gelu", True, False)
    torch.library.opcheck(
        op, (torch.randn_like(y), xg, g, u, None, wu, wd, "gelu", False, False, False, True, True, False)
    )


# ------------------------------------------------------------------ bad input


def _bad_cases():
    x, w_gate, w_up, w_down, _ = _inputs((3,), 8, 16, "swiglu", requires_grad=False)
    good = dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    hb = torch.zeros(16)
    return [
        (dict(good, x=x.long()), {}, TypeError, r"x must be float32, bfloat16 or float16, got torch.int64"),
        (dict(good, w_up=w_up[:, :7]), {}, ValueError, r"w_up must have shape \(H, D=8\)"),
        (dict(good, w_gate=w_gate[:15]), {}, ValueError, r"w_gate must have shape \(16, 8\)"),
        (
            dict(good, w_down=w_down.t()),
            {},
            ValueError,
            r"w_down must have shape \(8, 16\) \[dim, hidden\], got \(16, 8\)",
        ),
        (dict(good, w_down=w_down.double()), {}, TypeError, r"w_down must be float32, bfloat16 or float16"),
        (dict(good, w_up=w_up.half()), {}, TypeError, r"w_up must have x's dtype torch.float32, got torch.float16"),
        (dict(good, w_gate=None), {}, ValueError, r"w_gate is required for the gated activation 'swiglu'"),
        (good, {"activation": "gelu"}, ValueError, r"w_gate must be None for activation 'gelu'"),
        (
            good,
            {"activation": "relu"},
            ValueError,
            r"activation must be one of \('swiglu', 'geglu', 'gelu'\), got 'relu'",
        ),
        (good, {"bias": hb}, TypeError, r"bias must be None or a sequence of three"),
        (good, {"bias": (hb, hb)}, TypeError, r"bias must be None or a sequence of three"),
        (good, {"bias": (hb, hb, hb)}, ValueError, r"bias b_down must have shape \(8,\), got \(16,\)"),
        (good, {"bias": (hb[:3], None, None)}, ValueError, r"bias b_gate must have shape \(16,\), got \(3,\)"),
        (good, {"bias": (None, hb.half(), None)}, TypeError, r"bias b_up must have x's dtype"),
        (
            dict(good, w_gate=None),
            {"activation": "gelu", "bias": (hb, None, None)},
            ValueError,
            r"b_gate must be None for activation 'gelu'",
        ),
        (dict(good, x=x.to("meta")), {}, ValueError, r"w_gate is on cpu but x is on meta"),
        (dict(good, w_up=w_up.tolist()), {}, TypeError, r"w_up must be a torch.Tensor, got list"),
    ]


@pytest.mark.parametrize("case", range(17))
def test_bad_input_messages(case):
    tensors, kwargs, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        ops.fused_ffn(tensors["x"], tensors["w_gate"], tensors["w_up"], tensors["w_down"], **kwargs)


@given(
    which=st.sampled_from(["w_gate", "w_up", "w_down"]),
    dim=st.sampled_from([0, 1]),
    delta=st.sampled_from([-3, -1, 1, 5]),
)
@settings(max_examples=20, deadline=None)
def test_any_weight_shape_mismatch_names_the_weight(which, dim, delta):
    x, w_gate, w_up, w_down, _ = _inputs((2,), 8, 16, "geglu", requires_grad=False)
    ws = dict(w_gate=w_gate, w_up=w_up, w_down=w_down)
    shape = list(ws[which].shape)
    shape[dim] += delta
    ws[which] = torch.randn(*shape)
    with pytest.raises(ValueError, match=which):
        ops.fused_ffn(x, ws["w_gate"], ws["w_up"], ws["w_down"], activation="geglu")


def test_ffn_activation_bad_input():
    u = torch.randn(3, 4)
    with pytest.raises(ValueError, match="g must have u's shape"):
        ops.ffn_activation(torch.randn(3, 5), u)
    with pytest.raises(ValueError, match="g is required"):
        ops.ffn_activation(None, u, "geglu")
    with pytest.raises(ValueError, match="g must be None"):
        ops.ffn_activation(u, u, "gelu")
    with pytest.raises(TypeError, match="g must have u's dtype"):
        ops.ffn_activation(u.half(), u)


# ------------------------------------------------------------------ registration


def _opcheck_cases():
    x, w_gate, w_up, w_down, b = _inputs((2, 3), 8, 12, "swiglu", bias=True)
    xg, _, wu_g, wd_g, bg = _inputs((4,), 8, 12, "gelu", dtype=torch.bfloat16, bias=True, requires_grad=False)
    fwd = torch.ops.accelops.fused_ffn.default
    bwd = torch.ops.accelops.fused_ffn_backward.default
    d = lambda t: t.detach()  # noqa: E731
    y, g, u = fwd(d(x), d(w_gate), d(w_up), d(w_down), None, None, None, "swiglu", True, False)
    return [
        (fwd, (x, w_gate, w_up, w_down, *b, "swiglu", True, False)),
        (fwd, (x, w_gate, w_up, w_down, None, None, None, "geglu", True, True)),
        (fwd, (xg, None, wu_g, wd_g, None, bg[1], bg[2], "gelu", False, False)),
        (
            bwd,
            (
                torch.randn_like(y),
                d(x),
                g,
                u,
                d(w_gate),
                d(w_up),
                d(w_down),
                "swiglu",
                True,
                False,
                True,
                False,
                True,
                True,
            ),
        ),
        (
            bwd,
            (
                torch.randn_like(y),
                d(x),
                g,
                u,
                d(w_gate),
                d(w_up),
                d(w_down),
                "swiglu",
                False,
                False,
                False,
                True,
                False,
                True,
            ),
        ),
        (
            torch.ops.accelops.ffn_activation.default,
            (torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True), "geglu"),
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _model(d=16, h=24, activation="swiglu"):
    return nn.Sequential(nn.Linear(d, d), FusedFFN(d, h, activation, bias=True), nn.LayerNorm(d))


def test_torch_compile_fullgraph_eager_backend():
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(3, 5, 16)
    compiled = compiled_matches(model, x)
    with torch.no_grad():  # the inference graph (save=False) as well
        assert torch.equal(compiled(x), model(x))


def test_torch_compile_fullgraph_inductor():
    torch._dynamo.reset()
    compiled_matches(_model(8, 12, "geglu"), torch.randn(4, 8), backend="inductor", tol=1e-5)


# ------------------------------------------------------------------ FusedFFN


class LlamaMLP(nn.Module):
    """transformers' LlamaMLP, as written there."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_loads_a_llama_mlp_state_dict():
    mlp = LlamaMLP(16, 40)
    buf = io.BytesIO()
    torch.save(mlp.state_dict(), buf)
    buf.seek(0)
    fused = FusedFFN(16, 40)
    fused.load_state_dict(torch.load(buf))
    assert fused.state_dict().keys() == mlp.state_dict().keys()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(fused(x), mlp(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ACTS)
def test_from_module_round_trip(activation):
    ref = FFN(12, 20, activation, bias=True)
    fused = FusedFFN.from_module(ref)
    assert fused.activation == activation and fused.up_proj.weight is ref.up_proj.weight  # shared, not copied
    assert (fused.gate_proj is None) == (activation == "gelu")
    x = torch.randn(3, 12, requires_grad=True)
    y_f, y_r = fused(x), ref(x)
    torch.testing.assert_close(y_f, y_r, rtol=1e-5, atol=1e-6)
    back = fused.to_module()
    assert isinstance(back, FFN) and isinstance(back.up_proj, nn.Linear)
    assert back.state_dict().keys() == ref.state_dict().keys()
    torch.testing.assert_close(back(x), y_r, rtol=0, atol=0)
    # gradients reach the shared parameters
    y_f.sum().backward()
    assert ref.up_proj.weight.grad is not None and ref.down_proj.bias.grad is not None


def test_from_module_activation_inference_and_errors():
    mlp = LlamaMLP(8, 16)
    assert FusedFFN.from_module(mlp).activation == "swiglu"
    mlp.act_fn = nn.ReLU()
    with pytest.raises(ValueError, match="cannot infer the activation"):
        FusedFFN.from_module(mlp)
    assert FusedFFN.from_module(mlp, activation="geglu").activation == "geglu"
    with pytest.raises(ValueError, match="needs gate_proj"):
        FusedFFN.from_module(FFN(8, 16, "gelu"), activation="swiglu")
    mlp.act_fn = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="cannot infer"):
        FusedFFN.from_module(mlp)
    with pytest.raises(ValueError, match="quant must be one of"):
        FusedFFN(8, 16, quant="int4")
    with pytest.raises(ValueError, match="activation must be one of"):
        FusedFFN(8, 16, activation="relu")


def _bitlinear_unfused(fused: FusedFFN, x):
    act = RF.activation_fn(fused.activation)
    u = fused.up_proj(x)
    h = F.gelu(u) if fused.gate_proj is None else act(fused.gate_proj(x)) * u
    return fused.down_proj(h)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_bitlinear_mode_matches_three_bitlinear_layers(backend, activation):
    fused = FusedFFN(32, 48, activation, bias=True, quant="bitlinear")
    assert isinstance(fused.up_proj, BitLinear)
    unfused = copy.deepcopy(fused)
    x = torch.randn(2, 5, 32)
    y_f, g_f = grads_after_backward(fused, x)
    y_u, g_u = grads_after_backward(_Unfused(unfused), x)
    scale = y_u.abs().max()
    # Same quantized operands; only fp32 summation order differs (BitLinear sums the int
    # products exactly, then scales), so h may straddle an int8 rounding boundary at worst.
    assert (y_f - y_u).abs().max() <= 1e-3 * scale
    for a, b in zip(g_f, g_u):
        assert (a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-6


class _Unfused(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        return _bitlinear_unfused(self.fused, x)


def test_int8_mode(backend):
    ref = FFN(40, 64, "swiglu", bias=True)
    q = FusedFFN.from_module(ref, quant="int8")
    assert isinstance(q.up_proj, Int8Linear) and q.up_proj.w_q.dtype == torch.int8
    x = torch.randn(3, 40)
    y = q(x)
    # the same computation from its parts: int8 projections and the reference activation
    g = q.gate_proj(x)
    u = q.up_proj(x)
    expected = q.down_proj(RF.ffn_activation(g, u, "swiglu"))
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-4)
    # and close to the float module it came from (int8 quantization error only)
    assert (y - ref(x)).abs().max() <= 0.05 * ref(x).abs().max()
    back = q.to_module()
    assert isinstance(back.up_proj, nn.Linear)
    torch.testing.assert_close(back.up_proj.weight, q.up_proj.weight)
    # a float Llama state_dict loads into the int8 module (quantized on load)
    q2 = FusedFFN(40, 64, "swiglu", bias=True, quant="int8")
    q2.load_state_dict(ref.state_dict())
    assert torch.equal(q2.up_proj.w_q, q.up_proj.w_q)


def test_autocast_runs_the_op_in_the_autocast_dtype():
    ref = FFN(16, 24, "swiglu", bias=True)
    fused = FusedFFN.from_module(ref)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = fused(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
