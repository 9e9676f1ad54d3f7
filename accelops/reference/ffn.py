"""Pure-PyTorch reference for the fused FFN: the specification every backend matches.

    swiglu:  h = silu(x Wg^T + bg) * (x Wu^T + bu)
    geglu:   h = gelu(x Wg^T + bg) * (x Wu^T + bu)      (exact GELU, with erf)
    gelu:    h = gelu(x Wu^T + bu)                        (not gated: no Wg, no bg)
    y = h Wd^T + bd

Weights are in nn.Linear layout: w_gate / w_up [H, D], w_down [D, H]; x [..., D] -> y [..., D]
in x's dtype. `bias` is None or a sequence of three (b_gate, b_up, b_down), each None or
a 1-D tensor.

`act_quant=True` is BitNet's activation fake-quantization inside the FFN: x and h are each
quantized per token to int8 (reference/int8.py) and dequantized before their GEMM, with
straight-through gradients, exactly what composing three BitLinear layers does to its
inputs. The weights are used as given (BitLinear's ternary fake-quant of the weights is
the caller's, see accelops.nn.FusedFFN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bitlinear import dequantized_activation, straight_through

ACTIVATIONS = ("swiglu", "geglu", "gelu")


def gated(activation: str) -> bool:
    return activation != "gelu"


def activation_fn(activation: str):
    """The gate nonlinearity: silu for swiglu, exact gelu for geglu and gelu."""
    return F.silu if activation == "swiglu" else F.gelu


def ffn_activation(g: torch.Tensor | None, u: torch.Tensor, activation: str) -> torch.Tensor:
    """h from the pre-activation gate g and up u projections (g is None for 'gelu')."""
    if activation == "gelu":
        return F.gelu(u)
    return activation_fn(activation)(g) * u


def fake_quant_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 quantize-dequantize with a straight-through gradient, in x's dtype."""
    return straight_through(dequantized_activation(x), x).to(x.dtype)


def fused_ffn(x, w_gate, w_up, w_down, bias=None, activation: str = "swiglu", act_quant: bool = False):
    b_gate, b_up, b_down = (None, None, None) if bias is None else tuple(bias)
    xin = fake_quant_int8(x) if act_quant else x
    u = F.linear(xin, w_up, b_up)
    g = F.linear(xin, w_gate, b_gate) if gated(activation) else None
    h = ffn_activation(g, u, activation)
    if act_quant:
        h = fake_quant_int8(h)
    return F.linear(h, w_down, b_down)


def ffn_activation_backward(g: torch.Tensor | None, u: torch.Tensor, dh: torch.Tensor, activation: str):
    """(dg, du) of h = ffn_activation(g, u) for the incoming gradient dh, in closed form
    (what the fused backward kernels compute from the saved g and u; dg is None for 'gelu')."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(u * 0.7071067811865476))
        pdf = torch.exp(-0.5 * u * u) * 0.3989422804014327
        return None, dh * (cdf + u * pdf)
    if activation == "swiglu":
        s = torch.sigmoid(g)
        a = g * s
        return dh * u * (s + a * (1.0 - s)), dh * a
    cdf = 0.5 * (1.0 + torch.erf(g * 0.7071067811865476))
    pdf = torch.exp(-0.5 * g * g) * 0.3989422804014327
    return dh * u * (cdf + g * pdf), dh * g * cdf
