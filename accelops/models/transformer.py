"""TransformerLM: a decoder-only transformer whose projections are accelops layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import LanguageModel, make_ffn, make_linear
from .config import TransformerLMConfig

__all__ = ["TransformerLM", "CausalSelfAttention", "TransformerBlock"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with Llama's projection names (q_proj, k_proj,
    v_proj, o_proj), each the layer config.quant picks; F.scaled_dot_product_attention
    with is_causal=True (flash / memory-efficient kernels where available)."""

    def __init__(self, dim: int, n_heads: int, quant=None, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.dim, self.n_heads, self.dropout = dim, n_heads, dropout
        self.q_proj = make_linear(quant, dim, dim, bias)
        self.k_proj = make_linear(quant, dim, dim, bias)
        self.v_proj = make_linear(quant, dim, dim, bias)
        self.o_proj = make_linear(quant, dim, dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}"


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then + ffn(norm2(x)); dropout on each branch."""

    def __init__(self, cfg: TransformerLMConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg.dim, cfg.n_heads, cfg.quant, cfg.bias, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = make_ffn(cfg.quant, cfg.dim, cfg.hidden, cfg.activation, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))


class TransformerLM(LanguageModel):
    """Decoder-only LM: token + learned position embeddings, config.n_layers pre-norm blocks
    (causal attention, FusedFFN), final LayerNorm, LM head (the token embedding when
    config.tie_embeddings). `logits = model(tokens)`, `logits, loss = model(tokens, targets)`.

    quant=None / "bitlinear" / "qat-int8" train; "int8" is the inference form
    (model.to_int8() from a trained fp32 or qat-int8 model). Build on the meta device and
    call to_empty() then init_weights() to allocate without initialising twice.
    """

    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        if not isinstance(config, TransformerLMConfig):
            raise TypeError(f"config must be a TransformerLMConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
