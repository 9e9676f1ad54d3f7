"""BitLinear's training matmul: y = int8(x) @ ternary(W)^T + bias with straight-through
gradients to x, W and bias (BitNet b1.58). accelops/reference/bitlinear.py is the spec;
accelops.nn.BitLinear is the layer built on it.

Not a registered op: a torch.autograd.Function whose forward calls the registered
quantize_activation_int8 op and one fp32 GEMM, so it dispatches like them (C++ on CPU,
Triton on CUDA) and traces under torch.compile. The straight-through backward
(quantized_linear_backward) is shared with accelops.nn.QATLinear's int8 Function.
"""

from __future__ import annotations

import torch

from ..reference.int8 import dequantize_epilogue
from ..reference.ternary import quantize_weight_ternary_values
from . import _validate as check
from .int8 import quantize_activation_int8

__all__ = ["bitlinear_matmul", "save_quantized_operands", "quantized_linear_backward"]


def save_quantized_operands(ctx, x, weight, bias, x_q, x_scale, w_q, w_scale) -> None:
    """What quantized_linear_backward needs: the int codes and their scales (not fp32
    copies) and the shapes/dtypes of the float inputs."""
    ctx.save_for_backward(x_q, x_scale, w_q, w_scale)
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.w_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def quantized_linear_backward(ctx, grad_y):
    """Straight-through gradients of y = dequant(x_q) dequant(w_q)^T + b with respect to
    (x, weight, bias), in fp32 from the saved codes (see save_quantized_operands)."""
    x_q, x_scale, w_q, w_scale = ctx.saved_tensors
    g = grad_y.reshape(-1, grad_y.shape[-1]).float()
    grad_x = grad_w = grad_b = None
    # fp32 like the forward, whatever autocast state .backward() is called in
    with torch.autocast(device_type=g.device.type, enabled=False):
        if ctx.needs_input_grad[0]:
            w_deq = w_q.float() * w_scale.reshape(-1, 1)
            grad_x = (g @ w_deq).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ (x_q.float() * x_scale)).to(ctx.w_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b


class _BitLinearFunction(torch.autograd.Function):
    """Quantizes once per call and saves only the int8 tensors and their scales for
    backward: 3 MiB against the reference formulation's 48 MiB at M=2048, K=N=1024."""

    @staticmethod
    def forward(ctx, x, weight, bias, per_channel, quantized=None):
        k = x.shape[-1]
        lead = x.shape[:-1]
        # Weights: the reference's quantization measured no slower than the C++ op plus an
        # unpack, and it yields the unpacked Wq this GEMM needs. Activations: the op (the
        # C++ kernel on CPU, 5-8x faster than the reference and bit-identical to it).
        # `quantized`: (Wq, scale) already computed by the caller (BitLinear's cache).
        wq, w_scale = quantize_weight_ternary_values(weight, per_channel) if quantized is None else quantized
        x_q, x_scale = quantize_activation_int8(x.reshape(-1, k))
        # The products are integers and every partial sum stays below 127 * K < 2^24 for
        # K < 132105, so this fp32 GEMM yields the exact int32 sums of the inference kernel;
        # with the shared epilogue the output equals TernaryLinear's, not just approximates it.
        # Autocast would run this GEMM in bf16/fp16 and round the sums to 8-11 bits.
        with torch.autocast(device_type=x.device.type, enabled=False):
            acc = torch.mm(x_q.float(), wq.float().t())
            y = dequantize_epilogue(acc, x_scale, w_scale, bias, x.dtype)
        save_quantized_operands(ctx, x, weight, bias, x_q, x_scale, wq, w_scale)
        return y.reshape(*lead, wq.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        return (*quantized_linear_backward(ctx, grad_y), None, None)


def bitlinear_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    per_channel: bool = False,
    *,
    quantized=None,
) -> torch.Tensor:
    """y = int8(x) @ ternary(weight)^T + bias: x [..., K] -> y [..., N] in x's dtype, with
    straight-through gradients to x, weight and bias.

    weight [N, K] is the latent float weight, quantized to ternary with its absmean scale
    (per tensor, or per row with per_channel=True); x is quantized per token to int8. The
    sums are exact, so y equals ternary_matmul's on the packed weight bit for bit.
    `quantized`: (Wq int8 [N, K], scale fp32) of `weight`, when the caller already has
    them (reference.ternary.quantize_weight_ternary_values(weight, per_channel)).
    """
    check.float_tensor("x", x)
    check.at_least_1d("x", x)
    check.tensor("weight", weight)
    check.ndim("weight", weight, 2, "[out_features, in_features]")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dim must equal weight's K={weight.shape[1]} (in_features), got shape {tuple(x.shape)}"
        )
    n = weight.shape[0]
    # The bias's dtype is left free, as nn.Linear's: the epilogue adds it in fp32.
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != n):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a tensor of shape ({n},) to match N={n}, got {got}")
    return _BitLinearFunction.apply(x, weight, bias, per_channel, quantized)
