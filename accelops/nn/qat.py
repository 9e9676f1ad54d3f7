"""QATLinear: the int8 quantization-aware training layer, whose trained form is Int8Linear.

Weights are fake-quantized per output channel, symmetric int8, with Int8Linear's scale
(max(absmax_row, 1e-5) / 127, an fp32 tensor computed on the device, detached) through
accelops.ops.fake_quantize (range [-127, 127], zero point 0), so the weight gradient is
straight-through. Optionally int4: symmetric per group of `group_size` weights along
in_features (scale max(absmax_group, 1e-5) / 7, range [-7, 7]).

Activations, activation="per_token": each row of x is quantized exactly as Int8Linear
quantizes it at run time (accelops.ops.quantize_activation_int8: absmax / 127, round half
to even, [-127, 127]) with a straight-through gradient. With int8 weights the forward then
runs the int8 GEMM itself (accelops.ops.int8_matmul on the very codes and scales above),
so the QAT output is not an fp32 GEMM of dequantized values that Int8Linear would only
approximate: `Int8Linear` made by `to_int8_linear()` (or convert(model, "int8-from-qat"))
returns the same output, bit for bit. The backward is the fake-quant one: the gradients of
F.linear(x_deq, w_fq, bias) with the straight-through estimator for both quantizers.

activation="per_tensor": a FakeQuantize with a moving-average min/max observer (qint8,
symmetric, [-127, 127], averaging constant 0.01) that observes in training mode only,
then an fp32 F.linear of the fake-quantized tensors. Int8Linear quantizes per token, so
such a layer has no exact Int8Linear form: converting it raises.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.bitlinear import quantized_linear_backward, save_quantized_operands
from ..reference.int8 import EPS
from .observers import FakeQuantize, MovingAverageMinMaxObserver
from .quantized_linear import Int8Linear

__all__ = ["QATLinear"]

ACTIVATIONS = ("per_token", "per_tensor")
WEIGHTS = ("int8", "int4")
INT8_QMAX = 127
INT4_QMAX = 7


def _symmetric_scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-row max(absmax, 1e-5) / qmax in fp32, as reference/int8.py's _absmax_quantize
    (tensor / tensor, an IEEE division): detached, on w's device."""
    a = w.detach().float().abs().amax(dim=1).clamp_min(EPS)
    return a / torch.full_like(a, float(qmax))


def _straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`value` forward, identity gradient to `source`; the added term is an exact 0.0."""
    s = source.float()
    return value.detach() + (s - s.detach())


class _Int8QATLinear(torch.autograd.Function):
    """Forward: accelops.ops.int8_matmul on the activation and weight codes, i.e. Int8Linear's
    output. Backward: the gradients of F.linear(x_deq, w_fq, bias) for x (straight through
    the per-token quantizer), w_fq (then through fake_quantize's straight-through mask to
    the weight) and bias. Saves the int8 codes and scales, not fp32 copies."""

    @staticmethod
    def forward(ctx, x, w_fq, bias, x_q, x_scale, w_q, w_scale):
        save_quantized_operands(ctx, x, w_fq, bias, x_q, x_scale, w_q, w_scale)
        y = ops.int8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        return (*quantized_linear_backward(ctx, grad_y), None, None, None, None)


def _per_tensor_act_fake_quant(device) -> FakeQuantize:
    """activation="per_tensor": symmetric int8 fake-quant of the input, its range a moving
    average (constant 0.01) of the batches' min / max."""
    return FakeQuantize(
        MovingAverageMinMaxObserver,
        quant_min=-INT8_QMAX,
        quant_max=INT8_QMAX,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
        averaging_constant=0.01,
        device=device,
    )


class QATLinear(nn.Linear):
    """nn.Linear that trains through int8 (or int4-weight) fake quantization; see the module
    docstring for the exact scheme.

    A subclass of nn.Linear: `weight` / `bias` Parameters, initialization and, with
    per-token activations, the state_dict are nn.Linear's. With activation="per_tensor"
    the state_dict adds the observer's buffers under `act_fake_quant.`. Output is in the
    input's dtype, computed in fp32. `from_linear` shares a Linear's Parameters,
    `to_linear` gives them back, `to_int8_linear` is the inference layer (int8 weights,
    per-token activations only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "per_token",
        weight: str = "int8",
        group_size: int = 128,
        *,
        device=None,
        dtype=None,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
        if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.weight_bits = weight
        self.group_size = int(group_size)
        if activation == "per_tensor":
            self.act_fake_quant = _per_tensor_act_fake_quant(device)
        else:
            self.act_fake_quant = None

    # ---------------------------------------------------------------- weight quantization

    def weight_qparams(self) -> torch.Tensor:
        """The weight scale, fp32, detached: [out_features] for int8, [out_features, groups] for int4."""
        if self.weight_bits == "int8":
            return _symmetric_scale(self.weight, INT8_QMAX)
        n = self.out_features
        return _symmetric_scale(self._grouped(self.weight), INT4_QMAX).reshape(n, -1)

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """[N, K] -> [N * groups, group_size], zero-padding the last group (zeros leave absmax alone)."""
        k, gs = self.in_features, self.group_size
        pad = (-k) % gs
        if pad:
            w = F.pad(w, (0, pad))
        return w.reshape(-1, gs)

    def fake_quantized_weight(self) -> torch.Tensor:
        """The weight the forward multiplies by, fp32 [out_features, in_features], with the
        straight-through gradient of accelops.ops.fake_quantize back to `weight`."""
        if self.weight_bits == "int8":
            return self._fake_quantized_int8()[0]
        w = self.weight.float()
        wg = self._grouped(w)
        scale = _symmetric_scale(wg, INT4_QMAX)
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        wq = ops.fake_quantize(wg, scale, zero, -INT4_QMAX, INT4_QMAX, axis=0)
        return wq.reshape(self.out_features, -1)[:, : self.in_features]

    def _fake_quantized_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.float()
        scale = _symmetric_scale(w, INT8_QMAX)
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        return ops.fake_quantize(w, scale, zero, -INT8_QMAX, INT8_QMAX, axis=0), scale

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [out_features, in_features], scale fp32 [out_features] for int8 or
        [out_features, groups] for int4): codes * scale is fake_quantized_weight(), exactly."""
        with torch.no_grad():
            w_fq = self.fake_quantized_weight()
            scale = self.weight_qparams()
            if self.weight_bits == "int8":
                s = scale.reshape(-1, 1)
            else:
                s = scale.repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
            # w_fq = fl(q * s) with |q| <= 127, so w_fq / s is within a few ulps of q: round recovers it.
            return torch.round(w_fq / s).to(torch.int8), scale

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dim must equal in_features={self.in_features}, got shape {tuple(x.shape)}")
        if self.activation == "per_token" and self.weight_bits == "int8":
            return self._forward_int8(x)
        w_fq = self.fake_quantized_weight()
        if self.activation == "per_token":
            x_q, x_scale = ops.quantize_activation_int8(x.detach())
            x_fq = _straight_through(x_q.float() * x_scale, x)
        else:
            fq = self.act_fake_quant
            x_fq = fq(x.float()) if self.training else fq.fake_quant(x.float())
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.linear(x_fq, w_fq, None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        w_fq, w_scale = self._fake_quantized_int8()
        w_q = torch.round(w_fq.detach() / w_scale.reshape(-1, 1)).to(torch.int8)  # see quantized_weight
        x_q, x_scale = ops.quantize_activation_int8(x.detach().reshape(-1, k))
        return _Int8QATLinear.apply(x, w_fq, self.bias, x_q, x_scale, w_q, w_scale)

    # ---------------------------------------------------------------- conversions

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.weight_bits == "int4" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}, weight={self.weight_bits!r}{group}"

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, activation: str = "per_token", weight: str = "int8", group_size: int = 128
    ) -> "QATLinear":
        """A QATLinear sharing `linear`'s weight and bias Parameters (no copy), so weight ties,
        optimizer references and requires_grad carry over."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            activation=activation,
            weight=weight,
            group_size=group_size,
            device="meta",
        )
        new.weight = linear.weight
        new.bias = linear.bias
        if new.act_fake_quant is not None:
            new.act_fake_quant = _per_tensor_act_fake_quant(linear.weight.device)
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """The plain nn.Linear with this layer's latent weights (shared, not copied)."""
        new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        new.weight = self.weight
        new.bias = self.bias
        new.train(self.training)
        return new

    def to_int8_linear(self) -> Int8Linear:
        """The inference layer: Int8Linear holding this layer's weight codes and scales, so its
        output equals this layer's (eval or train: the forward is the same) bit for bit."""
        if self.weight_bits != "int8":
            raise ValueError(
                f"a QATLinear with weight={self.weight_bits!r} has no Int8Linear form (per-group int4 "
                "scales); only weight='int8' converts"
            )
        if self.activation != "per_token":
            raise ValueError(
                "a QATLinear with activation='per_tensor' has no exact Int8Linear form: Int8Linear "
                "quantizes activations per token at run time; train with activation='per_token', or "
                "convert the float weights with mode 'dynamic-int8' and accept the difference"
            )
        w_q, w_scale = self.quantized_weight()
        dtype = self.weight.dtype if self.bias is None else self.bias.dtype
        new = Int8Linear(self.in_features, self.out_features, bias=False, device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            new.w_q.copy_(w_q)
            new.w_scale.copy_(w_scale)
        new._copy_bias_from(self)
        new.train(self.training)
        return new
