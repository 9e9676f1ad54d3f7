"""ternary_decode_layer: one decode step of a ternary transformer block in one call (the C++
kernel on CPU: csrc/cpu/decode.cpp; the spec: accelops/reference/decode.py). generate() runs
a converted TransformerLM's decode steps through it (accelops.models.generate), where the
eager step's ~40 small PyTorch ops a block cost as much as the block's seven GEMVs.

The op schema, default (reference) kernel and fake are registered at the bottom (_register).
"""

from __future__ import annotations

import torch

from ..reference import decode as ref
from . import _validate as check
from ._backend import choose
from ._library import define

__all__ = ["ternary_decode_layer", "ACTIVATIONS"]

ACTIVATIONS = ref.ACTIVATIONS


def _f32(name: str, value, shape: tuple) -> None:
    check.tensor(name, value)
    check.dtype(name, value, torch.float32)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check(
    x, positions, cos, sin, k_cache, v_cache, norms, w_packed, w_scale, bias, in_features, n_heads, eps, activation,
    format,
):  # fmt: skip
    check.tensor("x", x)
    check.dtype("x", x, torch.float32)
    check.ndim("x", x, 2, "[batch, dim]")
    batch, dim = x.shape
    check.tensor("k_cache", k_cache)
    check.ndim("k_cache", k_cache, 4, "[batch, n_kv_heads, size, head_dim]")
    kv_heads, size, hd = k_cache.shape[1:]
    _f32("k_cache", k_cache, (batch, kv_heads, size, hd))
    _f32("v_cache", v_cache, (batch, kv_heads, size, hd))
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    if n_heads * hd != dim or n_heads % kv_heads or hd % 2:
        raise ValueError(
            f"n_heads={n_heads} does not fit x's dim={dim} and the cache's n_kv_heads={kv_heads}, head_dim={hd} "
            "(need n_heads * head_dim == dim, n_heads a multiple of n_kv_heads, an even head_dim)"
        )
    if not isinstance(eps, float) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check.tensor("positions", positions)
    check.dtype("positions", positions, torch.int64)
    if tuple(positions.shape) != (batch,):
        raise ValueError(f"positions must have shape ({batch},), got {tuple(positions.shape)}")
    _f32("cos", cos, (batch, hd))
    _f32("sin", sin, (batch, hd))
    for name, seq, n in (("norms", norms, 4), ("w_packed", w_packed, 7), ("w_scale", w_scale, 7), ("bias", bias, 7)):
        if not isinstance(seq, (list, tuple)) or len(seq) != n:
            raise ValueError(f"{name} must be a list of {n} entries, got {type(seq).__name__} of {len(seq)}")
    hidden = w_packed[5].shape[0] if isinstance(w_packed[5], torch.Tensor) and w_packed[5].dim() == 2 else None
    if hidden is None:
        raise ValueError("w_packed[5] (up_proj) must be a 2-D uint8 tensor")
    # before the shape checks: a weight packed for another K in the same 128-block passes them
    for i, w in enumerate(w_packed):
        check.tensor(f"w_packed[{i}] ({ref.PROJECTIONS[i]})", w)
    ref.check_in_features(x, w_packed, in_features, format)
    cols_of, _, layout = ref.FORMATS[format]
    for i, width in enumerate((dim, dim, dim, hidden)):
        if norms[i] is not None or i in (0, 2):  # the sub-norms (1, 3) may be absent
            _f32(f"norms[{i}] ({ref.NORMS[i]})", norms[i], (width,))
    kv = kv_heads * hd
    shapes = ((dim, dim), (kv, dim), (kv, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden))
    for i, (n, k) in enumerate(shapes):
        name = f"w_packed[{i}] ({ref.PROJECTIONS[i]})"
        check.tensor(name, w_packed[i])
        check.dtype(name, w_packed[i], torch.uint8)
        if tuple(w_packed[i].shape) != (n, cols_of(k)) or not w_packed[i].is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous [{n}, {cols_of(k)}] tensor (N={n}, K={k}, {layout} bytes a row "
                f"in format {format!r}), got {tuple(w_packed[i].shape)}"
            )
        name = f"w_scale[{i}] ({ref.PROJECTIONS[i]})"
        check.tensor(name, w_scale[i])
        check.dtype(name, w_scale[i], torch.float32)
        if w_scale[i].numel() not in (1, n) or not w_scale[i].is_contiguous():
            raise ValueError(f"{name} must hold 1 or N={n} contiguous scales, got shape {tuple(w_scale[i].shape)}")
        if bias[i] is not None:
            _f32(f"bias[{i}] ({ref.PROJECTIONS[i]})", bias[i], (n,))
    tensors = {"x": x, "positions": positions, "cos": cos, "sin": sin, "k_cache": k_cache, "v_cache": v_cache}
    tensors.update({f"w_packed[{i}]": w for i, w in enumerate(w_packed)})
    device = check.same_device(**tensors)
    if (positions < 0).any() or (positions >= size).any():
        raise ValueError(f"positions must lie in [0, {size}) (the cache's slots), got {positions.tolist()}")
    return device


def ternary_decode_layer(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    norms,
    w_packed,
    w_scale,
    bias,
    *,
    in_features,
    n_heads: int,
    eps: float,
    activation: str,
    format: str = "i2",
    validate: bool = True,
) -> torch.Tensor:
    """One decode step of a ternary transformer block (accelops/reference/decode.py is the
    spec): x [batch, dim] fp32, each row's newest token -> the block's output [batch, dim];
    each row's key and value are written into k_cache / v_cache [batch, n_kv_heads, size,
    head_dim] at its slot positions[b], and the row attends over its slots 0 .. positions[b].
    cos / sin [batch, head_dim]: the rotary angles at those positions. norms: the weights of
    (norm1, attn_sub_norm, norm2, ffn_sub_norm), RMSNorm with eps; a sub-norm may be None.
    w_packed / w_scale / bias: the packed ternary projections q, k, v, o, gate, up, down (as
    TernaryLinear holds them; a bias may be None). in_features: the 7 K's (in_features) the
    weights were packed for, in that order (TernaryLinear.in_features); each must equal its
    input's width: x's dim for q .. up, up_proj's N (the FFN width) for down. The packed
    layout pads K to a multiple of 128, so without them a weight packed for a larger K in
    the same 128-block would be read as if zero-padded (ValueError naming the projection and
    both K's). activation: "relu2" or "swiglu". format: the packed layout of all seven
    weights, "i2" (2 bits a weight, TernaryLinear's w_packed) or "base3" (5 weights a byte,
    its w_b3); the same result either way.

    validate=False skips the Python-side checks (the C++ kernel still checks shapes, dtypes,
    in_features and that positions lie in the cache): for a caller that has checked once and
    calls per token, as generate() does."""
    args = (x, positions, cos, sin, k_cache, v_cache, list(norms), list(w_packed), list(w_scale), list(bias))
    args += (list(in_features) if isinstance(in_features, (list, tuple)) else in_features,)
    if validate:
        device = _check(*args, n_heads, eps, activation, format)
    else:
        device = x.device
    if choose("ternary_decode_layer", device) == "native":
        return torch.ops.accelops.ternary_decode_layer(*args, n_heads, eps, activation, format)
    return ref.ternary_decode_layer(*args, n_heads, eps, activation, format)


# --------------------------------------------------------------------------- registration


def _register() -> None:
    define(
        "ternary_decode_layer(Tensor x, Tensor positions, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor?[] norms, Tensor[] w_packed, Tensor[] w_scale, Tensor?[] bias, int[] in_features, "
        'int n_heads, float eps, str activation, str format="i2") -> Tensor',
        ref.ternary_decode_layer,
    )

    @torch.library.register_fake("accelops::ternary_decode_layer")
    def _(
        x, positions, cos, sin, k_cache, v_cache, norms, w_packed, w_scale, bias, in_features, n_heads, eps, activation,
        format="i2",
    ):  # fmt: skip
        ref.check_in_features(x, w_packed, in_features, format)  # shapes only, as the kernels check it
        return x.new_empty(x.shape)


_register()
