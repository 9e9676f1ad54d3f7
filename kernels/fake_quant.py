"""Triton kernels for fake quantization; accelops/reference/fake_quant.py is the spec.

Launchers (same signatures and results as the torch.ops.accelops ops):
    fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None) -> (y, mask bits)
    fake_quantize_backward(grad, mask) -> dx
    fake_quantize_learnable(x, scale, zero_point, quant_min, quant_max, axis=None, grad_factor=1.0) -> y
    fake_quantize_learnable_backward(grad, x, scale, zero_point, quant_min, quant_max, axis=None,
                                     grad_factor=1.0) -> (dx, dscale, dzero_point)

x is treated as a flat array [outer, C, inner] (C the channel axis); each program handles
BLOCK consecutive elements, BLOCK a multiple of 8 so it owns whole mask bytes.

Bit-exactness: 1 / scale is computed by torch on the host side of the launch (IEEE
division; Triton's `/` is approximate on GPUs); rounding half to even is floor-based
(v - floor(v) is exact, ties go to the even neighbour), valid for any magnitude, with no
multiply-add pair the GPU compiler could contract into one FMA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8 import _interpreting, _on_device_of


@triton.jit
def _load_block(x_ptr, s_ptr, inv_ptr, z_ptr, offs, ok, channels, inner):
    """x as fp32 and the scale, 1/scale and zero point of each element's channel."""
    c = (offs // inner) % channels
    s = tl.load(s_ptr + c, mask=ok, other=1.0)
    inv = tl.load(inv_ptr + c, mask=ok, other=1.0)
    z = tl.load(z_ptr + c, mask=ok, other=0.0)
    return tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32), s, inv, z


@triton.jit
def _fq_core(x, s, inv, z, qmin, qmax):
    v = x * inv
    # |v| >= 2^23 (Inf and NaN included) is already integral; masking it out first keeps
    # Inf - Inf out of the arithmetic.
    small = tl.abs(v) < 8388608.0
    vs = tl.where(small, v, 0.0)
    r = tl.floor(vs)
    d = vs - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)
    q = tl.where(small, r, v) + z
    inside = (q >= qmin) & (q <= qmax)
    y = (tl.minimum(tl.maximum(q, qmin), qmax) - z) * s
    y = tl.where(x != x, x, y)
    return y, q, inside


@triton.jit
def _fake_quantize_kernel(
    x_ptr,
    y_ptr,
    mask_ptr,
    s_ptr,
    inv_ptr,
    z_ptr,
    n,
    channels,
    inner,
    qmin,
    qmax,
    WRITE_MASK: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x, s, inv, z = _load_block(x_ptr, s_ptr, inv_ptr, z_ptr, offs, ok, channels, inner)
    y, q, inside = _fq_core(x, s, inv, z, qmin, qmax)
    if OUT_BF16:
        # Round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates.
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)
        tl.store(y_ptr + offs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=ok)
    else:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    if WRITE_MASK:
        lanes = tl.arange(0, 8)
        bits = tl.reshape((inside & ok).to(tl.int32), (BLOCK // 8, 8)) << lanes[None, :]  # padding bits 0
        byte = tl.sum(bits, axis=1)
        boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + boffs, byte.to(tl.uint8), mask=boffs < (n + 7) // 8)


@triton.jit
def _fake_quantize_backward_kernel(g_ptr, mask_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    byte = tl.load(mask_ptr + boffs, mask=boffs < (n + 7) // 8, other=0).to(tl.int32)
    lanes = tl.arange(0, 8)
    bit = tl.reshape((byte[:, None] >> lanes[None, :]) & 1, (BLOCK,))
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    # a multiply in the gradient's dtype, as torch's dy * mask (NaN * 0 stays NaN)
    dx = g * bit.to(g.dtype)
    tl.store(dx_ptr + offs, dx, mask=ok)


@triton.jit
def _lsq_backward_kernel(
    x_ptr,
    g_ptr,
    dx_ptr,
    ds_ptr,
    dz_ptr,
    s_ptr,
    inv_ptr,
    z_ptr,
    n,
    channels,
    inner,
    qmin,
    qmax,
    grad_factor,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x, s, inv, z = _load_block(x_ptr, s_ptr, inv_ptr, z_ptr, offs, ok, channels, inner)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xfq, q, inside = _fq_core(x, s, inv, z, qmin, qmax)
    dx = g * inside.to(tl.float32)
    edge = tl.where(q < qmin, qmin - z, qmax - z)
    ds = tl.where(inside, g * (xfq - x) * inv, g * edge) * grad_factor
    dz = tl.where(inside, 0.0, g * -1.0 * s * grad_factor)
    tl.store(dx_ptr + offs, dx, mask=ok)
    tl.store(ds_ptr + offs, ds, mask=ok)
    tl.store(dz_ptr + offs, dz, mask=ok)


# --------------------------------------------------------------------------- launchers


def _block(n: int) -> int:
    # The interpreter runs each program as numpy calls: few large programs are fastest.
    if _interpreting():
        return max(8, min(1 << 16, triton.next_power_of_2(max(n, 1))))
    return 1024


def _geometry(x: torch.Tensor, axis):
    if axis is None:
        return 1, max(x.numel(), 1)
    inner = 1
    for d in x.shape[axis + 1 :]:
        inner *= d
    return max(x.shape[axis], 1), max(inner, 1)


def _qparams(scale, zero_float):
    s = scale.reshape(-1).to(torch.float32).contiguous()
    inv = (torch.ones_like(s) / s).contiguous()  # IEEE division, as the reference
    return s, inv, zero_float.reshape(-1).to(torch.float32).contiguous()


def _launch_forward(x, s, inv, z, quant_min, quant_max, axis, write_mask):
    xc = x.contiguous()
    n = xc.numel()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mask = torch.empty(((n + 7) // 8,), dtype=torch.uint8, device=x.device)
    if n:
        channels, inner = _geometry(x, axis)
        block = _block(n)
        out_bf16 = x.dtype == torch.bfloat16
        _fake_quantize_kernel[(triton.cdiv(n, block),)](
            xc,
            y.view(torch.int16) if out_bf16 else y,
            mask,
            s,
            inv,
            z,
            n,
            channels,
            inner,
            float(quant_min),
            float(quant_max),
            WRITE_MASK=write_mask,
            OUT_BF16=out_bf16,
            BLOCK=block,
        )
    return y, mask


@_on_device_of
def fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None):
    s, inv, z = _qparams(scale, zero_point)
    return _launch_forward(x, s, inv, z, quant_min, quant_max, axis, True)


@_on_device_of
def fake_quantize_backward(grad, mask):
    gc = grad.contiguous()
    n = gc.numel()
    dx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if n:
        block = _block(n)
        _fake_quantize_backward_kernel[(triton.cdiv(n, block),)](gc, mask, dx, n, BLOCK=block)
    return dx


@_on_device_of
def fake_quantize_learnable(x, scale, zero_point, quant_min, quant_max, axis=None, grad_factor=1.0):
    # The forward's zero point, rounded and clamped on the device (no host synchronisation).
    z = zero_point.detach().float().round().clamp(quant_min, quant_max)
    s, inv, z = _qparams(scale.detach(), z)
    return _launch_forward(x, s, inv, z, quant_min, quant_max, axis, False)[0]


@_on_device_of
def fake_quantize_learnable_backward(grad, x, scale, zero_point, quant_min, quant_max, axis=None, grad_factor=1.0):
    zf = zero_point.detach().float()
    if axis is None:  # torch's per-tensor backward zero point: trunc(clamp(z + 0.5))
        z = (zf + 0.5).clamp(quant_min, quant_max).trunc()
    else:
        z = zf.round().clamp(quant_min, quant_max)
    s, inv, z = _qparams(scale.detach(), z)
    xc = x.float().contiguous()
    gc = grad.float().contiguous()
    n = xc.numel()
    dx = torch.empty_like(xc)
    ds = torch.empty_like(xc)
    dz = torch.empty_like(xc)
    if n:
        channels, inner = _geometry(x, axis)
        block = _block(n)
        _lsq_backward_kernel[(triton.cdiv(n, block),)](
            xc,
            gc,
            dx,
            ds,
            dz,
            s,
            inv,
            z,
            n,
            channels,
            inner,
            float(quant_min),
            float(quant_max),
            float(grad_factor),
            BLOCK=block,
        )
    dims = tuple(range(x.dim())) if axis is None else tuple(d for d in range(x.dim()) if d != axis)
    if dims:  # sum(dim=()) would reduce everything
        ds, dz = ds.sum(dim=dims), dz.sum(dim=dims)
    d_scale = ds.reshape(scale.shape).to(scale.dtype)
    d_zero = dz.reshape(zero_point.shape).to(zero_point.dtype)
    return dx.to(x.dtype), d_scale, d_zero
