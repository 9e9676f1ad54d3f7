"""The pieces of TransformerLM's newer architectures: norms, rotary position embeddings,
the unfused FFN (squared ReLU, BitNet's sub-layer norm) and the static key/value cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import ffn as ref_ffn

__all__ = ["make_norm", "rope_cos_sin", "apply_rope", "UnfusedFFN", "KVCache"]


def make_norm(kind: str, size: int, eps: float) -> nn.Module:
    """nn.LayerNorm or nn.RMSNorm (weight only, like transformers' LlamaRMSNorm / BitNetRMSNorm)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(size, eps=eps)
    return nn.LayerNorm(size, eps=eps)


# --------------------------------------------------------------------------- rotary embeddings


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(cos, sin) [*positions.shape, head_dim] for integer positions, computed as transformers'
    default RoPE does (fp32 inverse frequencies theta^(-2i/head_dim), angles duplicated over
    the two halves), so a Hugging Face Llama / BitNet checkpoint rotates the same way."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos / sin [seq, head_dim] or [batch, seq, head_dim].
    In x's dtype (under autocast q and k may be bf16 while the angles were made in fp32)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 3:  # per-row positions: broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


# --------------------------------------------------------------------------- FFN


class UnfusedFFN(nn.Module):
    """down_proj(sub_norm(act(gate_proj(x)) * up_proj(x))) in plain PyTorch, for what the fused
    FFN op (accelops.ops.fused_ffn: swiglu, geglu, gelu) cannot do: activation "relu2"
    (relu(g)^2 * u, BitNet b1.58's) and BitNet's ffn_sub_norm between the activation and
    down_proj. Same attribute names as transformers' BitNetMLP (gate_proj, up_proj,
    down_proj, ffn_sub_norm), so its weights load by name; the projections are whatever
    layers the caller gives (nn.Linear, BitLinear, Int8Linear, QATLinear, ...), and
    accelops.convert / to_int8 swap them like any other linear layer."""

    def __init__(
        self,
        gate_proj: nn.Module | None,
        up_proj: nn.Module,
        down_proj: nn.Module,
        activation: str,
        sub_norm: nn.Module | None = None,
    ):
        super().__init__()
        if activation not in ref_ffn.ACTIVATIONS + ("relu2",):
            raise ValueError(f"activation must be one of {ref_ffn.ACTIVATIONS + ('relu2',)}, got {activation!r}")
        if (gate_proj is None) != (activation == "gelu"):
            raise ValueError(f"activation {activation!r} {'takes no' if activation == 'gelu' else 'needs a'} gate_proj")
        self.activation = activation
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.ffn_sub_norm = sub_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up_proj(x)
        if self.activation == "gelu":
            h = F.gelu(u)
        else:
            g = self.gate_proj(x)
            if self.activation == "relu2":
                if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
                    h = torch.square(F.relu(g)) * u
                else:  # inference: g is this call's own output, reuse it (same values, no new tensors)
                    h = torch.relu_(g).square_().mul_(u)
            else:
                h = ref_ffn.ffn_activation(g, u, self.activation)
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# --------------------------------------------------------------------------- key/value cache


class KVCache:
    """Preallocated keys and values of every layer for generation: per layer two tensors of
    the static shape [batch, n_kv_heads, size, head_dim], allocated on the first write (in
    the keys' dtype and device). A step writes the keys / values of positions [batch, t] of
    each row into those slots (a scatter: rows may stand at different positions), so every
    decode step has the same shapes whatever the position. Writing a position outside
    [0, size) raises instead of growing: generation never writes past its cache."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, size: int, head_dim: int):
        self.shape = (batch, n_kv_heads, size, head_dim)
        self.size = size
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def layer(self, index: int, positions: torch.Tensor) -> "_LayerCache":
        """What layer `index` sees of the cache in a step writing positions [batch, t]. By
        depth, not by module: blocks shared by several depths (accelops.sharing) still get a
        cache each."""
        return _LayerCache(self, index, positions)

    def check_positions(self, positions: torch.Tensor) -> None:
        """ValueError unless every position lies in [0, size) (one host sync: call it once a
        step, not once a layer)."""
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= self.size:
            raise ValueError(f"KV cache write at positions [{lo}, {hi}] outside its {self.size} slots")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write k, v [batch, n_kv_heads, t, head_dim] at positions [batch, t]; -> the layer's
        whole (keys, values) [batch, n_kv_heads, size, head_dim]."""
        if tuple(k.shape[:2]) != self.shape[:2] or k.shape[3] != self.shape[3] or k.shape != v.shape:
            raise ValueError(f"k/v of shape {tuple(k.shape)} do not fit a KV cache of shape {self.shape}")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(self.shape)
            self.values[layer] = v.new_zeros(self.shape)
        index = positions[:, None, :, None].expand(k.shape)
        self.keys[layer].scatter_(2, index, k)
        self.values[layer].scatter_(2, index, v)
        return self.keys[layer], self.values[layer]


class _LayerCache:
    __slots__ = ("cache", "index", "positions")

    def __init__(self, cache: KVCache, index: int, positions: torch.Tensor):
        self.cache, self.index, self.positions = cache, index, positions

    def update(self, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(self.index, k, v, self.positions)
