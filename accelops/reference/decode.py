"""Reference of accelops::ternary_decode_layer: one decode step (one new token a row) of a
pre-norm transformer block whose seven projections are packed ternary weights, the block of
BitNet b1.58 2B4T and of Llama-shaped ternary models (TransformerLM with rmsnorm, rope and a
relu2 or swiglu FFN). It computes what TransformerBlock.forward computes for that step, op
for op, with the projections through ternary_matmul's reference:

    h = rms_norm(x, norm1); q, k, v = h Wq, h Wk, h Wv      (int8 activations, ternary weights)
    q, k = rope(q), rope(k) at each row's position; k, v -> k_cache / v_cache at that slot
    a = softmax(q k^T / sqrt(head_dim)) v over the row's slots 0 .. position (GQA: n_heads /
        n_kv_heads query heads share a key/value head)
    x = x + o_proj(rms_norm(a, attn_sub_norm))                (sub-norms: when given)
    h = rms_norm(x, norm2); a = act(h Wgate) * (h Wup)        (relu2: relu(g)^2; swiglu: silu(g))
    x = x + down_proj(rms_norm(a, ffn_sub_norm))

The C++ kernel computes every projection exactly as this reference does (same int32 sums,
same epilogue); its norms, RoPE and softmax are fp32 with other reduction orders, so it
matches this to float rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ternary import packed_cols, ternary_matmul
from .ternary_base3 import base3_cols, ternary_matmul_base3

ACTIVATIONS = ("relu2", "swiglu")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("norm1", "attn_sub_norm", "norm2", "ffn_sub_norm")
# The packed formats the step reads: format -> (bytes a row for K, ternary_matmul of it, layout)
FORMATS = {
    "i2": (packed_cols, ternary_matmul, "ceil(K/128)*32"),
    "base3": (base3_cols, ternary_matmul_base3, "ceil(K/320)*64"),
}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def check_in_features(x, w_packed, in_features, format="i2") -> None:
    """in_features: the K each of the seven weights was packed for (q, k, v, o, gate, up,
    down). The block gives each projection's input width: x's dim for q .. up, up_proj's N
    (the FFN width) for down. The i2 layout pads K to a multiple of 128, so a weight packed
    for a larger K within the same 128-block has the shape of one packed for the block's K
    and would be read as if zero-padded: a silently wrong result. Hence this check, which
    reads shapes only (the fake kernel runs it too). ValueError naming the projection and
    both values. format: the weights' packed layout ("i2" or "base3", which pads K to 320)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {tuple(FORMATS)}, got {format!r}")
    cols_of, _, layout = FORMATS[format]
    if not isinstance(in_features, (list, tuple)) or len(in_features) != len(PROJECTIONS):
        got = f"{len(in_features)} entries" if isinstance(in_features, (list, tuple)) else repr(in_features)
        raise ValueError(f"in_features must be a list of 7 ints ({', '.join(PROJECTIONS)}), got {got}")
    dim, hidden = x.shape[-1], w_packed[5].shape[0]
    for i, k in enumerate(in_features):
        name = PROJECTIONS[i]
        if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)) or k < 1:
            raise ValueError(f"in_features[{i}] ({name}) must be a positive int, got {k!r}")
        implied, source = (hidden, "up_proj's N, the FFN width") if i == 6 else (dim, "x's dim")
        if k != implied:
            raise ValueError(
                f"in_features[{i}] ({name}) = {k} does not match its input's K={implied} ({source}): "
                f"w_packed[{i}] was packed for another K"
            )
        if w_packed[i].shape[-1] != cols_of(k):
            raise ValueError(
                f"w_packed[{i}] ({name}) must have {cols_of(k)} columns ({layout} bytes in format {format!r}) "
                f"for in_features[{i}]={k}, got shape {tuple(w_packed[i].shape)}"
            )


def ternary_decode_layer(
    x, positions, cos, sin, k_cache, v_cache, norms, w_packed, w_scale, bias, in_features, n_heads, eps, activation,
    format="i2",
):  # fmt: skip
    """x [batch, dim] fp32 (each row's newest token) -> the block's output [batch, dim];
    writes the rows' keys and values into k_cache / v_cache [batch, n_kv_heads, size, head_dim]
    at positions [batch]. cos / sin [batch, head_dim]: the rotary angles of the positions.
    norms: the weights of (norm1, attn_sub_norm, norm2, ffn_sub_norm), None for an absent
    sub-norm; w_packed / w_scale / bias: q, k, v, o, gate, up, down; in_features: the K each
    of them was packed for, which must equal its input's width (check_in_features); format:
    the layout of all seven ("i2" or "base3"; the same result either way)."""
    check_in_features(x, w_packed, in_features, format)
    matmul = FORMATS[format][1]
    batch, dim = x.shape
    kv_heads, size, hd = k_cache.shape[1:]

    def norm(h, i):
        w = norms[i]
        return h if w is None else F.rms_norm(h, (h.shape[-1],), w, eps)

    def proj(h, i):
        return matmul(h, w_packed[i], w_scale[i], bias[i])

    h = norm(x, 0)
    c, s = cos[:, None], sin[:, None]
    q = _rotate(proj(h, 0).view(batch, n_heads, hd), c, s)
    k = _rotate(proj(h, 1).view(batch, kv_heads, hd), c, s)
    v = proj(h, 2).view(batch, kv_heads, hd)
    rows = torch.arange(batch, device=x.device)
    k_cache[rows, :, positions] = k
    v_cache[rows, :, positions] = v
    may_attend = torch.arange(size, device=x.device)[None] <= positions[:, None]  # [batch, size]
    a = F.scaled_dot_product_attention(
        q[:, :, None], k_cache, v_cache, attn_mask=may_attend[:, None, None], enable_gqa=kv_heads != n_heads
    )
    x = x + proj(norm(a.reshape(batch, dim), 1), 3)
    h = norm(x, 2)
    g, u = proj(h, 4), proj(h, 5)
    a = torch.square(F.relu(g)) * u if activation == "relu2" else F.silu(g) * u
    return x + proj(norm(a, 3), 6)
