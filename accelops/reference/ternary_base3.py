"""Pure-PyTorch reference for the dense ternary format "base3": the specification.

Same weights (Wq in {-1, 0, 1}, digits d = Wq + 1 in {0, 1, 2}) and the same matmul result
as the 2-bit format of reference/ternary.py, five weights a byte (3^5 = 243 <= 256): 1.6 bits
a weight, 20% fewer bytes than the 2-bit format. Made for the memory-bound M = 1 GEMV.

Layout, per output row (no padding of N):

* K is padded to a multiple of 320; `w_b3` uint8 [N, ceil(K / 320) * 64], 64 bytes a block
  of 320 weights.
* Byte j (0..63) of block b holds the five weights k = 320 b + 64 i + j, i = 0..4, as
  byte = d_0 + 3 d_1 + 9 d_2 + 27 d_3 + 81 d_4 (0..242; plain base 3, digit i of weight
  64 i + j). So digit i of a block's 64 bytes is the weight vector of the 64 contiguous
  activations [320 b + 64 i, 320 b + 64 i + 64): one u8 x s8 dot instruction (vpdpbusd)
  each, with no activation shuffle.
* Padding weights (k >= K) are zeros (digit 1); activations past K count as zero.
* Decoding is digit i = (byte // 3^i) % 3 for every byte value. Bytes 243..255 are never
  written by the packing; the rule above (which the kernels' tables follow too) still gives
  them a meaning, so every byte string decodes the same way on every path.

The dot: sum_k d_k x_k - sum_k x_k, exact in int32, then the 2-bit format's epilogue.
The format holds K only rounded up to 320: ternary_matmul_base3 takes K from x (and checks
an optional k=).
"""

import torch

from .int8 import dequantize_epilogue, int_dot, quantize_activation_int8

BLOCK_K = 320  # weights a block
BLOCK_BYTES = 64  # bytes a block
DIGITS = 5  # weights a byte
ZERO_BYTE = 121  # five zero weights: 1 + 3 + 9 + 27 + 81


def base3_cols(k: int) -> int:
    """Bytes per row of w_b3 for K weights."""
    return (k + BLOCK_K - 1) // BLOCK_K * BLOCK_BYTES


def pack_ternary_base3(wq: torch.Tensor) -> torch.Tensor:
    """Wq int8 [N, K] in {-1, 0, 1} -> w_b3 uint8 [N, ceil(K/320)*64]."""
    n, k = wq.shape
    cols = base3_cols(k)
    blocks = cols // BLOCK_BYTES
    d = torch.ones((n, blocks * BLOCK_K), dtype=torch.int32, device=wq.device)
    d[:, :k] = wq.to(torch.int32) + 1
    d = d.reshape(n, blocks, DIGITS, BLOCK_BYTES)  # [row, block, digit i, byte j]
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=wq.device).reshape(1, 1, DIGITS, 1)
    return (d * powers).sum(2).to(torch.uint8).reshape(n, cols)


def digits(w_b3: torch.Tensor) -> torch.Tensor:
    """w_b3 uint8 [N, B*64] -> digits int32 [N, B*320] in {0, 1, 2}, in k order."""
    n, cols = w_b3.shape
    v = w_b3.to(torch.int32).reshape(n, cols // BLOCK_BYTES, 1, BLOCK_BYTES)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=w_b3.device).reshape(1, 1, DIGITS, 1)
    return (v // powers % 3).reshape(n, cols // BLOCK_BYTES * BLOCK_K)


def unpack_ternary_base3(w_b3: torch.Tensor, k: int) -> torch.Tensor:
    """w_b3 uint8 [N, ceil(K/320)*64] -> Wq int8 [N, K] in {-1, 0, 1}."""
    return (digits(w_b3)[:, :k] - 1).to(torch.int8)


def ternary_matmul_base3(x, w_b3, w_scale, bias=None):
    """The same result as reference.ternary.ternary_matmul on the same weights."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    n = w_b3.shape[0]
    wq = unpack_ternary_base3(w_b3, k)
    x_q, x_scale = quantize_activation_int8(x.reshape(lead.numel(), k))
    acc = int_dot(x_q, wq)
    w_scale = w_scale.reshape(-1).expand(n) if w_scale.numel() == 1 else w_scale
    y = dequantize_epilogue(acc, x_scale.reshape(-1), w_scale, bias, x.dtype)
    return y.reshape(*lead, n)
