"""Pure-PyTorch reference for BitLinear (BitNet b1.58 training layer): the specification
that accelops.nn.BitLinear's forward and backward are tested against.

Forward (fake quantization): the latent weight W is quantized to ternary with its absmean
scale and the input x to per-token int8 (both exactly as in reference/ternary.py and
reference/int8.py), both are dequantized, and y = x_deq @ W_deq^T + bias, computed in fp32
and returned in x's dtype.

Backward: the straight-through estimator: quantization is taken as the identity, so
dL/dx = g @ W_deq, dL/dW = g^T @ x_deq and dL/dbias = sum of g over tokens.
"""

import torch
import torch.nn.functional as F

from .int8 import quantize_activation_int8
from .ternary import quantize_weight_ternary_values


def dequantized_weight(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Ternary W_deq = Wq * scale in fp32, the weight BitLinear's forward multiplies by."""
    wq, scale = quantize_weight_ternary_values(w, per_channel)
    return wq.float() * scale.reshape(-1, 1)


def dequantized_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 x_deq = x_q * x_scale in fp32."""
    x_q, x_scale = quantize_activation_int8(x)
    return x_q.float() * x_scale


def straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, identity gradient to `source` in the backward pass.

    Written as value + (source - source.detach()) rather than the common
    source + (value - source).detach(): the added term is exactly 0.0, so the forward value
    is bit-identical to `value`, while the common form rounds twice.
    """
    s = source.float()
    return value.detach() + (s - s.detach())


def bitlinear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, per_channel: bool = False):
    """BitLinear forward with straight-through gradients for x, w and bias."""
    x_ste = straight_through(dequantized_activation(x), x)
    w_ste = straight_through(dequantized_weight(w, per_channel), w)
    y = F.linear(x_ste, w_ste, None if bias is None else bias.float())
    return y.to(x.dtype)
