"""TransformerLM: a decoder-only transformer whose projections are accelops layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import LanguageModel, make_ffn, make_linear
from .config import TransformerLMConfig
from .generate import generate as _generate
from .layers import KVCache, apply_rope, make_norm, rope_cos_sin

__all__ = ["TransformerLM", "CausalSelfAttention", "TransformerBlock"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with Llama's projection names (q_proj, k_proj,
    v_proj, o_proj), each the layer config.quant picks; F.scaled_dot_product_attention
    with is_causal=True (flash / memory-efficient kernels where available).

    n_kv_heads < n_heads: grouped-query attention (k_proj / v_proj give n_kv_heads heads,
    each shared by n_heads / n_kv_heads query heads). rope_theta: rotary embeddings on q
    and k (None: none, the positions come from a learned embedding). sub_norm: a norm on
    the attention output before o_proj (BitNet's attn_sub_norm).

    causal: the class's flag; the encoder's BidirectionalSelfAttention sets it False: every
    position attends to every key the mask allows (forward's mask [batch, 1, 1, t], True =
    the key is a real token, or None: every key is), and there is no KV cache."""

    causal = True

    def __init__(
        self,
        dim: int,
        n_heads: int,
        quant=None,
        bias: bool = False,
        dropout: float = 0.0,
        *,
        n_kv_heads: int | None = None,
        rope_theta: float | None = None,
        sub_norm: nn.Module | None = None,
    ):
        super().__init__()
        self.dim, self.n_heads, self.dropout = dim, n_heads, dropout
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.head_dim = dim // n_heads
        self.rope_theta = rope_theta
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = make_linear(quant, dim, dim, bias)
        self.k_proj = make_linear(quant, dim, kv_dim, bias)
        self.v_proj = make_linear(quant, dim, kv_dim, bias)
        self.attn_sub_norm = sub_norm
        self.o_proj = make_linear(quant, dim, dim, bias)

    def forward(self, x: torch.Tensor, rope=None, cache=None, mask: torch.Tensor | int | None = None) -> torch.Tensor:
        """x [batch, t, dim]. rope: (cos, sin) of the positions of x (computed for 0 .. t-1 when
        None). cache (generation: a KVCache layer view): with mask None, x is a prompt from
        position 0, attended causally and written to the cache; with mask [batch, 1, t, n]
        (True = may attend; n <= the cache size), x's keys/values are written at their
        positions and x attends to the first n slots of the cache under the mask (n = the
        cache size gives every step the same shapes, for torch.compile; eager decoding passes
        only the filled slots); mask an int n: x attends to all of the first n slots (every
        row of x at position n - 1; no mask to apply)."""
        b, t, _ = x.shape
        hd = self.head_dim
        if cache is not None and not self.causal:
            raise ValueError("bidirectional attention takes no KV cache: it reads the whole sequence at once")
        q = self.q_proj(x).view(b, t, self.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        if self.rope_theta is not None:
            if rope is None:  # called on its own (a pipeline stage): positions 0 .. t-1
                rope = rope_cos_sin(torch.arange(t, device=x.device), hd, self.rope_theta, q.dtype)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            if cache is not None:
                cache.update(k, v)
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal, enable_gqa=gqa
            )
        elif cache is None:  # not causal, under a padding mask
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa
            )
        else:
            k, v = cache.update(k, v)
            if isinstance(mask, int):  # every row may see all of the first `mask` slots
                n, mask = mask, None  # SDPA without a mask: 1.3-2.4x faster at one query
            else:
                n = mask.shape[-1]
            if n < k.shape[2]:  # attend over the filled slots only
                k, v = k[:, :, :n], v[:, :, :n]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(b, t, self.dim)
        if self.attn_sub_norm is not None:
            y = self.attn_sub_norm(y)
        return self.o_proj(y)

    def extra_repr(self) -> str:
        kv = f", n_kv_heads={self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        rope = f", rope_theta={self.rope_theta:g}" if self.rope_theta is not None else ""
        return f"dim={self.dim}, n_heads={self.n_heads}{kv}{rope}"


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then + ffn(norm2(x)); dropout on each branch.
    attention_cls: the attention's class (the encoder's EncoderBlock: bidirectional)."""

    attention_cls = CausalSelfAttention

    def __init__(self, cfg: TransformerLMConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.attn = self.attention_cls(
            cfg.dim,
            cfg.n_heads,
            cfg.quant,
            cfg.attention_bias,
            cfg.dropout,
            n_kv_heads=cfg.kv_heads,
            rope_theta=cfg.rope_theta if cfg.pos_emb == "rope" else None,
            sub_norm=make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.attn_sub_norm else None,
        )
        self.norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.ffn = make_ffn(
            cfg.quant,
            cfg.dim,
            cfg.hidden,
            cfg.activation,
            cfg.ffn_bias,
            make_norm(cfg.norm, cfg.hidden, cfg.norm_eps) if cfg.ffn_sub_norm else None,
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope=None, cache=None, mask: torch.Tensor | int | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class TransformerLM(LanguageModel):
    """Decoder-only LM: token embedding (+ learned position embedding, or rotary embeddings in
    the attention), config.n_layers pre-norm blocks (causal attention, FFN), final norm, LM
    head (the token embedding when config.tie_embeddings). `logits = model(tokens)`,
    `logits, loss = model(tokens, targets)`, `model.generate(prompt, max_new_tokens)`.

    quant=None / "bitlinear" / "qat-int8" train; "int8" is the inference form
    (model.to_int8() from a trained fp32 or qat-int8 model). Build on the meta device and
    call to_empty() then init_weights() to allocate without initialising twice.
    TransformerLM.from_hf_bitnet(path) loads a transformers BitNet checkpoint.
    """

    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        if not isinstance(config, TransformerLMConfig):
            raise TypeError(f"config must be a TransformerLMConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = make_norm(config.norm, config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    def _hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Final hidden states. positions [batch, t] (default 0 .. t-1); cache and mask as in
        CausalSelfAttention.forward (generation)."""
        pos = torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = self.drop(x)
        cfg = self.config
        # computed once a forward and shared by the layers
        rope = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype) if cfg.pos_emb == "rope" else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if cache is None else cache.layer(i, pos), mask)
        return self.norm(x)

    # ------------------------------------------------------------------ generation

    # accelops.models.generate.generate itself, bound to the model (its first argument), so its
    # signature and docstring have one definition: model.generate(prompt, max_new_tokens, ...).
    generate = _generate

    @classmethod
    def from_hf_bitnet(cls, path_or_state_dict, config=None, quantization_config=None) -> "TransformerLM":
        """A TransformerLM holding a transformers BitNetForCausalLM checkpoint (a directory
        written by save_pretrained, or its state dict with config=); a packed one (a
        quantization_config) loads into TernaryLinear layers. See accelops.models.hf."""
        from .hf import from_hf_bitnet

        return from_hf_bitnet(path_or_state_dict, config, quantization_config)
