"""BitLinear: the BitNet b1.58 training layer (fake-quantized ternary weights, int8
activations, straight-through gradients). The spec is accelops/reference/bitlinear.py.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

# The training matmul and its autograd live with the other ops (accelops/ops/bitlinear.py).
from ..ops.bitlinear import (
    _BitLinearFunction,  # noqa: F401  (the layer's autograd, for tests to spy on)
    bitlinear_matmul,
)
from ..reference.ternary import quantize_weight_ternary as quantize_weight_ternary_reference
from ..reference.ternary import quantize_weight_ternary_values

__all__ = ["BitLinear"]


def check_in_features(layer: nn.Module, x) -> None:
    """nn.Linear's K check as a ValueError naming both K. The layers need their own: the
    packed ternary layout would take an x whose K fits the last 128-block's padding as
    zero-padded (a result, silently wrong), and BitLinear's GEMM raises about matrix shapes.
    A non-tensor or 0-d x is left to the ops' own checks."""
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != layer.in_features:
        raise ValueError(
            f"{type(layer).__name__}: x's last dim must equal in_features={layer.in_features}, got K={x.shape[-1]} "
            f"(x of shape {tuple(x.shape)})"
        )


class BitLinear(nn.Linear):
    """nn.Linear whose forward quantizes its latent weight to ternary (absmean) and its
    input to per-token int8 on the fly, with straight-through gradients to both.

    A subclass of nn.Linear so parameter names, shapes, initialization and state_dict are
    nn.Linear's: it loads an nn.Linear checkpoint as is. Output is in the input's dtype.
    `TernaryLinear.from_bitlinear` turns a trained one into the packed inference layer,
    which gives the same outputs.

    Inference: when no gradient is needed (under torch.no_grad() / inference_mode, or when
    neither the weight, the bias nor x requires grad), the forward runs the packed ternary
    kernel (accelops.ops.ternary_matmul) on a packed copy of the quantized weight that is
    kept until `weight` changes: the output is TernaryLinear's, bit for bit, which is also
    the training forward's. The copy (K/4 bytes a row) is derived data: not in the
    state_dict, not pickled, rebuilt when the weight's version, storage, dtype or device
    or per_channel changes, and dropped by clear_quantization_cache() and by .train() /
    .eval(). Writes through `weight.data` bypass the version counter (an EMA teacher
    updated with `p.data.mul_(...)`): call clear_quantization_cache() after them.

    `cache_quantization` (default False; accelops.sharing turns it on for layers it shares):
    keep the quantized weight of the training forward too and reuse it until `weight`
    changes (an optimizer step, a load, .to()), or until clear_quantization_cache() is
    called. A layer called by several blocks then quantizes its weight once per step
    instead of once per call. That cache costs an int8 copy of the weight (plus an fp32 one
    when FusedFFN asks for the dequantized weight).
    """

    # Class-level defaults (set per instance when used), so a BitLinear pickled before these
    # existed still loads.
    cache_quantization = False
    _quant_cache = None  # (key, {"wq", "scale", "deq", "packed": (w_packed, w_scale)}, each made on first use)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        per_channel: bool = False,
        *,
        device=None,
        dtype=None,
    ):
        if not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.per_channel = per_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_in_features(self, x)
        if self._inference(x):
            w_packed, w_scale = self._packed_weight()
            return ops.ternary_matmul(x, w_packed, w_scale, self.bias, k=self.in_features)
        if self._caching():
            quantized = (self._cached("wq"), self._cached("scale"))
        else:
            # Outside the autograd Function (whose forward runs without grad too), so that
            # the quantizer is this module's and tests can count its calls.
            with torch.no_grad():
                quantized = quantize_weight_ternary_values(self.weight, self.per_channel)
        return bitlinear_matmul(x, self.weight, self.bias, self.per_channel, quantized=quantized)

    def _inference(self, x) -> bool:
        """Whether the packed kernel may run: no gradient is asked of this call. A weight that
        requires grad in eval mode may be fine-tuned, so its gradient is never dropped. x and
        the bias count too: the op's straight-through gradient for them comes only from its
        registered autograd, which the reference backend (and a dispatch table's reference
        choice) does not go through."""
        if not torch.is_grad_enabled():
            return True
        return not (
            self.weight.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
            or (isinstance(x, torch.Tensor) and x.requires_grad)
        )

    # ---------------------------------------------------------------- quantized weight

    def dequantized_weight(self) -> torch.Tensor:
        """Wq * scale in fp32, detached (reference.bitlinear.dequantized_weight's value): the
        weight the forward multiplies by; cached when cache_quantization is on."""
        if self._caching():
            return self._cached("deq")
        wq, scale = quantize_weight_ternary_values(self.weight, self.per_channel)
        return wq.float() * scale.reshape(-1, 1)

    def clear_quantization_cache(self) -> None:
        self._quant_cache = None

    def train(self, mode: bool = True):
        # A switch between training and evaluation is where an optimizer that writes through
        # `.data` (past the version counter) hands the weights over: start from fresh.
        self.clear_quantization_cache()
        return super().train(mode)

    def _cacheable(self) -> bool:
        w = self.weight
        # A trace must not bake a Python-side cache into the graph (and is asked first:
        # dynamo cannot trace is_inference()); inference tensors have no version counter;
        # meta has no data.
        return not torch.compiler.is_compiling() and not w.is_inference() and w.device.type != "meta"

    def _caching(self) -> bool:
        return self.cache_quantization and self._cacheable()

    def _packed_weight(self):
        """(w_packed, w_scale) of the current weight: cached where it can be, else quantized now."""
        if self._cacheable():
            return self._cached("packed")
        w = self.weight.detach()
        if w.device.type == "meta":  # shapes only: the op's NaN check would read data
            return quantize_weight_ternary_reference(w, self.per_channel)
        return ops.quantize_weight_ternary(w, self.per_channel)

    def _cached(self, name: str):
        w = self.weight
        # _version moves with every in-place write through autograd-visible tensors
        # (optimizer steps, copy_ in load_state_dict); id/data_ptr catch a swapped tensor.
        # Writes through `.data` bypass the version counter, which is why accelops.sharing
        # also clears the cache at the start of every forward of the model it shares.
        key = (id(w), w.data_ptr(), w._version, w.dtype, w.device, self.per_channel)
        if self._quant_cache is None or self._quant_cache[0] != key:
            self._quant_cache = (key, {})
        entries = self._quant_cache[1]
        if name not in entries:
            # Normal tensors even when first asked for under inference_mode: the cache
            # outlives that block and may be used outside it.
            with torch.inference_mode(False), torch.no_grad():
                if name in ("wq", "scale"):
                    entries["wq"], entries["scale"] = quantize_weight_ternary_values(w, self.per_channel)
                elif name == "deq":
                    entries["deq"] = self._cached("wq").float() * self._cached("scale").reshape(-1, 1)
                elif name == "packed":
                    # The op TernaryLinear quantizes with (C++ on CPU): the same codes and scale.
                    entries["packed"] = ops.quantize_weight_ternary(w.detach(), self.per_channel)
                else:
                    raise KeyError(name)
        return entries[name]

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_quant_cache"] = None  # derived data: not pickled, rebuilt on first use
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_channel={self.per_channel}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = False) -> "BitLinear":
        """A BitLinear that shares `linear`'s weight and bias Parameters (no copy), so weight
        ties, optimizer references and requires_grad carry over."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            per_channel=per_channel,
            device="meta",
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """The plain nn.Linear with this layer's latent weights (shared, not copied)."""
        new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        new.weight = self.weight
        new.bias = self.bias
        new.train(self.training)
        return new
