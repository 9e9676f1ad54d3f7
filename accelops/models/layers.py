"""The pieces of TransformerLM's newer architectures: norms, rotary position embeddings and
the unfused FFN (squared ReLU, BitNet's sub-layer norm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import ffn as ref_ffn

__all__ = ["make_norm", "rope_cos_sin", "apply_rope", "UnfusedFFN"]


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

    def __init__(self, gate_proj: nn.Module | None, up_proj: nn.Module, down_proj: nn.Module, activation: str,
                 sub_norm: nn.Module | None = None):
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
                h = torch.square(F.relu(g)) * u
            else:
                h = ref_ffn.ffn_activation(g, u, self.activation)
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
