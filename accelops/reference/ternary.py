"""Pure-PyTorch reference for the ternary (BitNet b1.58) family: the specification.

Weights: absmean quantization, scale = mean|W| (per tensor or per output row, summed in
fp64 so every backend gets the same fp32 scale), Wq = clamp(round(W / max(scale, EPS)), -1, 1).

Packed layout (`w_packed`, uint8 [N, ceil(K / 128) * 32]): K is cut into blocks of 128;
block b owns bytes [32 b, 32 b + 32). Weight k = 128 b + 32 j + i lives in byte 32 b + i at
bits [2 j, 2 j + 2), as the code Wq + 1 in {0, 1, 2}. Padding weights hold code 1 (zero).
Why this shape: one 32-byte load gives 128 weights, and four shift-and-mask steps turn it
into four 32-lane vectors of codes that line up with four consecutive 32-byte slices of
the activations, which is what an AVX2 / 256-bit SIMD dot wants; a GPU thread decodes a
byte with the same shifts.

The shape gives K only rounded up to 128: a weight packed for K = 128 has the columns of
one packed for K = 100. The reference reads as many weights as x has (x is the K), so
ops.ternary_matmul takes `k=` (the K it was packed for) to check x against, and without it
refuses an x whose K leaves non-zero codes in the padding of the last block.

Matmul: y = (sum_k x_q[k] * Wq[k]) * x_scale * w_scale + bias, with x_q the per-token int8
quantization of x (see reference/int8.py) and exact int32 accumulation.
"""

import torch

from .int8 import dequantize_epilogue, int_dot, quantize_activation_int8

EPS = 1e-5
BLOCK_K = 128  # weights per packed block
BLOCK_BYTES = 32  # bytes per packed block (4 weights a byte)


def packed_cols(k: int) -> int:
    """Bytes per row of w_packed for K weights."""
    return (k + BLOCK_K - 1) // BLOCK_K * BLOCK_BYTES


def ternary_scale(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    a = w.detach().abs().double()
    # sum / count rather than mean(): an empty weight (K = 0) gets scale 0, not NaN.
    s = a.sum(dim=1) / max(w.shape[1], 1) if per_channel else (a.sum() / max(w.numel(), 1)).reshape(1)
    return s.float()


def quantize_weight_ternary_values(w: torch.Tensor, per_channel: bool = False):
    """-> (Wq int8 [N, K] in {-1, 0, 1}, scale fp32 [1] or [N])."""
    scale = ternary_scale(w, per_channel)
    denom = scale.clamp_min(EPS).reshape(-1, 1)
    wq = torch.round(w.float() / denom).clamp_(-1, 1).to(torch.int8)
    return wq, scale


def pack_ternary(wq: torch.Tensor) -> torch.Tensor:
    n, k = wq.shape
    nblocks = (k + BLOCK_K - 1) // BLOCK_K
    codes = torch.ones((n, nblocks * BLOCK_K), dtype=torch.uint8, device=wq.device)
    codes[:, :k] = (wq.to(torch.int16) + 1).to(torch.uint8)
    codes = codes.reshape(n, nblocks, 4, BLOCK_BYTES)  # [n, block, j, i]
    packed = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    return packed.reshape(n, nblocks * BLOCK_BYTES)


def unpack_ternary(w_packed: torch.Tensor, k: int) -> torch.Tensor:
    n = w_packed.shape[0]
    nblocks = w_packed.shape[1] // BLOCK_BYTES
    p = w_packed.reshape(n, nblocks, 1, BLOCK_BYTES)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=w_packed.device).reshape(1, 1, 4, 1)
    codes = (p >> shifts) & 3
    return codes.reshape(n, nblocks * BLOCK_K)[:, :k].to(torch.int8) - 1


def quantize_weight_ternary(w: torch.Tensor, per_channel: bool = False):
    wq, scale = quantize_weight_ternary_values(w, per_channel)
    return pack_ternary(wq), scale


def ternary_matmul(x, w_packed, w_scale, bias=None):
    k = x.shape[-1]
    lead = x.shape[:-1]
    wq = unpack_ternary(w_packed, k)
    x_q, x_scale = quantize_activation_int8(x.reshape(lead.numel(), k))
    acc = int_dot(x_q, wq)
    w_scale = w_scale.reshape(-1).expand(wq.shape[0]) if w_scale.numel() == 1 else w_scale
    y = dequantize_epilogue(acc, x_scale.reshape(-1), w_scale, bias, x.dtype)
    return y.reshape(*lead, wq.shape[0])
