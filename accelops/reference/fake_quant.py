"""Pure-PyTorch reference for fake quantization: the specification every backend matches.

Affine fake quantization of x with scale s > 0, integer zero point z and range [qmin, qmax],
per tensor or per channel along `axis` (s and z then hold one value per channel):

    inv  = 1 / s                                   (fp32, IEEE division)
    q    = round_half_even(x * inv) + z            (fp32; exact, |q| <= 2^24 in range)
    mask = qmin <= q <= qmax                       (the straight-through gradient mask)
    y    = (clamp(q, qmin, qmax) - z) * s          (fp32, cast to x's dtype)

This is torch.fake_quantize_per_{tensor,channel}_affine's arithmetic step for step, so y
is bit-identical to torch's on fp32 (and on bf16/fp16, which both compute in fp32). Two
cases differ on purpose, where torch's cast of q to int64 is undefined behaviour and
returns nonsense: a NaN input stays NaN (torch returns qmin's value), and +-Inf clamps to
qmax's / qmin's value (torch returns qmin's value for both); both have mask False.

The backward is dy * mask (as torch: a NaN or Inf dy stays NaN where the mask is 0). The
kernels save the mask as bits: element i of x in row-major order is bit i % 8 of byte
i // 8 (`pack_mask`), 1/32 of an fp32 tensor and 1/8 of torch's bool mask.

The learnable (LSQ) variant follows torch._fake_quantize_learnable_per_{tensor,channel}_affine:
the zero point is a float tensor, rounded half-even and clamped to the range in the forward;
gradients in `fake_quantize_learnable_backward`.
"""

from __future__ import annotations

import torch

# The kernels compute q in fp32, which holds every integer up to 2^24 exactly.
QRANGE_LIMIT = 2**24


def channel_shape(x: torch.Tensor, axis: int | None) -> tuple:
    """The shape that broadcasts a per-channel vector along `axis` of x (or () per tensor)."""
    if axis is None:
        return ()
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _qparams(x, scale, zero_point, axis):
    shape = channel_shape(x, axis)
    s = scale.to(torch.float32).reshape(shape)
    z = zero_point.to(torch.float32).reshape(shape)
    return s, z


def fake_quantize_with_mask(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
):
    """-> (y in x's dtype, mask bool of x's shape). scale fp32 and zero_point integer tensors
    with one element (axis=None) or x.shape[axis] elements."""
    s, z = _qparams(x, scale, zero_point, axis)
    xf = x.float()
    inv = torch.ones_like(s) / s  # tensor / tensor: IEEE division, as torch's 1.0f / scale
    q = torch.round(xf * inv) + z
    mask = (q >= quant_min) & (q <= quant_max)
    y = (q.clamp(quant_min, quant_max) - z) * s
    y = torch.where(torch.isnan(xf), xf, y)
    return y.to(x.dtype), mask


def fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None):
    return fake_quantize_with_mask(x, scale, zero_point, quant_min, quant_max, axis)[0]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 [ceil(numel / 8)], element i at bit i % 8 of byte i // 8."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel]
    return flat.bool().reshape(shape)


def fake_quantize_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """dy * mask, with `mask` the packed bits (pack_mask) of the forward's mask."""
    return grad * unpack_mask(mask, grad.shape)  # a multiply, as torch's: NaN * 0 stays NaN


# --------------------------------------------------------------------------- learnable (LSQ)


def learnable_forward_zero_point(zero_point: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """The integer zero point the forward uses: round half to even, then clamp (as torch)."""
    return zero_point.float().round().clamp(quant_min, quant_max)


def learnable_backward_zero_point(
    zero_point: torch.Tensor, quant_min: int, quant_max: int, per_channel: bool
) -> torch.Tensor:
    """The zero point torch's backward uses, which is not the forward's: per tensor it is
    trunc(clamp(z + 0.5)) (round half up for z >= 0), per channel round-then-clamp as forward."""
    z = zero_point.float()
    if per_channel:
        return z.round().clamp(quant_min, quant_max)
    return (z + 0.5).clamp(quant_min, quant_max).trunc()


def fake_quantize_learnable(x, scale, zero_point, quant_min, quant_max, axis=None, grad_factor=1.0):
    z = learnable_forward_zero_point(zero_point, quant_min, quant_max)
    return fake_quantize(x, scale.float(), z, quant_min, quant_max, axis)


def fake_quantize_learnable_backward(grad, x, scale, zero_point, quant_min, quant_max, axis=None, grad_factor=1.0):
    """-> (dx, dscale, dzero_point) with torch's LSQ formulas; dscale/dzero_point have the
    shapes of scale/zero_point and are sums over every element of their channel."""
    s, _ = _qparams(x, scale, zero_point, axis)
    z = learnable_backward_zero_point(zero_point, quant_min, quant_max, axis is not None).reshape(s.shape)
    xf, gf = x.float(), grad.float()
    inv = torch.ones_like(s) / s
    q = torch.round(xf * inv) + z
    inside = (q >= quant_min) & (q <= quant_max)
    dx = gf * inside
    xfq = (q.clamp(quant_min, quant_max) - z) * s
    below = q < quant_min
    d_scale = (
        torch.where(inside, gf * (xfq - xf) * inv, gf * torch.where(below, quant_min - z, quant_max - z)) * grad_factor
    )
    d_zero = torch.where(inside, torch.zeros_like(gf), gf * (-1) * s * grad_factor)
    if axis is None:
        dims = tuple(range(x.dim()))
    else:
        dims = tuple(d for d in range(x.dim()) if d != axis)
    if dims:  # sum(dim=()) would reduce everything
        d_scale, d_zero = d_scale.sum(dim=dims), d_zero.sum(dim=dims)
    d_scale = d_scale.reshape(scale.shape).to(scale.dtype)
    d_zero = d_zero.reshape(zero_point.shape).to(zero_point.dtype)
    return dx.to(x.dtype), d_scale, d_zero
