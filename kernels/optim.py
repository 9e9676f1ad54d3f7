"""Triton kernels for the 8-bit optimizers; accelops/reference/optim.py is the spec.

Launchers (same signatures and in-place results as the torch.ops.accelops ops):
    adamw8bit_step_(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, v_map, beta1, c1, beta2, c2,
                    decay, step_size, bc2_sqrt, eps, block_size=256) -> None
    sgd8bit_step_(param, grad, codes, absmax, qmap, lr, momentum, dampening, weight_decay, nesterov, first,
                  block_size=256) -> None

Each program owns ROWS whole quantization blocks as a [ROWS, block_size] tile, so the block
absmax is a row reduction in registers and the step is one pass: load, dequantize, step,
store the parameter, reduce, requantize, store codes and scales.

Bit-exactness: the nearest code is #{i : t_i < x}, found by an 8-step branch-free binary
search over the 256 padded thresholds (t_255 = +inf), the same count the reference takes
with searchsorted; division and square root are the IEEE-rounded div_rn / sqrt_rn (the
plain GPU `/` and sqrt are approximate), and GPU launches pass enable_fp_fusion=False so no
a * b + c is contracted into an FMA. The absmax reduction keeps NaN explicitly (a GPU max
may drop it). bf16 stores round to nearest even by hand (the interpreter's cast truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8 import _interpreting, _on_device_of

_P_FP32, _P_BF16, _P_FP16 = 0, 1, 2


@triton.jit
def _codes(x, t_ptr):
    idx = tl.zeros(x.shape, tl.int32)
    for k in tl.static_range(8):
        step = 128 >> k
        t = tl.load(t_ptr + idx + (step - 1))
        idx = tl.where(t < x, idx + step, idx)
    return tl.where(x != x, 0, idx)


@triton.jit
def _absmax_rows(x, ok):
    a = tl.where(ok, tl.abs(x), 0.0)
    isnan = a != a
    has_nan = tl.max(tl.where(isnan, 1, 0), axis=1)
    amax = tl.max(tl.where(isnan, 0.0, a), axis=1)
    return tl.where(has_nan > 0, float("nan"), amax)


@triton.jit
def _load_f32(ptr, offs, ok, P_KIND: tl.constexpr):
    if P_KIND == 1:  # bf16 read through an int16 view: widen the bits (exact)
        bits = tl.load(ptr + offs, mask=ok, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _store_param(ptr, offs, ok, p, P_KIND: tl.constexpr):
    if P_KIND == 1:
        bits = p.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(p != p, 0x7FC0, rounded)
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=ok)
    elif P_KIND == 2:
        tl.store(ptr + offs, p.to(tl.float16), mask=ok)
    else:
        tl.store(ptr + offs, p, mask=ok)


@triton.jit
def _requantize(x, ok, rows, nb, offs, codes_ptr, absmax_ptr, t_ptr):
    amax = _absmax_rows(x, ok)
    div = tl.where(amax > 0, amax, 1.0)
    c = _codes(tl.math.div_rn(x, div[:, None]), t_ptr)
    tl.store(codes_ptr + offs, c.to(tl.uint8), mask=ok)
    tl.store(absmax_ptr + rows, amax, mask=rows < nb)


@triton.jit
def _adamw8bit_kernel(
    p_ptr,
    g_ptr,
    mc_ptr,
    ma_ptr,
    vc_ptr,
    va_ptr,
    mmap_ptr,
    vmap_ptr,
    mt_ptr,
    vt_ptr,
    n,
    nb,
    b1,
    c1,
    b2,
    c2,
    decay,
    step_size,
    bc2_sqrt,
    eps,
    BS: tl.constexpr,
    ROWS: tl.constexpr,
    P_KIND: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    ok = offs < n
    g = _load_f32(g_ptr, offs, ok, P_KIND)
    p = _load_f32(p_ptr, offs, ok, P_KIND)
    s1 = tl.load(ma_ptr + rows, mask=rows < nb, other=0.0)
    s2 = tl.load(va_ptr + rows, mask=rows < nb, other=0.0)
    mo = tl.load(mmap_ptr + tl.load(mc_ptr + offs, mask=ok, other=0).to(tl.int32)) * s1[:, None]
    vo = tl.load(vmap_ptr + tl.load(vc_ptr + offs, mask=ok, other=0).to(tl.int32)) * s2[:, None]
    m = b1 * mo + c1 * g
    v = b2 * vo + (c2 * g) * g
    p = p * decay
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.math.div_rn(m, denom)
    _store_param(p_ptr, offs, ok, p, P_KIND)
    _requantize(m, ok, rows, nb, offs, mc_ptr, ma_ptr, mt_ptr)
    _requantize(v, ok, rows, nb, offs, vc_ptr, va_ptr, vt_ptr)


@triton.jit
def _sgd8bit_kernel(
    p_ptr,
    g_ptr,
    c_ptr,
    a_ptr,
    map_ptr,
    t_ptr,
    n,
    nb,
    lr,
    mu,
    damp_c,
    wd,
    HAS_WD: tl.constexpr,
    NESTEROV: tl.constexpr,
    FIRST: tl.constexpr,
    BS: tl.constexpr,
    ROWS: tl.constexpr,
    P_KIND: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    ok = offs < n
    g = _load_f32(g_ptr, offs, ok, P_KIND)
    p = _load_f32(p_ptr, offs, ok, P_KIND)
    if HAS_WD:
        g = g + wd * p
    if FIRST:
        buf = g
    else:
        s = tl.load(a_ptr + rows, mask=rows < nb, other=0.0)
        old = tl.load(map_ptr + tl.load(c_ptr + offs, mask=ok, other=0).to(tl.int32)) * s[:, None]
        buf = mu * old + damp_c * g
    if NESTEROV:
        d = g + mu * buf
    else:
        d = buf
    p = p - lr * d
    _store_param(p_ptr, offs, ok, p, P_KIND)
    _requantize(buf, ok, rows, nb, offs, c_ptr, a_ptr, t_ptr)


# --------------------------------------------------------------------------- launchers

_TABLES: dict = {}


def _padded_thresholds(qmap: torch.Tensor) -> torch.Tensor:
    """t_0..t_254 as the reference computes them, + t_255 = +inf, cached per map and device."""
    key = (qmap.device, qmap.data_ptr(), qmap._version)
    t = _TABLES.get(key)
    if t is None:
        q = qmap.to(torch.float32)
        t = torch.cat(
            [
                (q[:-1] + q[1:]) * torch.tensor(0.5, dtype=torch.float32, device=q.device),
                torch.full((1,), float("inf"), device=q.device),
            ]
        ).contiguous()
        _TABLES[key] = t
    return t


def _kind(param: torch.Tensor) -> int:
    return {torch.float32: _P_FP32, torch.bfloat16: _P_BF16, torch.float16: _P_FP16}[param.dtype]


def _view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _rows(nb: int, block_size: int) -> int:
    # The interpreter runs each program as numpy calls: few large programs are fastest.
    if _interpreting():
        return max(1, min(triton.next_power_of_2(nb), max(1, (1 << 16) // block_size)))
    return max(1, 4096 // block_size) if block_size <= 4096 else 1


def _options() -> dict:
    return {} if _interpreting() else {"enable_fp_fusion": False}


def _check(param, grad, block_size):
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two, got {block_size}")
    if not (param.is_contiguous() and grad.is_contiguous()):
        raise ValueError("param and grad must be contiguous")
    if grad.dtype != param.dtype:
        raise TypeError(f"grad must have param's dtype {param.dtype}, got {grad.dtype}")


@_on_device_of
def adamw8bit_step_(
    param,
    grad,
    m_codes,
    m_absmax,
    v_codes,
    v_absmax,
    m_map,
    v_map,
    beta1,
    c1,
    beta2,
    c2,
    decay,
    step_size,
    bc2_sqrt,
    eps,
    block_size=256,
):
    _check(param, grad, block_size)
    n = param.numel()
    if n == 0:
        return None
    nb = triton.cdiv(n, block_size)
    rows = _rows(nb, block_size)
    _adamw8bit_kernel[(triton.cdiv(nb, rows),)](
        _view(param),
        _view(grad),
        m_codes,
        m_absmax,
        v_codes,
        v_absmax,
        m_map.contiguous(),
        v_map.contiguous(),
        _padded_thresholds(m_map),
        _padded_thresholds(v_map),
        n,
        nb,
        float(beta1),
        float(c1),
        float(beta2),
        float(c2),
        float(decay),
        float(step_size),
        float(bc2_sqrt),
        float(eps),
        BS=block_size,
        ROWS=rows,
        P_KIND=_kind(param),
        **_options(),
    )
    return None


@_on_device_of
def sgd8bit_step_(
    param, grad, codes, absmax, qmap, lr, momentum, dampening, weight_decay, nesterov, first, block_size=256
):
    _check(param, grad, block_size)
    n = param.numel()
    if n == 0:
        return None
    nb = triton.cdiv(n, block_size)
    rows = _rows(nb, block_size)
    _sgd8bit_kernel[(triton.cdiv(nb, rows),)](
        _view(param),
        _view(grad),
        codes,
        absmax,
        qmap.contiguous(),
        _padded_thresholds(qmap),
        n,
        nb,
        float(lr),
        float(momentum),
        float(1.0 - dampening),
        float(weight_decay),
        HAS_WD=weight_decay != 0,
        NESTEROV=bool(nesterov),
        FIRST=bool(first),
        BS=block_size,
        ROWS=rows,
        P_KIND=_kind(param),
        **_options(),
    )
    return None
