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
    return fused_ffn_with_projections(x, w_gate, w_up, w_down, bias, activation, act_quant)[0]


def fused_ffn_with_projections(x, w_gate, w_up, w_down, bias=None, activation: str = "swiglu", act_quant: bool = False):
    """-> (y, g, u): fused_ffn's output and the pre-activation projections g = x Wg^T + bg
    (None for 'gelu') and u = x Wu^T + bu that the fused op saves for its backward."""
    b_gate, b_up, b_down = (None, None, None) if bias is None else tuple(bias)
    xin = fake_quant_int8(x) if act_quant else x
    u = F.linear(xin, w_up, b_up)
    g = F.linear(xin, w_gate, b_gate) if gated(activation) else None
    h = ffn_activation(g, u, activation)
    if act_quant:
        h = fake_quant_int8(h)
    return F.linear(h, w_down, b_down), g, u


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


def fused_ffn_backward(
    dy,
    x,
    g,
    u,
    w_gate,
    w_up,
    w_down,
    activation: str,
    has_b_gate: bool,
    has_b_up: bool,
    has_b_down: bool,
    act_quant: bool,
    need_dx: bool,
    need_dw: bool,
):
    """The gradients of fused_ffn from the saved projections g and u (g unused for 'gelu'),
    as the fused backward op returns them: (dx, dWg, dWu, dWd, dbg, dbu, dbd), dx and the
    weight gradients in x's dtype, the bias gradients in fp32, each one not asked for
    (need_dx, need_dw, has_b_*; dWg for 'gelu') an empty [0] tensor. Computed in fp32,
    with h recomputed as the forward computes it and act_quant's straight-through rule."""
    is_gated = gated(activation)
    d, hidden = x.shape[-1], w_up.shape[0]
    m = x.shape[:-1].numel()
    dy2 = dy.reshape(m, d).float()
    g2 = g.reshape(m, hidden) if is_gated else None
    u2 = u.reshape(m, hidden)
    dg, du = ffn_activation_backward(None if g2 is None else g2.float(), u2.float(), dy2 @ w_down.float(), activation)

    def none(dtype=x.dtype):
        return x.new_empty((0,), dtype=dtype)

    dx = none()
    if need_dx:
        dxf = du @ w_up.float()
        if is_gated:
            dxf = dxf + dg @ w_gate.float()
        dx = dxf.reshape(x.shape).to(x.dtype)
    dwg, dwu, dwd = none(), none(), none()
    dbg, dbu, dbd = none(torch.float32), none(torch.float32), none(torch.float32)
    if need_dw:
        x2 = x.reshape(m, d)
        xin = (fake_quant_int8(x2) if act_quant else x2).float()
        h = ffn_activation(g2, u2, activation)
        hin = (fake_quant_int8(h) if act_quant else h).float()
        dwd = (dy2.t() @ hin).to(x.dtype)
        dwu = (du.t() @ xin).to(x.dtype)
        if is_gated:
            dwg = (dg.t() @ xin).to(x.dtype)
        if has_b_down:
            dbd = dy2.sum(0)
        if has_b_up:
            dbu = du.sum(0)
        if has_b_gate:
            dbg = dg.sum(0)
    return dx, dwg, dwu, dwd, dbg, dbu, dbd
