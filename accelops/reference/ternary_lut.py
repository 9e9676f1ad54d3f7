"""Pure-PyTorch reference for the lookup-table ternary format "lut3": the specification.

Same weights (Wq in {-1, 0, 1}, codes c = Wq + 1) and the same matmul result as the 2-bit
format of reference/ternary.py, in a layout made for table lookups (T-MAC / TL2 idea):

* Groups of 3 weights along K; a group's codes make one index c0 + 3 c1 + 9 c2 in [0, 27)
  (5 bits). Three groups (9 weights, k = 9 t .. 9 t + 8) share one 16-bit word t, group g
  in bits [5 g, 5 g + 5); bit 15 is 0.
* Words in blocks of 32 rows: `w_lut` int16 [ceil(N / 32), ceil(K / 9), 32], element
  [b, t, r] the word t of row 32 b + r. Padding (rows >= N, weights >= K) holds zero
  weights (index 13 = 1 + 3 + 9).

16 bits for 9 weights: 1.78 bits a weight. Why this shape: one 64-byte load gives word t of
32 rows, and per activation row a table of the 27 sums of each group's activations turns
each 5-bit field into its group's dot product with one lookup (vpermw on AVX-512: 32 int16
entries by the low 5 bits of each 16-bit lane, so no field needs masking).

The format holds N only rounded up to 32 and K rounded up to 9: ternary_matmul_lut takes
`n`, and x gives K.
"""

import torch

from .int8 import dequantize_epilogue, int_dot, quantize_activation_int8

ROWS = 32  # rows a block
WORD_K = 9  # weights a 16-bit word
ZERO_INDEX = 13  # index of three zero weights


def lut_shape(n: int, k: int) -> tuple[int, int, int]:
    """Shape of w_lut for N rows of K weights."""
    return ((n + ROWS - 1) // ROWS, (k + WORD_K - 1) // WORD_K, ROWS)


def pack_ternary_lut(wq: torch.Tensor) -> torch.Tensor:
    """Wq int8 [N, K] in {-1, 0, 1} -> w_lut int16 [ceil(N/32), ceil(K/9), 32]."""
    n, k = wq.shape
    nb, words, _ = lut_shape(n, k)
    codes = torch.ones((nb * ROWS, words * WORD_K), dtype=torch.int32, device=wq.device)
    codes[:n, :k] = wq.to(torch.int32) + 1
    c = codes.reshape(nb * ROWS, words, 3, 3)  # [row, word, group, digit]
    idx = c[..., 0] + 3 * c[..., 1] + 9 * c[..., 2]  # [row, word, group]
    word = idx[..., 0] | (idx[..., 1] << 5) | (idx[..., 2] << 10)  # < 2^15: fits int16
    return word.to(torch.int16).reshape(nb, ROWS, words).transpose(1, 2).contiguous()


def unpack_ternary_lut(w_lut: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """w_lut int16 [ceil(N/32), ceil(K/9), 32] -> Wq int8 [N, K] in {-1, 0, 1}."""
    nb, words, _ = w_lut.shape
    word = w_lut.to(torch.int32).transpose(1, 2).reshape(nb * ROWS, words, 1)
    idx = (word >> torch.tensor([0, 5, 10], dtype=torch.int32, device=w_lut.device)) & 31  # [row, word, group]
    digits = torch.stack([idx % 3, idx // 3 % 3, idx // 9], dim=-1)  # [row, word, group, digit]
    return (digits.reshape(nb * ROWS, words * WORD_K)[:n, :k] - 1).to(torch.int8)


def ternary_matmul_lut(x, w_lut, w_scale, n, bias=None):
    """The same result as reference.ternary.ternary_matmul on the same weights."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    wq = unpack_ternary_lut(w_lut, n, k)
    x_q, x_scale = quantize_activation_int8(x.reshape(lead.numel(), k))
    acc = int_dot(x_q, wq)
    w_scale = w_scale.reshape(-1).expand(n) if w_scale.numel() == 1 else w_scale
    y = dequantize_epilogue(acc, x_scale.reshape(-1), w_scale, bias, x.dtype)
    return y.reshape(*lead, n)
