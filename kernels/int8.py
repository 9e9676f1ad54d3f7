"""Triton kernels for the INT8 family; accelops/reference/int8.py is the spec they match.

Launchers (same signatures and results as the reference):
    quantize_activation_int8(x), quantize_weight_int8(w),
    int8_matmul(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.float32),
    int8_linear(x, w_q, w_scale, bias=None)

Bit-exactness with the reference rests on three choices made in the kernels:
  * divisions are IEEE round-to-nearest (`tl.fdiv(..., ieee_rounding=True)`): Triton's plain
    `/` on fp32 lowers to an approximate (2 ulp) division on NVIDIA GPUs;
  * round-half-to-even is done with the 1.5 * 2**23 trick, because libdevice `rint` does not
    exist under TRITON_INTERPRET; the value is clamped *before* the trick, which keeps it in
    the trick's valid range and also puts a min/max between the multiply and the add, so the
    GPU compiler cannot contract them into an FMA (that would round once instead of twice and
    differ from the reference on rare ties);
  * int8 x int8 products are summed by `tl.dot` into an int32 accumulator, which is exact
    (|sum| <= 128 * 128 * K fits int32 for K < 131072).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading

import torch
import triton
import triton.language as tl

from ..reference.int8 import EPS, QMAX

# 1.5 * 2**23: for |v| < 2**22, v + MAGIC lands in [2**23, 2**24) where the fp32 ulp is 1, so
# the FPU's round-to-nearest-even does the rounding; subtracting MAGIC back is exact.
_RNE_MAGIC = tl.constexpr(12582912.0)
# Globals read inside @triton.jit functions must be constexpr.
_EPS = tl.constexpr(EPS)
_QMAX = tl.constexpr(QMAX)
_INF = tl.constexpr(float("inf"))
_NAN = tl.constexpr(float("nan"))


def _interpreting() -> bool:
    # Read at launch, not import: the block-size heuristics differ (see _matmul_config).
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _dequant_store(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    xs_ptr,
    stride_xs,
    ws_ptr,
    stride_ws,
    bias_ptr,
    y_ptr,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
):
    # The reference epilogue, in its order: (acc * x_scale) * w_scale + bias, all fp32, one cast.
    m_ok = offs_m < M
    n_ok = offs_n < N
    xs = tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xs, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + offs_n * stride_ws, mask=n_ok, other=0.0)
    y = (acc.to(tl.float32) * xs[:, None]) * ws[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    # On GPUs the cast rounds to nearest even like torch's; the interpreter truncates fp32 to
    # bf16 (at most 1 bf16 ulp off the reference, inside the tests' float tolerance).
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-tiles sweep the N tiles together, so a weight tile is
    # reused from L2 by GROUP_M programs before it is evicted.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


# --------------------------------------------------------------------------- kernels


@triton.jit
def _quantize_rows_int8_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    stride_qk,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """Per-row absmax int8 quantization of BLOCK_M rows. A row that fits one chunk
    (ONE_CHUNK: K <= BLOCK_K) is read once and kept in registers; a longer one is read twice,
    for its absmax and then to round it."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows64[:, None] * stride_xm
    q_rows = q_ptr + rows64[:, None] * stride_qm

    # NaN and +-Inf are folded to +Inf before the max (`ax < inf` is false exactly for them),
    # so one reduction yields both the absmax and whether the row is poisoned; a plain GPU
    # max would silently drop NaNs.
    if ONE_CHUNK:
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        amax = tl.max(tl.where(ax < _INF, ax, _INF), axis=1)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            mask = row_ok[:, None] & (kk < K)[None, :]
            ax = tl.abs(tl.load(x_rows + kk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32))
            amax = tl.maximum(amax, tl.max(tl.where(ax < _INF, ax, _INF), axis=1))

    bad = amax == _INF
    a = tl.maximum(amax, _EPS)
    qmax = tl.full([BLOCK_M], _QMAX, tl.float32)
    # A poisoned row's q is zeroed below; its multiplier is 1, not 127 / inf = 0, so that no
    # Inf * 0 is evaluated (numpy warns about it under the interpreter).
    inv = tl.where(bad, 1.0, tl.fdiv(qmax, a, ieee_rounding=True))
    scale = tl.where(bad, _NAN, tl.fdiv(a, qmax, ieee_rounding=True))
    tl.store(scale_ptr + rows64, scale, mask=row_ok)

    # The round-half-even trick is written out, not a @jit helper: every nested @jit call
    # re-patches triton.language under the interpreter, which costs milliseconds.
    if ONE_CHUNK:
        v = tl.clamp(x * inv[:, None], -_QMAX, _QMAX)
        q = tl.where(bad[:, None], 0.0, (v + _RNE_MAGIC) - _RNE_MAGIC)
        tl.store(q_rows + cols[None, :] * stride_qk, q.to(tl.int8), mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            mask = row_ok[:, None] & (kk < K)[None, :]
            x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            v = tl.clamp(x * inv[:, None], -_QMAX, _QMAX)
            q = tl.where(bad[:, None], 0.0, (v + _RNE_MAGIC) - _RNE_MAGIC)
            tl.store(q_rows + kk[None, :] * stride_qk, q.to(tl.int8), mask=mask)


@triton.jit
def _int8_matmul_kernel(
    a_ptr,
    b_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_xs,
    stride_ws,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, N] = dequant(a[M, K] @ b[N, K]^T): int8 tensor-core dot into int32, scales and
    bias applied in the epilogue while the tile is still in registers."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    # b is read as a [BLOCK_K, BLOCK_N] tile straight from the row-major [N, K] weight.
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    _dequant_store(
        acc, offs_m, offs_n, M, N, xs_ptr, stride_xs, ws_ptr, stride_ws, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS
    )


# --------------------------------------------------------------------------- configs


def _quantize_config(m: int, k: int, interpret: bool) -> dict:
    """Rows per program and K chunk for the row quantizer.

    GPU: rows up to K = 4096 are one chunk, read once and held in registers; about 4096
    elements per program (16 fp32 registers a thread at 8 warps). Untuned (no GPU to measure
    on): a real one would sweep the element budget and num_warps per K, and try one warp per
    row for K <= 1024.
    Interpreter: every program costs milliseconds of Python however small, so the tiles hold
    up to 128K elements (K chunks of at most 1024 keep padding waste on odd K low).
    """
    if interpret:
        block_k = _pow2(k, 16, 1024)
        block_m = _pow2(m, 1, (1 << 17) // block_k)
    else:
        block_k = _pow2(k, 16, 4096)
        block_m = _pow2(m, 1, max(1, 4096 // block_k))
    num_warps = 8 if block_m * block_k >= 4096 else 4
    return {"BLOCK_M": block_m, "BLOCK_K": block_k, "ONE_CHUNK": k <= block_k, "num_warps": num_warps}


def _matmul_config(m: int, n: int, k: int, interpret: bool) -> dict:
    """GEMM tile sizes by M (tl.dot wants every tile dim >= 16).

    GPU (untuned: no GPU was available to measure; a real one should sweep these, plus
    num_stages 2-5 and split-K for M <= 16, where too few N tiles fill the SMs):
      M <= 16   decode: weight-bandwidth bound, narrow M tile, long K steps;
      M <= 64   64 x 128 tiles;
      larger    128 x 128 x 128 tiles, 8 warps (int8 A+B stage = 32 KiB of shared memory).
    Interpreter: tiles as large as the problem (capped), so few Python-level iterations.
    """
    if interpret:
        return {
            "BLOCK_M": _pow2(m, 16, 128),
            "BLOCK_N": _pow2(n, 16, 128),
            "BLOCK_K": _pow2(k, 32, 1024),
            "GROUP_M": 8,
            "num_warps": 4,
            "num_stages": 1,
        }
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


# --------------------------------------------------------------------------- tuned configs
#
# `accelops tune --device cuda` times the GEMM kernels with each configuration of
# matmul_config_grid() and the dispatch table sets the winner around one call with
# matmul_config(): a per-thread override of _matmul_config read by the launcher (the
# result does not depend on it: integer sums, the same epilogue).

_tuned = threading.local()
# key -> allowed values, per kernel (tl.dot wants tile dims >= 16; the int8 MMA k is 32)
CONFIG_KEYS = {
    "int8": {
        "BLOCK_M": {16, 32, 64, 128, 256},
        "BLOCK_N": {16, 32, 64, 128, 256},
        "BLOCK_K": {32, 64, 128, 256, 512, 1024},
        "GROUP_M": {1, 2, 4, 8, 16},
        "num_warps": {1, 2, 4, 8, 16},
        "num_stages": {1, 2, 3, 4, 5, 6},
    },
    "ternary": {
        "BLOCK_M": {16, 32, 64, 128, 256},
        "BLOCK_N": {16, 32, 64, 128, 256},
        "BLOCKS_PER_STEP": {1, 2, 4, 8, 16},
        "GROUP_M": {1, 2, 4, 8, 16},
        "num_warps": {1, 2, 4, 8, 16},
        "num_stages": {1, 2, 3, 4, 5, 6},
    },
}


def check_matmul_config(kind: str, cfg: dict) -> dict:
    """cfg with every key of CONFIG_KEYS[kind] at an allowed value, else ValueError."""
    keys = CONFIG_KEYS[kind]
    if not isinstance(cfg, dict) or set(cfg) != set(keys):
        raise ValueError(
            f"a {kind} GEMM config must have exactly the keys {sorted(keys)}, got "
            f"{sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}"
        )
    for key, allowed in keys.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            raise ValueError(f"{kind} GEMM config: {key} must be one of {sorted(allowed)}, got {value!r}")
    return dict(cfg)


@contextlib.contextmanager
def matmul_config(kind: str, cfg: dict | None):
    """Within the block, the `kind` ("int8" | "ternary") GEMM launches of this thread use cfg
    (None: the built-in choice)."""
    cfg = None if cfg is None else check_matmul_config(kind, cfg)
    previous = getattr(_tuned, kind, None)
    setattr(_tuned, kind, cfg)
    try:
        yield
    finally:
        setattr(_tuned, kind, previous)


def tuned_config(kind: str) -> dict | None:
    return getattr(_tuned, kind, None)


def matmul_config_grid(kind: str, m: int) -> list[dict]:
    """GPU configurations `accelops tune` tries for a GEMM with M rows, around the built-in
    choice of each M class: decode (M <= 16; weight-bandwidth bound: N tile, K per step,
    pipeline depth), mid (M <= 64) and large M (tile shape, warps)."""
    k_key, k_values = (
        ("BLOCK_K", {"small": (128, 256, 512), "mid": (64, 128), "large": (64, 128)})
        if kind == "int8"
        else ("BLOCKS_PER_STEP", {"small": (1, 2, 4), "mid": (1, 2), "large": (1, 2)})
    )
    if m <= 16:
        space = dict(
            BLOCK_M=(16,), BLOCK_N=(32, 64, 128), K=k_values["small"], GROUP_M=(1,), num_warps=(4,), num_stages=(3, 4)
        )
    elif m <= 64:
        space = dict(
            BLOCK_M=(32, 64), BLOCK_N=(64, 128), K=k_values["mid"], GROUP_M=(8,), num_warps=(4,), num_stages=(3, 4)
        )
    else:
        space = dict(
            BLOCK_M=(64, 128), BLOCK_N=(128, 256), K=k_values["large"], GROUP_M=(8,), num_warps=(4, 8), num_stages=(3,)
        )
    names = list(space)
    grid = []
    for values in itertools.product(*space.values()):
        cfg = dict(zip(names, values))
        cfg[k_key] = cfg.pop("K")
        grid.append(check_matmul_config(kind, cfg))
    return grid


def _matmul_grid(m: int, n: int, cfg: dict):
    return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)


# --------------------------------------------------------------------------- launchers


def _on_device_of(fn):
    """Launch on the device of the first tensor argument: Triton launches on the current
    CUDA device, which need not be the tensors' one."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return wrapper


def _quantize_rows(x2: torch.Tensor):
    """x2 [M, K] (any strides) -> (q int8 [M, K] contiguous, scale fp32 [M])."""
    m, k = x2.shape
    if k == 0:
        # The reference's empty-row scale is EPS / QMAX evaluated in Python (fp64) and then
        # cast; the kernel would divide in fp32 and could differ in the last bit.
        return (
            torch.zeros((m, 0), dtype=torch.int8, device=x2.device),
            torch.full((m,), EPS / QMAX, dtype=torch.float32, device=x2.device),
        )
    q = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m:
        cfg = _quantize_config(m, k, _interpreting())
        grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
        _quantize_rows_int8_kernel[grid](
            x2, q, scale, m, k, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1), **cfg
        )
    return q, scale


@_on_device_of
def quantize_activation_int8(x: torch.Tensor):
    """Per-token absmax -> (x_q int8 [..., K], x_scale fp32 [..., 1])."""
    lead, k = x.shape[:-1], x.shape[-1]
    q, scale = _quantize_rows(x.reshape(lead.numel(), k))  # not (-1, k): ambiguous when K == 0
    return q.reshape(x.shape), scale.reshape(*lead, 1)


@_on_device_of
def quantize_weight_int8(w: torch.Tensor):
    """Per output channel (row) symmetric -> (w_q int8 [N, K], w_scale fp32 [N])."""
    return _quantize_rows(w)


def _launch_matmul(x_q2, x_scale1, w_q, w_scale1, bias, y2):
    m, k = x_q2.shape
    n = w_q.shape[0]
    cfg = tuned_config("int8") or _matmul_config(m, n, k, _interpreting())
    has_bias = bias is not None
    _int8_matmul_kernel[_matmul_grid(m, n, cfg)](
        x_q2,
        w_q,
        x_scale1,
        w_scale1,
        bias.contiguous() if has_bias else w_scale1,
        y2,
        m,
        n,
        k,
        x_q2.stride(0),
        x_q2.stride(1),
        w_q.stride(0),
        w_q.stride(1),
        x_scale1.stride(0),
        w_scale1.stride(0),
        y2.stride(0),
        y2.stride(1),
        HAS_BIAS=has_bias,
        **cfg,
    )


@_on_device_of
def int8_matmul(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.float32):
    """W8A8: x_q [..., K] int8 with x_scale [..., 1], w_q [N, K] int8 with w_scale [N]."""
    if out_dtype is None:  # the op schema's `ScalarType? out_dtype=None`
        out_dtype = torch.float32
    lead, k = x_q.shape[:-1], x_q.shape[-1]
    n, m = w_q.shape[0], lead.numel()
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m and n:
        # K == 0 still runs the kernel: its K loop is empty and the epilogue gives
        # 0 * x_scale * w_scale + bias (NaN where a scale is NaN), the reference's formula.
        _launch_matmul(x_q.reshape(m, k), x_scale.reshape(-1), w_q, w_scale.reshape(-1), bias, y)
    return y.reshape(*lead, n)


@_on_device_of
def int8_linear(x, w_q, w_scale, bias=None):
    """Dynamic per-token activation quantization + int8_matmul; y in x's dtype."""
    x_q, x_scale = quantize_activation_int8(x)
    return int8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype)
