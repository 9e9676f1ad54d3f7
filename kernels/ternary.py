"""Triton kernels for the ternary (BitNet b1.58) family; accelops/reference/ternary.py is the
spec they match, packed layout included.

Launchers (same signatures and results as the reference):
    pack_ternary(wq), unpack_ternary(w_packed, k),
    quantize_weight_ternary(w, per_channel=False), ternary_matmul(x, w_packed, w_scale, bias=None)

Packed layout, restated for the index arithmetic below: weight k = 128 b + 32 j + i is the
2-bit code Wq + 1 at bits [2 j, 2 j + 2) of byte 32 b + i. So byte column c = 32 b + i
holds the four weights k = 128 (c // 32) + 32 j + (c % 32), j = 0..3, and the j-th
"plane" of a run of whole blocks is the 32-weight slices that start 32 j into each block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.ternary import BLOCK_BYTES, BLOCK_K, EPS, packed_cols, ternary_scale
from .int8 import (
    _RNE_MAGIC,
    _dequant_store,
    _interpreting,
    _matmul_grid,
    _on_device_of,
    _pow2,
    _quantize_rows,
    _tile_ids,
    tuned_config,
)

_EPS = tl.constexpr(EPS)
# Constants of the layout, as constexpr so the kernels can use them.
_PK = tl.constexpr(BLOCK_K)  # weights per packed block (128)
_PB = tl.constexpr(BLOCK_BYTES)  # bytes per packed block (32)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _byte_tile(pid_n, pid_c, N, NBYTES, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows (int64), their mask, byte columns, the tile mask, and the index k of each byte's
    j = 0 weight."""
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < NBYTES)[None, :]
    k_base = (cols // _PB) * _PK + cols % _PB
    return rows.to(tl.int64), row_ok, cols, mask, k_base


@triton.jit
def _pack_ternary_kernel(
    wq_ptr, out_ptr, N, K, NBYTES, stride_wn, stride_wk, stride_on, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr
):
    """int8 {-1, 0, 1} [N, K] -> packed bytes; weights past K read as 0, i.e. code 1."""
    rows, row_ok, cols, mask, k_base = _byte_tile(tl.program_id(0), tl.program_id(1), N, NBYTES, BLOCK_N, BLOCK_C)
    packed = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32)
    for j in tl.static_range(4):
        k = k_base + j * 32
        wq = tl.load(wq_ptr + rows[:, None] * stride_wn + k[None, :] * stride_wk, mask=mask & (k < K)[None, :], other=0)
        packed = packed | ((wq.to(tl.int32) + 1) << (2 * j))
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], packed.to(tl.uint8), mask=mask)


@triton.jit
def _quantize_pack_ternary_kernel(
    w_ptr,
    scale_ptr,
    out_ptr,
    N,
    K,
    NBYTES,
    stride_wn,
    stride_wk,
    stride_s,
    stride_on,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Float [N, K] -> packed bytes of clamp(round_half_even(w / max(scale, EPS)), -1, 1) + 1;
    the int8 Wq never touches memory. stride_s is 0 for a per-tensor scale."""
    rows, row_ok, cols, mask, k_base = _byte_tile(tl.program_id(0), tl.program_id(1), N, NBYTES, BLOCK_N, BLOCK_C)
    denom = tl.maximum(tl.load(scale_ptr + rows * stride_s, mask=row_ok, other=1.0), _EPS)
    packed = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32)
    for j in tl.static_range(4):
        k = k_base + j * 32
        w = tl.load(
            w_ptr + rows[:, None] * stride_wn + k[None, :] * stride_wk, mask=mask & (k < K)[None, :], other=0.0
        ).to(tl.float32)
        # Clamping before rounding equals rounding then clamping (the bounds are integers)
        # and keeps |v| inside the round-half-even trick's range whatever w / scale is.
        v = tl.clamp(tl.fdiv(w, denom[:, None], ieee_rounding=True), -1.0, 1.0)
        code = ((v + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int32) + 1  # round half to even, see kernels/int8.py
        packed = packed | (code << (2 * j))
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], packed.to(tl.uint8), mask=mask)


@triton.jit
def _unpack_ternary_kernel(
    p_ptr, out_ptr, N, K, NBYTES, stride_pn, stride_pc, stride_on, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Packed bytes -> int8 [N, K]: each byte is loaded once and yields its four weights."""
    rows, row_ok, cols, mask, k_base = _byte_tile(tl.program_id(0), tl.program_id(1), N, NBYTES, BLOCK_N, BLOCK_C)
    byte = tl.load(p_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pc, mask=mask, other=0x55)
    byte = byte.to(tl.int32)
    for j in tl.static_range(4):
        k = k_base + j * 32
        wq = ((byte >> (2 * j)) & 3) - 1
        tl.store(out_ptr + rows[:, None] * stride_on + k[None, :], wq.to(tl.int8), mask=mask & (k < K)[None, :])


@triton.jit
def _ternary_matmul_kernel(
    a_ptr,
    p_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    NBLOCKS,
    stride_am,
    stride_ak,
    stride_pn,
    stride_pc,
    stride_xs,
    stride_ws,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, N] = dequant(x_q[M, K] @ Wq[N, K]^T) with Wq decoded from the packed bytes in
    registers, never stored.

    Each K step takes BLOCKS_PER_STEP whole packed blocks: one [R, BLOCK_N] tile of bytes
    (R = 32 * BLOCKS_PER_STEP, contiguous in memory) serves four int8 dots, one per 2-bit
    plane j, each against the activation columns 128 b + 32 j + i of those blocks. Decoding
    straight to c - 1 keeps both dot operands signed int8, so the int32 sums are exact and
    no sum(x) correction is needed; padding weights decode to 0 and meet x = 0 anyway.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    R: tl.constexpr = BLOCKS_PER_STEP * 32
    r = tl.arange(0, R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # k offset (within a step) of the j = 0 weight that byte row r of the tile holds.
    k_plane = (r // _PB) * _PK + r % _PB
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    p_ptrs = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn + r[:, None] * stride_pc

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for blk in range(0, NBLOCKS, BLOCKS_PER_STEP):
        byte_ok = (blk * _PB + r) < NBLOCKS * _PB
        codes = tl.load(p_ptrs, mask=byte_ok[:, None] & n_ok[None, :], other=0x55).to(tl.int32)
        k0 = blk * _PK
        for j in tl.static_range(4):
            k = k0 + k_plane + j * 32
            a = tl.load(a_rows + k[None, :] * stride_ak, mask=m_ok[:, None] & (k < K)[None, :], other=0)
            w = (((codes >> (2 * j)) & 3) - 1).to(tl.int8)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        p_ptrs += R * stride_pc

    _dequant_store(
        acc, offs_m, offs_n, M, N, xs_ptr, stride_xs, ws_ptr, stride_ws, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS
    )


# --------------------------------------------------------------------------- configs


def _bytes_config(n: int, nbytes: int, interpret: bool) -> dict:
    """Tiles of [BLOCK_N rows, BLOCK_C byte columns] for pack / unpack / quantize+pack.
    GPU: 16 x 128 bytes = 2048 bytes, 8192 weights a program (untuned); interpreter: big
    tiles, few programs."""
    if interpret:
        block_c = _pow2(nbytes, 32, 2048)
        return {"BLOCK_N": _pow2(n, 1, max(1, (1 << 15) // block_c)), "BLOCK_C": block_c, "num_warps": 4}
    return {"BLOCK_N": 16, "BLOCK_C": 128, "num_warps": 4}


def _matmul_config(m: int, n: int, nblocks: int, interpret: bool) -> dict:
    """Tiles by M, like kernels.int8._matmul_config; K advances in whole packed blocks.

    GPU (untuned, no GPU was available to measure; sweep BLOCK_N, BLOCKS_PER_STEP,
    num_stages and add split-K for M <= 16 on real hardware): each plane dot has
    K = 32 * BLOCKS_PER_STEP, a multiple of the int8 MMA's k = 32.
      M <= 16  decode: bound by reading 2-bit weights, wide N tile and 256 weights a step;
      M <= 64  64 x 128 tiles;
      larger   128 x 128 tiles, 8 warps.
    Interpreter: large tiles and up to 1024 weights a step, so few Python-level iterations.
    """
    if interpret:
        return {
            "BLOCK_M": _pow2(m, 16, 128),
            "BLOCK_N": _pow2(n, 16, 128),
            "BLOCKS_PER_STEP": _pow2(nblocks, 1, 8),
            "GROUP_M": 8,
            "num_warps": 4,
            "num_stages": 1,
        }
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCKS_PER_STEP": 2, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCKS_PER_STEP": 1, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCKS_PER_STEP": 1, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _bytes_grid(n: int, nbytes: int, cfg: dict):
    return (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(nbytes, cfg["BLOCK_C"]))


# --------------------------------------------------------------------------- launchers


@_on_device_of
def pack_ternary(wq: torch.Tensor) -> torch.Tensor:
    """wq int8 [N, K] in {-1, 0, 1} -> w_packed uint8 [N, ceil(K/128)*32]."""
    n, k = wq.shape
    nbytes = packed_cols(k)
    out = torch.empty((n, nbytes), dtype=torch.uint8, device=wq.device)
    if out.numel():
        cfg = _bytes_config(n, nbytes, _interpreting())
        _pack_ternary_kernel[_bytes_grid(n, nbytes, cfg)](
            wq, out, n, k, nbytes, wq.stride(0), wq.stride(1), out.stride(0), **cfg
        )
    return out


@_on_device_of
def unpack_ternary(w_packed: torch.Tensor, k: int) -> torch.Tensor:
    """w_packed uint8 [N, ceil(K/128)*32] -> wq int8 [N, K] in {-1, 0, 1}."""
    n, nbytes = w_packed.shape
    out = torch.empty((n, k), dtype=torch.int8, device=w_packed.device)
    if out.numel():
        cfg = _bytes_config(n, nbytes, _interpreting())
        _unpack_ternary_kernel[_bytes_grid(n, nbytes, cfg)](
            w_packed, out, n, k, nbytes, w_packed.stride(0), w_packed.stride(1), out.stride(0), **cfg
        )
    return out


@_on_device_of
def quantize_weight_ternary(w: torch.Tensor, per_channel: bool = False):
    """w [N, K] float -> (w_packed uint8 [N, ceil(K/128)*32], w_scale fp32 [1] or [N])."""
    # mean|W| is summed in fp64 (torch reduction) so every backend gets the same fp32 scale;
    # the elementwise quantization and the packing are one kernel.
    scale = ternary_scale(w, per_channel)
    n, k = w.shape
    nbytes = packed_cols(k)
    out = torch.empty((n, nbytes), dtype=torch.uint8, device=w.device)
    if out.numel():
        cfg = _bytes_config(n, nbytes, _interpreting())
        _quantize_pack_ternary_kernel[_bytes_grid(n, nbytes, cfg)](
            w, scale, out, n, k, nbytes, w.stride(0), w.stride(1), 1 if per_channel else 0, out.stride(0), **cfg
        )
    return out, scale


@_on_device_of
def ternary_matmul(x, w_packed, w_scale, bias=None):
    """y = ternary(W) @ int8(x) with exact int32 sums, dequantized: x [..., K] -> y [..., N] in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    n, m = w_packed.shape[0], lead.numel()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        # With K == 0 the GEMM's K loop is empty and its epilogue gives 0 * scales + bias,
        # the reference's formula.
        x_q, x_scale = _quantize_rows(x.reshape(m, k))
        nblocks = w_packed.shape[1] // BLOCK_BYTES
        cfg = tuned_config("ternary") or _matmul_config(m, n, nblocks, _interpreting())
        w_scale1 = w_scale.reshape(-1)
        has_bias = bias is not None
        _ternary_matmul_kernel[_matmul_grid(m, n, cfg)](
            x_q,
            w_packed,
            x_scale,
            w_scale1,
            bias.contiguous() if has_bias else w_scale1,
            y,
            m,
            n,
            k,
            nblocks,
            x_q.stride(0),
            x_q.stride(1),
            w_packed.stride(0),
            w_packed.stride(1),
            x_scale.stride(0),
            # A single per-tensor scale is read through stride 0 by every column.
            0 if w_scale1.numel() == 1 else w_scale1.stride(0),
            y.stride(0),
            y.stride(1),
            HAS_BIAS=has_bias,
            **cfg,
        )
    return y.reshape(*lead, n)
