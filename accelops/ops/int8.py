"""INT8 ops: per-token activation and per-channel weight quantization, the W8A8 matmul
with its dequantization epilogue fused, and the dynamic `int8_linear`. See
accelops/reference/int8.py for the spec.
"""

from __future__ import annotations

import torch

from ..reference import int8 as ref
from . import _tuning
from . import _validate as check
from ._backend import choose, choose_and_forced, register_triton_kernels
from ._library import define

__all__ = ["quantize_activation_int8", "quantize_weight_int8", "int8_matmul", "int8_linear"]


def _triton():
    from ..kernels import int8 as triton_int8

    return triton_int8


def quantize_activation_int8(x: torch.Tensor):
    """x [..., K] float -> (x_q int8 [..., K], x_scale fp32 [..., 1]), per-token absmax."""
    check.float_tensor("x", x)
    check.at_least_1d("x", x)
    backend = choose("quantize_activation_int8", x.device)
    if backend == "reference":
        return ref.quantize_activation_int8(x)
    if backend == "triton":
        return _triton().quantize_activation_int8(x)
    return torch.ops.accelops.quantize_activation_int8(x)


def quantize_weight_int8(w: torch.Tensor):
    """w [N, K] float -> (w_q int8 [N, K], w_scale fp32 [N]), per output channel, symmetric."""
    check.float_tensor("w", w)
    check.ndim("w", w, 2, "[out_features, in_features]")
    check.finite_weight("w", w)
    backend = choose("quantize_weight_int8", w.device)
    if backend == "reference":
        return ref.quantize_weight_int8(w)
    if backend == "triton":
        return _triton().quantize_weight_int8(w)
    return torch.ops.accelops.quantize_weight_int8(w)


def _check_weight(w_q, w_scale):
    check.tensor("w_q", w_q)
    check.dtype("w_q", w_q, torch.int8)
    check.ndim("w_q", w_q, 2, "[N, K]")
    check.tensor("w_scale", w_scale)
    check.dtype("w_scale", w_scale, torch.float32)
    n = w_q.shape[0]
    if w_scale.dim() != 1 or w_scale.shape[0] != n:
        raise ValueError(f"w_scale must have shape ({n},), one scale per row of w_q, got {tuple(w_scale.shape)}")
    ref.check_k(w_q.shape[1])
    return n, w_q.shape[1]


def int8_matmul(x_q, x_scale, w_q, w_scale, bias=None, out_dtype: torch.dtype = torch.float32):
    """y = (x_q @ w_q^T) * x_scale * w_scale + bias with exact int32 sums; x_q [..., K] -> y [..., N]."""
    check.tensor("x_q", x_q)
    check.dtype("x_q", x_q, torch.int8)
    check.at_least_1d("x_q", x_q)
    n, k = _check_weight(w_q, w_scale)
    if x_q.shape[-1] != k:
        raise ValueError(f"x_q's last dim must equal w_q's K={k}, got shape {tuple(x_q.shape)}")
    check.tensor("x_scale", x_scale)
    check.dtype("x_scale", x_scale, torch.float32)
    if tuple(x_scale.shape) != (*x_q.shape[:-1], 1):
        raise ValueError(
            f"x_scale must have shape {(*x_q.shape[:-1], 1)} (one scale per row of x_q), got {tuple(x_scale.shape)}"
        )
    if out_dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    check.bias(bias, n)
    device = check.same_device(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    backend = choose("int8_matmul", device)
    if backend == "reference":
        return ref.int8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if backend == "triton":
        return _triton().int8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return torch.ops.accelops.int8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def int8_linear(x, w_q, w_scale, bias=None):
    """Dynamic W8A8 linear: per-token int8 quantization of x, then int8_matmul; y in x's dtype."""
    check.float_tensor("x", x)
    check.at_least_1d("x", x)
    n, k = _check_weight(w_q, w_scale)
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim must equal w_q's K={k} (in_features), got shape {tuple(x.shape)}")
    check.bias(bias, n)
    device = check.same_device(x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    backend, forced = choose_and_forced("int8_linear", device)
    tuned = None
    if backend == "native" and not forced:
        tuned = _tuning.choice_for("int8_linear", device, (x.numel() // k if k else 0, n, k), (x, w_q, w_scale, bias))
        if tuned is not None and tuned.backend == "reference":
            backend = "reference"
    if backend == "reference":
        return ref.int8_linear(x, w_q, w_scale, bias)
    if backend == "triton":
        return _triton().int8_linear(x, w_q, w_scale, bias)
    if tuned is not None and tuned.backend == "aten_int_mm" and device.type == "cpu":
        # The table measured ATen's int8 GEMM faster for this shape here (identical result).
        fn = torch.ops.accelops.int8_linear_int_mm
    else:
        fn = torch.ops.accelops.int8_linear
    return _tuning.call_with(tuned, fn, x, w_q, w_scale, bias)


# --------------------------------------------------------------------------- registration
# The family's ops: schema and default (reference) kernel, fake, autograd, CUDA kernels.
# The C++ CPU kernels are csrc/cpu/int8.cpp and int_mm.cpp, registered in csrc/ops.cpp.


def _int8_matmul_reference(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=None):
    return ref.int8_matmul(x_q, x_scale, w_q, w_scale, bias, torch.float32 if out_dtype is None else out_dtype)


def _register() -> None:
    define("quantize_activation_int8(Tensor x) -> (Tensor, Tensor)", ref.quantize_activation_int8)
    define("quantize_weight_int8(Tensor w) -> (Tensor, Tensor)", ref.quantize_weight_int8)
    define(
        "int8_matmul(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias=None, "
        "ScalarType? out_dtype=None) -> Tensor",
        _int8_matmul_reference,
    )
    define("int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor", ref.int8_linear)
    # The same results with ATen's int8 GEMM computing the sums (a tuned-dispatch candidate).
    define("int8_linear_int_mm(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor", ref.int8_linear)

    @torch.library.register_fake("accelops::quantize_activation_int8")
    def _(x):
        return torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format), x.new_empty(
            (*x.shape[:-1], 1), dtype=torch.float32
        )

    @torch.library.register_fake("accelops::quantize_weight_int8")
    def _(w):
        return w.new_empty(w.shape, dtype=torch.int8), w.new_empty((w.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("accelops::int8_matmul")
    def _(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=None):
        return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=out_dtype or torch.float32)

    @torch.library.register_fake("accelops::int8_linear")
    def _(x, w_q, w_scale, bias=None):
        return x.new_empty((*x.shape[:-1], w_q.shape[0]))

    # Straight-through gradient for x through the dequantized weight (see ops/ternary.py).
    def setup_context(ctx, inputs, output):
        x, w_q, w_scale, bias = inputs
        ctx.save_for_backward(w_q, w_scale)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, grad_y):
        w_q, w_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y.float() @ (w_q.float() * w_scale.reshape(-1, 1))).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias

    # The same op with ATen's int8 GEMM for the sums (a tuned-dispatch candidate): same
    # schema, same result, so the same fake and the same gradient.
    torch.library.register_fake("accelops::int8_linear_int_mm")(
        lambda x, w, w_scale, bias=None: x.new_empty((*x.shape[:-1], w.shape[0]))
    )
    for name in ("accelops::int8_linear", "accelops::int8_linear_int_mm"):
        torch.library.register_autograd(name, backward, setup_context=setup_context)

    register_triton_kernels("int8", ("quantize_activation_int8", "quantize_weight_int8", "int8_matmul", "int8_linear"))


_register()
