"""Issue 22, item 6: BitLinear at inference (no gradient asked) runs the packed ternary
kernel on a cached packed weight: the same output as its training forward and as
TernaryLinear.from_bitlinear, bit for bit, with the cache following the weight."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import accelops.nn.bitlinear as bitlinear_module
from accelops import ops
from accelops.nn import BitLinear, TernaryLinear

from .helpers import assert_close_to_reference


class Spy:
    """Counts packed-path calls (ops.ternary_matmul), training-path calls and weight
    quantizations for the packed path (ops.quantize_weight_ternary)."""

    def __init__(self, monkeypatch):
        self.packed = self.training = self.quantized = 0
        real_mm, real_q = ops.ternary_matmul, ops.quantize_weight_ternary
        real_fn = bitlinear_module._BitLinearFunction.apply

        def mm(*args, **kwargs):
            self.packed += 1
            return real_mm(*args, **kwargs)

        def quantize(*args, **kwargs):
            self.quantized += 1
            return real_q(*args, **kwargs)

        def training(*args):
            self.training += 1
            return real_fn(*args)

        monkeypatch.setattr(ops, "ternary_matmul", mm)
        monkeypatch.setattr(ops, "quantize_weight_ternary", quantize)
        monkeypatch.setattr(bitlinear_module._BitLinearFunction, "apply", training)

    def counts(self):
        return self.packed, self.training, self.quantized


def _training_forward(layer, x):
    """The training path's output (grad enabled, weight requiring grad), detached."""
    with torch.enable_grad():
        assert layer.weight.requires_grad
        return layer(x).detach()


# ------------------------------------------------------------------ same output, every backend


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("k", [100, 300, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inference_equals_training_forward_and_ternary_linear(backend, per_channel, k, dtype):
    layer = BitLinear(k, 24, per_channel=per_channel)
    with torch.no_grad():
        layer.bias.mul_(3)
    x = (torch.randn(2, 5, k) * 2).to(dtype)
    tern = TernaryLinear.from_bitlinear(layer)
    y_train = _training_forward(layer, x)
    with torch.no_grad():
        y_fast = layer(x)
        assert torch.equal(y_fast, tern(x))
    if backend == "triton" and dtype == torch.bfloat16:
        # The Triton interpreter truncates the fp32 -> bf16 store (GPUs round to nearest
        # even, as torch does): 1 bf16 ulp, within the ops' contract with the reference.
        assert_close_to_reference(y_fast, y_train)
    else:
        assert torch.equal(y_fast, y_train)


def test_low_precision_layer_equals_its_ternary_conversion(backend):
    layer = BitLinear(300, 16, per_channel=True).to(torch.bfloat16)
    x = torch.randn(3, 300, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), TernaryLinear.from_bitlinear(layer)(x))
    y_train = _training_forward(layer, x)
    with torch.no_grad():
        if backend == "triton":
            assert_close_to_reference(layer(x), y_train)
        else:
            assert torch.equal(layer(x), y_train)


# ------------------------------------------------------------------ which path runs


def test_packed_path_only_when_no_gradient_is_asked(monkeypatch):
    layer = BitLinear(64, 8)
    x = torch.randn(3, 64)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        layer(x)
    assert spy.counts() == (1, 0, 1)  # train mode under no_grad: packed too
    layer.eval()
    with torch.inference_mode():
        layer(x)
    assert spy.counts() == (2, 0, 2)  # .eval() dropped the cache: quantized again
    with torch.no_grad():
        layer(x)
    assert spy.counts() == (3, 0, 2)  # cached (and made outside inference_mode's tensors)
    # eval mode, grad enabled, a weight that requires grad: maybe fine-tuning, keep its gradient
    y = layer(x)
    assert spy.counts() == (3, 1, 2)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    # frozen layer, x without grad: packed
    layer.requires_grad_(False)
    layer(x)
    assert spy.counts() == (4, 1, 2)
    # frozen layer but x asks for a gradient: the training path, which gives x's
    # straight-through gradient on every backend
    x_leaf = x.clone().requires_grad_(True)
    layer(x_leaf).sum().backward()
    assert spy.counts() == (4, 2, 2)
    assert x_leaf.grad is not None


def test_eval_fine_tuning_keeps_weight_gradients():
    layer = BitLinear(32, 4).eval()
    ref = copy.deepcopy(layer).train()
    x = torch.randn(5, 32)
    layer(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert torch.equal(layer.weight.grad, ref.weight.grad)


# ------------------------------------------------------------------ the cache


def test_cache_follows_the_weight(monkeypatch):
    layer = BitLinear(100, 12).eval()
    x = torch.randn(4, 100)
    spy = Spy(monkeypatch)

    def check():
        with torch.no_grad():
            y = layer(x)
        assert torch.equal(y, TernaryLinear.from_bitlinear(layer)(x))

    check()
    check()
    assert spy.quantized == 1 + 2  # one for the cache, one per TernaryLinear.from_bitlinear
    base = spy.quantized

    # an optimizer step (in-place, bumps the version)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).sum().backward()
    opt.step()
    check()
    assert spy.quantized == base + 2

    # load_state_dict (copy_ under no_grad)
    layer.load_state_dict(BitLinear(100, 12).state_dict())
    check()
    assert spy.quantized == base + 4

    # a swapped tensor (same version number, new storage)
    layer.weight.data = torch.randn(12, 100)
    check()
    assert spy.quantized == base + 6

    # per_channel changes the quantization
    layer.per_channel = True
    check()
    assert spy.quantized == base + 8

    # dtype
    layer.to(torch.bfloat16)
    check()
    assert spy.quantized == base + 10

    # a write behind autograd's back is not seen; clear_quantization_cache() is the remedy
    layer.weight.data.copy_(torch.randn(12, 100))
    layer.clear_quantization_cache()
    check()
    assert spy.quantized == base + 12


def test_cache_is_derived_data():
    layer = BitLinear(100, 12).eval()
    with torch.no_grad():
        layer(torch.randn(2, 100))
    assert layer._quant_cache is not None
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert pickle.loads(pickle.dumps(layer))._quant_cache is None
    assert copy.deepcopy(layer)._quant_cache is None
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False)._quant_cache is None
    layer.train()
    assert layer._quant_cache is None


def test_inference_weights_and_meta_device_are_not_cached():
    with torch.inference_mode():
        layer = BitLinear(100, 6).eval()  # an inference tensor: no version counter
        x = torch.randn(2, 100)
        y = layer(x)
        assert layer._quant_cache is None
        assert torch.equal(y, TernaryLinear.from_bitlinear(layer)(x))
    meta = BitLinear(100, 6, device="meta").eval()
    with torch.no_grad():
        out = meta(torch.randn(2, 3, 100, device="meta"))
    assert out.shape == (2, 3, 6) and out.device.type == "meta" and meta._quant_cache is None


def test_torch_compile_does_not_bake_the_cache():
    layer = BitLinear(100, 8, per_channel=True).eval()
    model = nn.Sequential(layer, nn.ReLU())
    x = torch.randn(3, 100)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        y_c = compiled(x)
        assert layer._quant_cache is None  # quantized inside the graph instead
        assert torch.equal(y_c, model(x))
        layer.weight.mul_(-1)
        assert torch.equal(compiled(x), model(x))  # the graph reads the weight, not a stale copy
