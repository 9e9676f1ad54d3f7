"""Drop-in layers (BitLinear, TernaryLinear, Int8Linear) and convert(), against
accelops.reference (reference/bitlinear.py for BitLinear's forward and STE backward)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import accelops
from accelops import reference as R
from accelops.nn import BitLinear, ConvertReport, Int8Linear, TernaryLinear, convert
from accelops.reference import bitlinear as RB

from .helpers import assert_close_to_reference, compiled_matches, grads_after_backward

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KS = [1, 5, 64, 127, 129, 300]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


# ------------------------------------------------------------------ the reference itself


def test_reference_is_fake_quant_with_straight_through_gradients():
    x = torch.randn(3, 40, requires_grad=True)
    w = torch.randn(8, 40, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = RB.bitlinear(x, w, b)
    x_q, x_scale = R.quantize_activation_int8(x.detach())
    wq, w_scale = R.ternary.quantize_weight_ternary_values(w.detach())
    x_deq, w_deq = x_q.float() * x_scale, wq.float() * w_scale
    assert torch.equal(y, F.linear(x_deq, w_deq, b.detach()))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w_deq)
    torch.testing.assert_close(w.grad, g.t() @ x_deq)
    torch.testing.assert_close(b.grad, g.sum(0))
    # the straight-through term adds an exact zero: the forward value is not perturbed
    v = torch.randn(5) / 3
    assert torch.equal(RB.straight_through(v, torch.randn(5, requires_grad=True)), v)


# ------------------------------------------------------------------ BitLinear


@given(
    lead=st.sampled_from([(), (0,), (1,), (3,), (2, 4)]),
    k=st.sampled_from(KS),
    n=st.integers(1, 24),
    per_channel=st.booleans(),
    with_bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
@SETTINGS
def test_bitlinear_matches_reference(lead, k, n, per_channel, with_bias, dtype):
    layer = BitLinear(k, n, bias=with_bias, per_channel=per_channel, dtype=dtype)
    x = (torch.randn(*lead, k) * 3).to(dtype)
    x1, x2 = _leaf(x), _leaf(x)
    w2 = _leaf(layer.weight)
    b2 = _leaf(layer.bias) if with_bias else None

    y = layer(x1)
    y_ref = RB.bitlinear(x2, w2, b2, per_channel)
    assert y.shape == y_ref.shape == (*x.shape[:-1], n) and y.dtype == dtype

    # The layer sums the integer products exactly and rounds only in the epilogue, the
    # reference rounds in its fp32 GEMM: judge both against fp64 on the same quantized values.
    x_q, x_scale = R.quantize_activation_int8(x)
    wq, w_scale = R.ternary.quantize_weight_ternary_values(layer.weight, per_channel)
    exact = (x_q.double() * x_scale.double()) @ (wq.double() * w_scale.double().reshape(-1, 1)).t()
    if with_bias:
        exact = exact + layer.bias.double()
    eps = torch.finfo(dtype).eps
    ref_err = (y_ref.double() - exact).abs().max().item() if exact.numel() else 0.0
    err = (y.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert err <= 2 * ref_err + 4 * eps * (exact.abs().max().item() if exact.numel() else 0.0) + 1e-30

    # ...and it is the inference matmul's spec to the bit
    packed = R.pack_ternary(wq)
    assert torch.equal(y, R.ternary_matmul(x, packed, w_scale, layer.bias))

    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, w2.grad)
    assert layer.weight.grad.dtype == dtype and x1.grad.dtype == dtype
    if with_bias:
        torch.testing.assert_close(layer.bias.grad, b2.grad)


def test_bitlinear_ignores_autocast_and_layout():
    layer = BitLinear(4096, 16)
    x = torch.randn(4096, 6).t()  # non-contiguous [6, K]
    y = layer(x.contiguous())
    assert torch.equal(layer(x), y)
    # a bf16 GEMM would round the integer sums to 8 bits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), y)


def test_bitlinear_saves_int8_tensors_for_backward():
    layer = BitLinear(256, 64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(32, 256, requires_grad=True))
    assert sorted((str(t.dtype), tuple(t.shape)) for t in saved) == sorted(
        [("torch.int8", (32, 256)), ("torch.float32", (32, 1)), ("torch.int8", (64, 256)), ("torch.float32", (1,))]
    )


@pytest.mark.parametrize("quantized", [False, True])
def test_bitlinear_matmul_is_the_layers_forward_and_backward(quantized):
    """accelops.ops.bitlinear_matmul: what BitLinear runs in training, as a function."""
    from accelops.reference.ternary import quantize_weight_ternary_values

    layer = BitLinear(130, 12, per_channel=True)
    x = torch.randn(2, 3, 130)
    y, grads = grads_after_backward(layer, x)
    w, b, xl = _leaf(layer.weight), _leaf(layer.bias), _leaf(x)
    q = quantize_weight_ternary_values(w.detach(), True) if quantized else None
    y_op = accelops.ops.bitlinear_matmul(xl, w, b, True, quantized=q)
    (y_op * torch.linspace(-1, 1, 12)).sum().backward()
    assert torch.equal(y_op.detach(), y)
    for got, want in zip((xl.grad, w.grad, b.grad), grads):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="K=130"):
        accelops.ops.bitlinear_matmul(torch.randn(3, 129), w)
    with pytest.raises(ValueError, match=r"shape \(12,\)"):
        accelops.ops.bitlinear_matmul(x, w, torch.zeros(13))


def test_bitlinear_is_an_nn_linear_and_loads_its_state_dict():
    torch.manual_seed(1)
    lin = nn.Linear(70, 9)
    torch.manual_seed(1)
    bit = BitLinear(70, 9)
    assert isinstance(bit, nn.Linear)
    assert torch.equal(bit.weight, lin.weight) and torch.equal(bit.bias, lin.bias)  # same init
    other = BitLinear(70, 9)
    other.load_state_dict(lin.state_dict())
    assert torch.equal(other.weight, lin.weight) and torch.equal(other.bias, lin.bias)
    lin.load_state_dict(other.state_dict())  # and the other way
    assert set(other.state_dict()) == {"weight", "bias"}
    assert "per_channel=False" in repr(other) and "in_features=70" in repr(other)


def test_bitlinear_from_linear_shares_parameters_and_goes_back():
    lin = nn.Linear(30, 6, bias=False)
    bit = BitLinear.from_linear(lin, per_channel=True)
    assert bit.weight is lin.weight and bit.bias is None and bit.per_channel
    back = bit.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got ReLU"):
        BitLinear.from_linear(nn.ReLU())


def test_bitlinear_trains():
    torch.manual_seed(0)
    model = nn.Sequential(BitLinear(16, 32), nn.ReLU(), BitLinear(32, 4))
    x, target = torch.randn(64, 16), torch.randn(64, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_bitlinear_eval_equals_its_ternary_conversion(backend, per_channel):
    bit = BitLinear(300, 24, per_channel=per_channel).eval()
    tern = TernaryLinear.from_bitlinear(bit)
    assert tern.per_channel == per_channel
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 7, 300).to(dtype)
        with torch.no_grad():
            assert_close_to_reference(tern(x), bit(x))


def _bit_model():
    return nn.Sequential(
        BitLinear(32, 48), nn.GELU(), BitLinear(48, 40, per_channel=True), nn.ReLU(), BitLinear(40, 8, bias=False)
    )


def test_bitlinear_torch_compile_fullgraph_eager_backend():
    compiled_matches(_bit_model(), torch.randn(3, 5, 32))


def test_bitlinear_torch_compile_fullgraph_inductor():
    # One layer: inductor's first compile costs ~30 s of g++ on a cold cache on 2 cores;
    # the multi-layer graph capture is covered by the eager-backend test above.
    torch._dynamo.reset()
    model = nn.Sequential(BitLinear(16, 8, per_channel=True), nn.ReLU())
    # inductor may fuse the epilogue (an FMA rounds once): a few ulps, not bit-identical
    compiled_matches(model, torch.randn(4, 16), backend="inductor", tol=1e-6)


def test_quantized_layers_torch_compile_fullgraph():
    lin = nn.Linear(64, 16)
    model = nn.Sequential(TernaryLinear.from_linear(lin), nn.ReLU(), Int8Linear.from_linear(nn.Linear(16, 4)))
    x = torch.randn(3, 64)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), model(x))


# ------------------------------------------------------------------ TernaryLinear / Int8Linear


def _roundtrip(module_cls, sd, *args, **kwargs):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = module_cls(*args, **kwargs)
    fresh.load_state_dict(torch.load(buf))
    return fresh


def test_ternary_linear_from_linear(backend):
    lin = nn.Linear(129, 10)
    t = TernaryLinear.from_linear(lin, per_channel=True)
    assert (t.in_features, t.out_features) == (129, 10)
    packed, scale = R.quantize_weight_ternary(lin.weight.detach(), per_channel=True)
    assert torch.equal(t.w_packed, packed) and torch.equal(t.w_scale, scale)
    assert t.w_packed.dtype == torch.uint8 and t.w_scale.dtype == torch.float32
    assert torch.equal(t.bias, lin.bias) and t.bias is not lin.bias
    assert torch.equal(t.weight, R.unpack_ternary(packed, 129).float() * scale[:, None])
    assert set(t.state_dict()) == {"w_packed", "w_scale", "bias"}
    x = torch.randn(4, 129)
    assert_close_to_reference(t(x), R.ternary_matmul(x, packed, scale, lin.bias.detach()))
    assert "per_channel=True" in repr(t)


def test_int8_linear_from_linear(backend):
    lin = nn.Linear(77, 12)
    q = Int8Linear.from_linear(lin)
    w_q, w_scale = R.quantize_weight_int8(lin.weight.detach())
    assert torch.equal(q.w_q, w_q) and torch.equal(q.w_scale, w_scale)
    assert torch.equal(q.weight, w_q.float() * w_scale[:, None])
    assert set(q.state_dict()) == {"w_q", "w_scale", "bias"}
    x = torch.randn(2, 3, 77)
    assert_close_to_reference(q(x), R.int8_linear(x, w_q, w_scale, lin.bias.detach()))


@given(k=st.sampled_from(KS), n=st.integers(1, 20), per_channel=st.booleans(), with_bias=st.booleans())
@SETTINGS
def test_ternary_linear_state_dict_roundtrip(k, n, per_channel, with_bias):
    t = TernaryLinear.from_linear(nn.Linear(k, n, bias=with_bias), per_channel=per_channel)
    fresh = _roundtrip(TernaryLinear, t.state_dict(), k, n, bias=with_bias, per_channel=per_channel)
    x = torch.randn(3, k)
    assert torch.equal(fresh(x), t(x))


@given(k=st.sampled_from(KS), n=st.integers(1, 20), with_bias=st.booleans())
@SETTINGS
def test_int8_linear_state_dict_roundtrip(k, n, with_bias):
    q = Int8Linear.from_linear(nn.Linear(k, n, bias=with_bias))
    fresh = _roundtrip(Int8Linear, q.state_dict(), k, n, bias=with_bias)
    x = torch.randn(3, k)
    assert torch.equal(fresh(x), q(x))


def test_bitlinear_state_dict_roundtrip():
    b = BitLinear(50, 7, per_channel=True)
    fresh = _roundtrip(BitLinear, b.state_dict(), 50, 7, per_channel=True)
    x = torch.randn(3, 50)
    assert torch.equal(fresh(x), b(x))


def test_quantized_layers_load_a_float_linear_state_dict():
    lin = nn.Linear(140, 9)
    t = TernaryLinear(140, 9, per_channel=True)
    t.load_state_dict(lin.state_dict())
    expected = TernaryLinear.from_linear(lin, per_channel=True)
    assert torch.equal(t.w_packed, expected.w_packed) and torch.equal(t.w_scale, expected.w_scale)
    q = Int8Linear(140, 9)
    q.load_state_dict(lin.state_dict())
    assert torch.equal(q.w_q, Int8Linear.from_linear(lin).w_q)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: .* expects a float weight of shape \(9, 141\)"):
        Int8Linear(141, 9).load_state_dict(lin.state_dict())


def test_mismatched_state_dict_names_key_and_shapes():
    sd = TernaryLinear.from_linear(nn.Linear(300, 8)).state_dict()  # 3 blocks of 128 -> 96 bytes a row
    with pytest.raises(
        RuntimeError,
        match=r"size mismatch for w_packed: TernaryLinear\(in_features=200, "
        r".*expects shape \(8, 64\) .*the checkpoint has \(8, 96\)",
    ):
        TernaryLinear(200, 8).load_state_dict(sd)
    with pytest.raises(
        RuntimeError,
        match=r"size mismatch for w_scale: .*expects shape \(8,\) "
        r"\(\[out_features\], per_channel=True\), the checkpoint has \(1,\)",
    ):
        TernaryLinear(300, 8, per_channel=True).load_state_dict(sd)
    nested = nn.Sequential(nn.ReLU(), TernaryLinear(300, 9))
    with pytest.raises(RuntimeError, match=r"size mismatch for 1\.w_packed: .*expects shape \(9, 96\)"):
        nested.load_state_dict({"1." + k: v for k, v in sd.items()})
    bad = dict(sd, w_packed=sd["w_packed"].to(torch.int8))
    with pytest.raises(
        RuntimeError, match=r"dtype mismatch for w_packed: .* expects torch.uint8, the checkpoint has torch.int8"
    ):
        TernaryLinear(300, 8).load_state_dict(bad)
    sd8 = Int8Linear.from_linear(nn.Linear(30, 4)).state_dict()
    with pytest.raises(
        RuntimeError, match=r"size mismatch for w_q: Int8Linear\(.*expects shape \(4, 31\) .*has \(4, 30\)"
    ):
        Int8Linear(31, 4).load_state_dict(sd8)


def test_to_linear_round_trips():
    lin = nn.Linear(200, 16)
    t = TernaryLinear.from_linear(lin)
    back = t.to_linear()
    assert type(back) is nn.Linear and torch.equal(back.weight, t.weight) and torch.equal(back.bias, t.bias)
    # re-quantizing the dequantized weight gives the same codes (|Wq * s / s'| >= 1 where Wq != 0)
    assert torch.equal(TernaryLinear.from_linear(back).w_packed, t.w_packed)
    q = Int8Linear.from_linear(lin)
    back = q.to_linear()
    assert torch.equal(back.weight, q.weight)
    again = Int8Linear.from_linear(back)
    assert torch.equal(again.w_q, q.w_q)
    torch.testing.assert_close(again.w_scale, q.w_scale, rtol=2e-7, atol=0)
    assert TernaryLinear.from_linear(lin.bfloat16()).to_linear().weight.dtype == torch.bfloat16


def test_half_and_bfloat16_keep_fp32_scales():
    lin = nn.Linear(64, 8)
    for layer in (TernaryLinear.from_linear(lin, per_channel=True), Int8Linear.from_linear(lin)):
        scale = layer.w_scale.clone()
        for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
            cast(layer)
            assert layer.w_scale.dtype == torch.float32 and torch.equal(layer.w_scale, scale)
        layer.to(torch.bfloat16)
        assert layer.bias.dtype == torch.bfloat16
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        assert layer(x).dtype == torch.bfloat16
        assert layer.to("cpu").w_scale.device.type == "cpu"


def test_quantized_layers_pass_straight_through_gradients():
    lin = nn.Linear(40, 5)
    t = TernaryLinear.from_linear(lin)
    x = torch.randn(3, 40, requires_grad=True)
    t(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 5) @ t.weight)
    assert t.bias.grad is not None


def test_constructor_checks():
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        TernaryLinear(0, 4)
    with pytest.raises(ValueError, match="out_features must be a positive int, got 2.0"):
        Int8Linear(3, 2.0)
    with pytest.raises(TypeError, match="per_channel must be a bool, got 'cpu'"):
        BitLinear(3, 3, True, "cpu")  # nn.Linear's 4th positional argument is device
    with pytest.raises(TypeError, match="per_channel must be a bool, got 1"):
        TernaryLinear(3, 3, per_channel=1)
    with pytest.raises(TypeError, match="per_channel must be a bool, got None"):
        convert(TinyLM(), "ternary", per_channel=None)
    with pytest.raises(TypeError, match="bitlinear must be a BitLinear, got Linear"):
        TernaryLinear.from_bitlinear(nn.Linear(3, 3))
    broken = nn.Linear(3, 3)
    with torch.no_grad():
        broken.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="w must be finite"):
        TernaryLinear.from_linear(broken)
    fresh = TernaryLinear(10, 3)  # before loading: zero weights, not the code for -1
    assert torch.equal(fresh.weight, torch.zeros(3, 10))


# ------------------------------------------------------------------ convert() on a tiny transformer

VOCAB, D, HEADS, HIDDEN = 50, 64, 4, 160


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm = nn.LayerNorm(D)
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.mlp_norm = nn.LayerNorm(D)
        self.gate_proj = nn.Linear(D, HIDDEN, bias=False)
        self.up_proj = nn.Linear(D, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).reshape(b, t, HEADS, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, D))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


LINEAR_NAMES = [
    f"blocks.{i}.{p}"
    for i in range(2)
    for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
] + ["lm_head"]
TARGET = {"bitlinear": BitLinear, "ternary": TernaryLinear, "int8": Int8Linear}


class _RefQuantLinear(nn.Module):
    """The layer convert() should produce, written with the references only."""

    def __init__(self, linear, mode, per_channel):
        super().__init__()
        w = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.mode = mode
        if mode == "int8":
            self.w_q, self.w_scale = R.quantize_weight_int8(w)
        else:
            self.w_packed, self.w_scale = R.quantize_weight_ternary(w, per_channel)

    def forward(self, x):
        if self.mode == "int8":
            return R.int8_linear(x, self.w_q, self.w_scale, self.bias)
        return R.ternary_matmul(x, self.w_packed, self.w_scale, self.bias)


def _swap_all_linears(module, make):
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
        else:
            _swap_all_linears(child, make)


def _cosine(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _tokens():
    return torch.randint(0, VOCAB, (2, 12))


def _weight_bytes(model, names):
    mods = dict(model.named_modules())
    return sum(sum(p.numel() * p.element_size() for p in mods[n].parameters()) for n in names)


@pytest.mark.parametrize("mode", ["bitlinear", "ternary", "int8"])
def test_convert_tiny_transformer(mode):
    model = TinyLM().eval()
    fp32 = copy.deepcopy(model)
    other_types = {n: type(m) for n, m in model.named_modules() if not isinstance(m, nn.Linear)}
    tokens = _tokens()
    bytes_before = _weight_bytes(model, LINEAR_NAMES)

    report = convert(model, mode, quantize_output=True)  # lm_head too (kept by default in the ternary modes)

    assert isinstance(report, ConvertReport) and report.mode == mode
    assert [s.fqn for s in report.swapped] == LINEAR_NAMES and report.num_swapped == 15
    first = report.swapped[0]
    assert (first.from_type, first.to_type, first.in_features, first.out_features) == (
        "Linear",
        TARGET[mode].__name__,
        D,
        D,
    )
    down = report.swapped[6]
    assert (down.fqn, down.in_features, down.out_features) == ("blocks.0.down_proj", HIDDEN, D)
    mods = dict(model.named_modules())
    assert all(type(mods[n]) is TARGET[mode] for n in LINEAR_NAMES)
    assert {n: type(m) for n, m in mods.items() if n not in LINEAR_NAMES} == other_types  # nothing else touched
    assert report.bytes_before == bytes_before
    assert report.bytes_after == _weight_bytes(model, LINEAR_NAMES) + sum(
        sum(b.numel() * b.element_size() for b in mods[n].buffers()) for n in LINEAR_NAMES
    )
    expected_ratio = {"bitlinear": (1.0, 1.0), "ternary": (8.0, 16.0), "int8": (3.5, 4.0)}[mode]
    assert expected_ratio[0] <= report.compression <= expected_ratio[1]
    text = str(report)
    assert f"convert(mode='{mode}'): swapped 15 layer(s)" in text and "blocks.1.down_proj" in text
    assert "MiB" in text and "x smaller" in text

    with torch.no_grad():
        y, y_fp32 = model(tokens), fp32(tokens)
    # random weights quantize coarsely to ternary (measured ~0.92); int8 barely moves the logits (~0.99997)
    assert _cosine(y, y_fp32) > {"bitlinear": 0.85, "ternary": 0.85, "int8": 0.999}[mode]
    for n in LINEAR_NAMES:
        assert mods[n].weight.device == fp32.lm_head.weight.device


@pytest.mark.parametrize("mode", ["bitlinear", "ternary", "int8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_convert_equals_model_built_from_references(monkeypatch, mode, per_channel):
    monkeypatch.setenv("ACCELOPS_BACKEND", "reference")
    model = TinyLM()
    ref = copy.deepcopy(model)
    ref_mode = "int8" if mode == "int8" else "ternary"
    _swap_all_linears(ref, lambda lin: _RefQuantLinear(lin, ref_mode, per_channel))
    convert(model, mode, per_channel=per_channel, quantize_output=True)
    tokens = _tokens()
    with torch.no_grad():
        # BitLinear's fake quantization is the ternary inference computation, to the bit
        assert torch.equal(model(tokens), ref(tokens))


def test_convert_filter_skips_lm_head():
    model = TinyLM()
    seen = []

    def keep(module, fqn):
        seen.append((type(module), fqn))
        return fqn != "lm_head"

    report = convert(model, "ternary", filter=keep, quantize_output=True)
    assert seen == [(nn.Linear, n) for n in LINEAR_NAMES]
    assert report.num_swapped == 14 and type(model.lm_head) is nn.Linear
    assert report.skipped == [("lm_head", "filter returned False")]
    assert "skipped lm_head: filter returned False" in str(report)


def test_convert_bitlinear_model_to_ternary_uses_from_bitlinear(backend):
    model = TinyLM().eval()
    convert(model, "bitlinear", per_channel=True, quantize_output=True)
    tokens = _tokens()
    with torch.no_grad():
        y_bit = model(tokens)
    report = convert(model, "ternary")  # per_channel comes from each BitLinear
    assert report.num_swapped == 15 and {s.from_type for s in report.swapped} == {"BitLinear"}
    assert all(m.per_channel for m in model.modules() if isinstance(m, TernaryLinear))
    with torch.no_grad():
        y_tern = model(tokens)
    # identical per layer up to epilogue rounding, which later layers' int8 rounding can amplify
    assert _cosine(y_tern, y_bit) > 0.9999


def test_convert_bitlinear_shares_parameters_and_trains():
    model = TinyLM()
    params_before = {id(p) for p in model.parameters()}
    convert(model, "bitlinear")
    assert {id(p) for p in model.parameters()} == params_before  # optimizer references stay valid
    loss = F.cross_entropy(model(_tokens()).flatten(0, 1), _tokens().flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_convert_to_linear_round_trip():
    model = TinyLM()
    convert(model, "ternary")
    converted = [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]
    for fqn, layer in converted:
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, name, layer.to_linear())
    assert sum(type(m) is nn.Linear for m in model.modules()) == 15
    again = copy.deepcopy(model)
    convert(again, "ternary")
    for fqn, layer in converted:
        assert torch.equal(again.get_submodule(fqn).w_packed, layer.w_packed)


@pytest.mark.parametrize("mode", ["bitlinear", "ternary", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_convert_low_precision_models_keep_dtype(mode, dtype):
    model = TinyLM().to(dtype)
    report = convert(model, mode, quantize_output=True)
    assert report.num_swapped == 15
    y = model(_tokens())
    assert y.dtype == dtype and torch.isfinite(y).all()
    for m in model.modules():
        if isinstance(m, (TernaryLinear, Int8Linear)):
            assert m.w_scale.dtype == torch.float32
            assert m.bias is None or m.bias.dtype == dtype


def test_convert_bad_input_and_nothing_to_swap():
    with pytest.raises(ValueError, match=r"mode must be one of \('bitlinear', 'ternary', 'int8', .*\), got 'int4'"):
        convert(TinyLM(), "int4")
    with pytest.raises(TypeError, match="filter must be callable"):
        convert(TinyLM(), "int8", filter="lm_head")
    with pytest.raises(TypeError, match="filter must return a bool, got NoneType for 'blocks.0.q_proj'"):
        convert(TinyLM(), "int8", filter=lambda m, fqn: None)
    with pytest.raises(ValueError, match="model is itself a Linear"):
        convert(nn.Linear(4, 4), "int8")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert("model", "int8")
    report = convert(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), "ternary")
    assert report.num_swapped == 0 and report.bytes_before == report.bytes_after == 0
    assert "swapped 0 layer(s)" in str(report)
    model = TinyLM()
    convert(model, "int8")
    assert convert(model, "int8").num_swapped == 0  # already converted: a no-op


def test_convert_keeps_shared_layers_shared_and_skips_linear_subclasses():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = convert(model, "int8")
    assert model[0] is model[2] and type(model[0]) is Int8Linear
    assert [s.fqn for s in report.swapped] == ["0", "2"]
    assert report.bytes_before == (8 * 8 + 8) * 4  # counted once
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    report = convert(mha, "ternary")
    assert [s.fqn for s in report.swapped] == ["1"]
    assert report.skipped == [
        ("0.out_proj", "NonDynamicallyQuantizableLinear is a subclass of nn.Linear, not nn.Linear")
    ]
    model = nn.Sequential(BitLinear(8, 8))
    report = convert(model, "int8")
    assert report.num_swapped == 0 and "use mode='ternary'" in report.skipped[0][1]


def test_convert_is_exported_at_top_level():
    assert accelops.convert is convert and "convert" in accelops.__all__


def test_quantized_layers_nested_load_a_float_state_dict():
    # the float weight of a nested layer ("1.weight") is quantized into "1.w_q", not "w_q"
    lin = nn.Sequential(nn.ReLU(), nn.Linear(40, 6))
    q = nn.Sequential(nn.ReLU(), Int8Linear(40, 6))
    q.load_state_dict(lin.state_dict())
    assert torch.equal(q[1].w_q, Int8Linear.from_linear(lin[1]).w_q)
    t = nn.Sequential(nn.ReLU(), TernaryLinear(40, 6))
    t.load_state_dict(lin.state_dict())
    assert torch.equal(t[1].w_packed, TernaryLinear.from_linear(lin[1]).w_packed)
