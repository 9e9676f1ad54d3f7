"""Triton kernels for the fused FFN; accelops/reference/ffn.py is the spec they match.

Launchers (the signatures of the torch.ops.accelops ops, registered as their CUDA kernels):
    fused_ffn(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, save, act_quant) -> (y, g, u)
    fused_ffn_backward(dy, x, g, u, w_gate, w_up, w_down, activation, has_b_gate, has_b_up,
                       has_b_down, act_quant, need_dx, need_dw) -> (dx, dWg, dWu, dWd, dbg, dbu, dbd)
    ffn_activation(g, u, activation) -> h

Forward: one kernel computes a [BLOCK_M, BLOCK_N] tile of both the gate and the up
projection (two fp32 accumulators fed by the same x tile), adds the biases, applies the
activation in registers and writes h, plus g and u only when they must be saved for
backward. The down projection is torch's GEMM.
Backward: one kernel computes a tile of dh = dy Wd with tl.dot and, still in registers,
recomputes h from the saved g and u and forms dg and du; the weight and input gradients
are torch GEMMs on those.

fp32 dots use input_precision="ieee" (Triton's default on GPUs is TF32, ~1e-3 relative,
far from eager fp32's error). Tile sizes for GPUs are untuned (no GPU here to measure on).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.ffn import ACTIVATIONS
from .int8 import _interpreting, _on_device_of, _pow2, _tile_ids

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def _config(m: int, n: int, k: int) -> dict:
    # Interpreter: every program costs milliseconds of Python, so tiles as large as the
    # (small, tested) problem. GPU: 64 x 64 output tiles with two accumulators (gate, up).
    if _interpreting():
        return {
            "BLOCK_M": _pow2(m, 16, 64),
            "BLOCK_N": _pow2(n, 16, 64),
            "BLOCK_K": _pow2(k, 16, 128),
            "GROUP_M": 8,
            "num_warps": 4,
            "num_stages": 1,
        }
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def _precision(dtype: torch.dtype) -> dict:
    # The interpreter's tl.dot gets bf16 operands wrong (it multiplies their raw bits):
    # there they are widened to fp32 first, exactly (bf16 -> fp32 is lossless).
    upcast = _interpreting() and dtype == torch.bfloat16
    return {"IEEE": dtype == torch.float32 or upcast, "UPCAST": upcast}


def _act_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATIONS.index(activation)  # 0 swiglu, 1 geglu, 2 gelu


@triton.jit
def _cast(v, dt: tl.constexpr, RNE: tl.constexpr):
    # The interpreter casts fp32 to bf16 by truncation (up to 1 ulp off, twice eager's
    # rounding error); with RNE the value is first rounded to nearest even on the bits, so
    # the truncation that follows is exact. GPUs round correctly and skip this.
    if RNE:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dt)


@triton.jit
def _gate_up_act_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    bg_ptr,
    bu_ptr,
    h_ptr,
    g_ptr,
    u_ptr,
    M,
    H,
    D,
    stride_xm,
    stride_xd,
    stride_wh,
    stride_wd,
    ACT: tl.constexpr,
    HAS_BG: tl.constexpr,
    HAS_BU: tl.constexpr,
    SAVE: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """h[M, H] = act(x Wg^T + bg, x Wu^T + bu); g and u stored too when SAVE. h, g, u are
    contiguous [M, H]; Wg and Wu share their strides."""
    GATED: tl.constexpr = ACT != 2
    pid_m, pid_n = _tile_ids(M, H, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < H
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xd
    # the weights are read as [BLOCK_K, BLOCK_N] tiles straight from the row-major [H, D] layout
    w_off = offs_n.to(tl.int64)[None, :] * stride_wh + offs_k[:, None] * stride_wd
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + offs_k) < D
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wu = tl.load(wu_ptr + w_off, mask=w_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            wu = wu.to(tl.float32)
        if IEEE:
            acc_u = tl.dot(a, wu, acc_u, input_precision="ieee")
        else:
            acc_u = tl.dot(a, wu, acc_u)
        if GATED:
            wg = tl.load(wg_ptr + w_off, mask=w_mask, other=0.0)
            if UPCAST:
                wg = wg.to(tl.float32)
            if IEEE:
                acc_g = tl.dot(a, wg, acc_g, input_precision="ieee")
            else:
                acc_g = tl.dot(a, wg, acc_g)
        x_ptrs += BLOCK_K * stride_xd
        w_off += BLOCK_K * stride_wd
    if HAS_BU:
        acc_u += tl.load(bu_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED and HAS_BG:
        acc_g += tl.load(bg_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # Round the saved pre-activations to the output dtype first, so that the forward's h and
    # the backward's recomputed h come from the same g and u.
    dt = h_ptr.dtype.element_ty
    u = _cast(acc_u, dt, UPCAST).to(tl.float32)
    if ACT == 0:
        g = _cast(acc_g, dt, UPCAST).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u
    elif ACT == 1:
        g = _cast(acc_g, dt, UPCAST).to(tl.float32)
        h = 0.5 * g * (1.0 + tl.math.erf(g * _INV_SQRT2)) * u
    else:
        h = 0.5 * u * (1.0 + tl.math.erf(u * _INV_SQRT2))
    out = offs_m.to(tl.int64)[:, None] * H + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(h_ptr + out, _cast(h, dt, UPCAST), mask=mask)
    if SAVE:
        tl.store(u_ptr + out, u.to(dt), mask=mask)
        if GATED:
            tl.store(g_ptr + out, g.to(dt), mask=mask)


@triton.jit
def _act_backward_kernel(
    dy_ptr,
    wd_ptr,
    g_ptr,
    u_ptr,
    h_ptr,
    dg_ptr,
    du_ptr,
    M,
    H,
    D,
    stride_dym,
    stride_dyd,
    stride_wdd,
    stride_wdh,
    ACT: tl.constexpr,
    WRITE_H: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dh = dy Wd ([M, D] x [D, H]) tile by tile; then, in registers, h (recomputed, if
    WRITE_H), dg and du from the saved g and u. g, u, h, dg, du are contiguous [M, H]."""
    GATED: tl.constexpr = ACT != 2
    pid_m, pid_n = _tile_ids(M, H, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < H
    dy_ptrs = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_k[None, :] * stride_dyd
    wd_ptrs = wd_ptr + offs_k.to(tl.int64)[:, None] * stride_wdd + offs_n[None, :] * stride_wdh
    dh = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + offs_k) < D
        a = tl.load(dy_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(wd_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            dh = tl.dot(a, b, dh, input_precision="ieee")
        else:
            dh = tl.dot(a, b, dh)
        dy_ptrs += BLOCK_K * stride_dyd
        wd_ptrs += BLOCK_K * stride_wdd
    dt = du_ptr.dtype.element_ty
    dh = _cast(dh, dt, UPCAST).to(tl.float32)  # eager rounds dh to the dtype too
    off = offs_m.to(tl.int64)[:, None] * H + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        dg = dh * u * (s + a * (1.0 - s))
        du = dh * a
        h = a * u
    elif ACT == 1:
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(g * _INV_SQRT2))
        a = g * cdf
        dg = dh * u * (cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g))
        du = dh * a
        h = a * u
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(u * _INV_SQRT2))
        du = dh * (cdf + u * _INV_SQRT_2PI * tl.exp(-0.5 * u * u))
        h = u * cdf
        dg = du
    tl.store(du_ptr + off, _cast(du, dt, UPCAST), mask=mask)
    if GATED:
        tl.store(dg_ptr + off, _cast(dg, dt, UPCAST), mask=mask)
    if WRITE_H:
        tl.store(h_ptr + off, _cast(h, dt, UPCAST), mask=mask)


@triton.jit
def _activation_kernel(g_ptr, u_ptr, h_ptr, N, ACT: tl.constexpr, RNE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u
    elif ACT == 1:
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h = 0.5 * g * (1.0 + tl.math.erf(g * _INV_SQRT2)) * u
    else:
        h = 0.5 * u * (1.0 + tl.math.erf(u * _INV_SQRT2))
    tl.store(h_ptr + offs, _cast(h, h_ptr.dtype.element_ty, RNE), mask=ok)


# --------------------------------------------------------------------------- launchers


def _fake_quant_rows(t2: torch.Tensor) -> torch.Tensor:
    """Per-token int8 quantize-dequantize (the int8 family's Triton quantizer), in t2's dtype."""
    from . import int8 as triton_int8

    q, scale = triton_int8.quantize_activation_int8(t2)
    return (q.float() * scale).to(t2.dtype)


def _grid(m: int, n: int, cfg: dict):
    return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)


@_on_device_of
def fused_ffn(
    x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, activation="swiglu", save=False, act_quant=False
):
    act = _act_code(activation)
    gated = act != 2
    d, h_dim = x.shape[-1], w_up.shape[0]
    lead = x.shape[:-1]
    m = lead.numel()
    x2 = x.reshape(m, d)
    if act_quant and m:
        x2 = _fake_quant_rows(x2)
    w_up = w_up.contiguous()
    w_gate = w_gate.contiguous() if gated else w_up
    h = torch.empty((m, h_dim), dtype=x.dtype, device=x.device)
    g = torch.empty((m if save and gated else 0, h_dim), dtype=x.dtype, device=x.device)
    u = torch.empty((m if save else 0, h_dim), dtype=x.dtype, device=x.device)
    if m and h_dim:
        cfg = _config(m, h_dim, d)
        _gate_up_act_kernel[_grid(m, h_dim, cfg)](
            x2,
            w_gate,
            w_up,
            b_gate if b_gate is not None else w_up,
            b_up if b_up is not None else w_up,
            h,
            g if save and gated else h,
            u if save else h,
            m,
            h_dim,
            d,
            x2.stride(0),
            x2.stride(1),
            w_up.stride(0),
            w_up.stride(1),
            ACT=act,
            HAS_BG=b_gate is not None,
            HAS_BU=b_up is not None,
            SAVE=save,
            **_precision(x.dtype),
            **cfg,
        )
    if act_quant and m:
        h = _fake_quant_rows(h)
    y = torch.nn.functional.linear(h, w_down, b_down).reshape(*lead, d)
    hidden = (*lead, h_dim)
    return (
        y,
        g.reshape(hidden) if save and gated else x.new_empty((0,)),
        u.reshape(hidden) if save else x.new_empty((0,)),
    )


@_on_device_of
def fused_ffn_backward(
    dy, x, g, u, w_gate, w_up, w_down, activation, has_b_gate, has_b_up, has_b_down, act_quant, need_dx, need_dw
):
    act = _act_code(activation)
    gated = act != 2
    d, h_dim = x.shape[-1], w_up.shape[0]
    m = x.shape[:-1].numel()
    none = lambda dt=x.dtype: x.new_empty((0,), dtype=dt)  # noqa: E731
    x2 = x.reshape(m, d)
    dy2 = dy.reshape(m, d)
    g2 = g.reshape(m, h_dim) if gated else None
    u2 = u.reshape(m, h_dim)
    h = torch.empty((m, h_dim), dtype=x.dtype, device=x.device) if need_dw else None
    du = torch.empty((m, h_dim), dtype=x.dtype, device=x.device)
    dg = torch.empty((m, h_dim), dtype=x.dtype, device=x.device) if gated else du
    if m and h_dim:
        cfg = _config(m, h_dim, d)
        _act_backward_kernel[_grid(m, h_dim, cfg)](
            dy2,
            w_down,
            g2 if gated else u2,
            u2,
            h if need_dw else du,
            dg,
            du,
            m,
            h_dim,
            d,
            dy2.stride(0),
            dy2.stride(1),
            w_down.stride(0),
            w_down.stride(1),
            ACT=act,
            WRITE_H=need_dw,
            **_precision(x.dtype),
            **cfg,
        )
    elif m:
        du.zero_()
        dg.zero_()
        if need_dw:
            h.zero_()
    dx = none()
    if need_dx:
        dx = du @ w_up
        if gated:
            dx = dx.addmm_(dg, w_gate)
        dx = dx.reshape(x.shape)
    dwg, dwu, dwd = none(), none(), none()
    dbg, dbu, dbd = none(torch.float32), none(torch.float32), none(torch.float32)
    if need_dw:
        xin = _fake_quant_rows(x2) if act_quant and m else x2
        if act_quant and m:
            h = _fake_quant_rows(h)
        dwd = dy2.t() @ h
        dwu = du.t() @ xin
        if gated:
            dwg = dg.t() @ xin
        if has_b_down:
            dbd = dy2.float().sum(0)
        if has_b_up:
            dbu = du.float().sum(0)
        if has_b_gate:
            dbg = dg.float().sum(0)
    return dx, dwg, dwu, dwd, dbg, dbu, dbd


def ffn_activation(g, u, activation="swiglu"):
    return _ffn_activation(u, g, activation)


@_on_device_of
def _ffn_activation(u, g, activation):
    act = _act_code(activation)
    u_c = u.contiguous()
    g_c = g.contiguous() if act != 2 else u_c
    h = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    n = u.numel()
    if n:
        block = _pow2(n, 16, 1 << 16) if _interpreting() else 1024
        _activation_kernel[(triton.cdiv(n, block),)](
            g_c, u_c, h, n, ACT=act, RNE=_precision(u.dtype)["UPCAST"], BLOCK=block
        )
    return h
