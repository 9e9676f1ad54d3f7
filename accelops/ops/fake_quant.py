"""Fake quantization: `fake_quantize` (fixed scale and zero point, straight-through
gradient) and `fake_quantize_learnable` (LSQ: gradients for scale and zero point too).
See accelops/reference/fake_quant.py for the spec.

The forward is one pass that writes y and the straight-through mask as bits; autograd
keeps those bits (1/32 of an fp32 x) rather than x or a bool mask. Scale and zero point
may live on the device as tensors and are read by the kernel, never by the host, so a QAT
step with observer-computed qparams needs no synchronisation.
"""

from __future__ import annotations

import numbers

import torch

from ..reference import fake_quant as ref
from . import _validate as check
from ._backend import choose, register_triton_kernels
from ._library import define

__all__ = ["fake_quantize", "fake_quantize_learnable"]

_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _triton():
    from ..kernels import fake_quant as triton_fake_quant

    return triton_fake_quant


# --------------------------------------------------------------------------- validation


def _check_range(quant_min, quant_max) -> None:
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if quant_min > quant_max:
        raise ValueError(f"quant_min ({quant_min}) must be <= quant_max ({quant_max})")
    if quant_min < -ref.QRANGE_LIMIT or quant_max > ref.QRANGE_LIMIT:
        raise ValueError(
            f"quant_min/quant_max must lie in [-2^24, 2^24] (the kernels compute q in fp32, exact up to "
            f"2^24), got [{quant_min}, {quant_max}]"
        )


def _normalize_axis(x: torch.Tensor, axis) -> int | None:
    if axis is None:
        return None
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"axis must be None (per tensor) or an int, got {axis!r}")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for x of shape {tuple(x.shape)}")
    return int(axis) % x.dim()


def _qparam_tensor(name: str, value, x: torch.Tensor, axis: int | None, *, integer: bool) -> torch.Tensor:
    """A Python number or tensor -> a 1-D tensor on x's device with one value per channel."""
    channels = 1 if axis is None else x.shape[axis]
    if isinstance(value, torch.Tensor):
        if integer and value.dtype not in _INT_DTYPES:
            raise TypeError(
                f"{name} must be an integer tensor (int32/int64), got {value.dtype}; a float zero point is "
                "learnable: use fake_quantize_learnable"
            )
        if not integer and not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}; move them to one device")
        if axis is None and value.numel() != 1:
            raise ValueError(f"{name} must hold one value per tensor (axis=None), got shape {tuple(value.shape)}")
        if axis is not None and (value.dim() != 1 or value.shape[0] != channels):
            raise ValueError(
                f"{name} must have shape ({channels},), one value per channel along axis {axis} of x "
                f"{tuple(x.shape)}, got {tuple(value.shape)}"
            )
        return value.reshape(-1)
    if integer:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int or an integer tensor, got {value!r}")
        if axis is not None:
            raise ValueError(f"{name} must be a tensor of {channels} values for per-channel axis={axis}")
        return torch.tensor([int(value)], dtype=torch.int32, device=x.device)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {value!r}")
    if axis is not None:
        raise ValueError(f"{name} must be a tensor of {channels} values for per-channel axis={axis}")
    return torch.tensor([float(value)], dtype=torch.float32, device=x.device)


def _check_values(scale: torch.Tensor, zero_point: torch.Tensor | None, quant_min: int, quant_max: int) -> None:
    """Scale > 0 and finite, zero point in range. A host check on CPU tensors (free); an
    asynchronous device assert on accelerators, so the step never waits for the device."""
    if torch.compiler.is_compiling():
        return  # the kernels' own checks still reject bad values at run time
    # The kernels multiply by 1/scale: a subnormal scale (below ~2.9e-39) has an infinite fp32
    # reciprocal, and 0 * inf made inputs 0.0 and -0.0 NaN on every backend.
    if scale.device.type != "cpu":
        torch._assert_async(
            ((scale > 0) & torch.isfinite(scale) & torch.isfinite(1.0 / scale)).all(),
            "fake_quantize: scale must be positive and finite, with a finite reciprocal",
        )
        if zero_point is not None:
            torch._assert_async(
                ((zero_point >= quant_min) & (zero_point <= quant_max)).all(),
                "fake_quantize: zero_point outside [quant_min, quant_max]",
            )
        return
    bad = ~((scale > 0) & torch.isfinite(scale))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"scale must be positive and finite, got {scale[i].item()} (index {i}): a zero or "
            "negative scale has no inverse"
        )
    tiny = ~torch.isfinite(1.0 / scale)
    if bool(tiny.any()):
        i = int(tiny.nonzero()[0, 0])
        raise ValueError(
            f"scale {scale[i].item()!r} (index {i}) is too small: its fp32 reciprocal is infinite "
            f"(the smallest usable scale is {1.0 / torch.finfo(torch.float32).max:.3e})"
        )
    if zero_point is not None:
        out = (zero_point < quant_min) | (zero_point > quant_max)
        if bool(out.any()):
            i = int(out.nonzero()[0, 0])
            raise ValueError(
                f"zero_point {int(zero_point[i])} (index {i}) lies outside [quant_min, quant_max] = "
                f"[{quant_min}, {quant_max}]"
            )


# --------------------------------------------------------------------------- non-native backends


class _FakeQuantize(torch.autograd.Function):
    """Autograd for the reference and direct-Triton backends (the native op has its own)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, impl):
        y, mask = impl.fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)
        ctx.save_for_backward(mask)
        ctx.impl = impl
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return ctx.impl.fake_quantize_backward(grad_y, mask), None, None, None, None, None, None


class _FakeQuantizeLearnable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_factor, impl):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (quant_min, quant_max, axis, grad_factor)
        ctx.impl = impl
        return impl.fake_quantize_learnable(x, scale, zero_point, quant_min, quant_max, axis, grad_factor)

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, zero_point = ctx.saved_tensors
        dx, ds, dz = ctx.impl.fake_quantize_learnable_backward(grad_y, x, scale, zero_point, *ctx.args)
        return dx, ds, dz, None, None, None, None, None


class _Reference:
    """The reference under the ops' signatures."""

    @staticmethod
    def fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None):
        y, mask = ref.fake_quantize_with_mask(x, scale, zero_point, quant_min, quant_max, axis)
        return y, ref.pack_mask(mask)

    fake_quantize_backward = staticmethod(ref.fake_quantize_backward)
    fake_quantize_learnable = staticmethod(ref.fake_quantize_learnable)
    fake_quantize_learnable_backward = staticmethod(ref.fake_quantize_learnable_backward)


# --------------------------------------------------------------------------- public API


def fake_quantize(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int, axis: int | None = None):
    """Affine fake quantization with a straight-through gradient for x.

    scale: float or fp32 tensor (1 value, or x.shape[axis] values per channel);
    zero_point: int or integer tensor of the same size, within [quant_min, quant_max].
    Forward equals torch.fake_quantize_per_tensor_affine / _per_channel_affine bit for bit
    (fp32, bf16, fp16), except that NaN stays NaN and +-Inf clamps to the range ends.
    The gradient is dy where quant_min <= round(x / scale) + zero_point <= quant_max, else 0.
    """
    check.float_tensor("x", x)
    _check_range(quant_min, quant_max)
    axis = _normalize_axis(x, axis)
    s = _qparam_tensor("scale", scale, x, axis, integer=False).to(torch.float32)
    z = _qparam_tensor("zero_point", zero_point, x, axis, integer=True)
    _check_values(s, z, quant_min, quant_max)
    backend = choose("fake_quantize", x.device)
    if backend == "native":
        return torch.ops.accelops.fake_quantize(x, s, z, quant_min, quant_max, axis)[0]
    impl = _Reference if backend == "reference" else _triton()
    return _FakeQuantize.apply(x, s, z, quant_min, quant_max, axis, impl)


def fake_quantize_learnable(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
    grad_factor: float = 1.0,
):
    """LSQ fake quantization: gradients for x, scale and zero_point equal
    torch._fake_quantize_learnable_per_{tensor,channel}_affine's (grad_factor included).

    scale and zero_point are float tensors (1 value, or x.shape[axis] values) that usually
    require grad; the forward rounds zero_point half to even and clamps it to the range,
    on the device, with no host synchronisation.
    """
    check.float_tensor("x", x)
    _check_range(quant_min, quant_max)
    axis = _normalize_axis(x, axis)
    for name, value in (("scale", scale), ("zero_point", zero_point)):
        check.tensor(name, value)
        _qparam_tensor(name, value, x, axis, integer=False)
    if not isinstance(grad_factor, numbers.Real) or isinstance(grad_factor, bool):
        raise TypeError(f"grad_factor must be a float, got {grad_factor!r}")
    _check_values(scale.detach().reshape(-1), None, quant_min, quant_max)
    backend = choose("fake_quantize_learnable", x.device)
    if backend == "native":
        return torch.ops.accelops.fake_quantize_learnable(
            x, scale, zero_point, quant_min, quant_max, axis, float(grad_factor)
        )
    impl = _Reference if backend == "reference" else _triton()
    return _FakeQuantizeLearnable.apply(x, scale, zero_point, quant_min, quant_max, axis, float(grad_factor), impl)


# --------------------------------------------------------------------------- registration

# The family's ops: schema and default (reference) kernel, fake, autograd, CUDA kernels.
# The C++ CPU kernels are csrc/cpu/fake_quant.cpp, registered in csrc/ops.cpp.


def _register() -> None:
    # fake_quantize returns (y, mask bits) so that autograd saves 1 bit per element, not x.
    define(
        "fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
        "int? axis=None) -> (Tensor, Tensor)",
        _Reference.fake_quantize,
    )
    define("fake_quantize_backward(Tensor grad, Tensor mask) -> Tensor", _Reference.fake_quantize_backward)
    define(
        "fake_quantize_learnable(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
        "int? axis=None, float grad_factor=1.0) -> Tensor",
        _Reference.fake_quantize_learnable,
    )
    define(
        "fake_quantize_learnable_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
        "int quant_min, int quant_max, int? axis=None, float grad_factor=1.0) -> (Tensor, Tensor, Tensor)",
        _Reference.fake_quantize_learnable_backward,
    )

    @torch.library.register_fake("accelops::fake_quantize")
    def _(x, scale, zero_point, quant_min, quant_max, axis=None):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8),
        )

    @torch.library.register_fake("accelops::fake_quantize_backward")
    def _(grad, mask):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    @torch.library.register_fake("accelops::fake_quantize_learnable")
    def _(x, scale, zero_point, quant_min, quant_max, axis=None, grad_factor=1.0):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("accelops::fake_quantize_learnable_backward")
    def _(grad, x, scale, zero_point, quant_min, quant_max, axis=None, grad_factor=1.0):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(scale),
            torch.empty_like(zero_point),
        )

    def fq_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])  # the mask bits: 1 bit per element, not x

    def fq_backward(ctx, grad_y, _grad_mask):
        (mask,) = ctx.saved_tensors
        grad_x = torch.ops.accelops.fake_quantize_backward(grad_y, mask) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None

    torch.library.register_autograd("accelops::fake_quantize", fq_backward, setup_context=fq_setup)

    def lsq_setup(ctx, inputs, output):
        x, scale, zero_point, quant_min, quant_max, axis, grad_factor = inputs
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (quant_min, quant_max, axis, grad_factor)

    def lsq_backward(ctx, grad_y):
        x, scale, zero_point = ctx.saved_tensors
        dx, ds, dz = torch.ops.accelops.fake_quantize_learnable_backward(grad_y, x, scale, zero_point, *ctx.args)
        return dx, ds, dz, None, None, None, None

    torch.library.register_autograd("accelops::fake_quantize_learnable", lsq_backward, setup_context=lsq_setup)

    register_triton_kernels(
        "fake_quant",
        ("fake_quantize", "fake_quantize_backward", "fake_quantize_learnable", "fake_quantize_learnable_backward"),
    )


_register()
