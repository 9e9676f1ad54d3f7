"""TransformerSeq2Seq: the encoder-decoder form of the project's transformer (issue 27), for
sequence-to-sequence tasks such as character-level lemmatisation (word form -> lemma).

Built from the same TransformerLMConfig and pieces as TransformerLM and TransformerEncoder:

- encoder: config.n_layers EncoderBlocks (bidirectional self-attention under the source's
  padding mask, then the FFN), final norm `enc_norm`;
- decoder: config.n_layers DecoderBlocks: pre-norm causal self-attention (TransformerBlock's
  CausalSelfAttention), then cross-attention (CrossAttention: queries from the decoder,
  keys and values from the encoder's output, masked to the source's real tokens), then the
  FFN, each a residual branch; final norm `dec_norm`, then `lm_head` (dim -> vocab_size).

One token embedding `tok_emb` (and with pos_emb="learned" one position table) serves the
source and the target: both are strings over one vocabulary (a character set). Every
projection is the layer config.quant picks (nn.Linear / BitLinear / QATLinear / Int8Linear),
so accelops.convert(model, "ternary") deploys a bitlinear model and to_int8() a fp32 or
qat-int8 one, as for the other models; lm_head stays in its precision (it is
get_output_embeddings(), which convert keeps in the ternary modes).

sharing="encoder-decoder" (accelops.sharing.share_encoder_decoder): decoder block i reuses
encoder block i's self-attention projections (q_proj, k_proj, v_proj, o_proj and BitNet's
attn_sub_norm when configured) and its FFN, as the same module objects; its norms
(norm1, norm_cross, norm2) and its cross-attention stay its own. The decoder's
self-attention module itself is separate (it attends causally, the encoder's in both
directions) but holds the encoder's projection layers.

forward(src, src_mask=None, tgt=None, targets=None): teacher forcing, tgt = [BOS] + target
ids (right-padded), targets = target ids + [EOS] (-100 where padded) -> (logits, mean
cross-entropy); greedy_decode(src, src_mask, max_new_tokens) -> the generated ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import count_parameters
from ._base import LanguageModel, _swap_int8
from .config import TransformerLMConfig
from .encoder import EncoderBlock, TransformerEncoder
from .layers import make_norm, rope_cos_sin
from .transformer import CausalSelfAttention, TransformerBlock

__all__ = ["CrossAttention", "DecoderBlock", "TransformerSeq2Seq", "SHARINGS"]

SHARINGS = (None, "encoder-decoder")
IGNORE_INDEX = -100


class CrossAttention(CausalSelfAttention):
    """CausalSelfAttention's projections (q_proj from the decoder's states, k_proj / v_proj
    from the encoder's output `memory`, o_proj), without rotary embeddings (the two
    sequences' positions are not comparable) and not causal. forward(x, memory, mask):
    mask [batch, 1, 1, s] (True = a real source token) or None."""

    causal = False

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        s = memory.shape[1]
        hd = self.head_dim
        q = self.q_proj(x).view(b, t, self.n_heads, hd).transpose(1, 2)
        k = self.k_proj(memory).view(b, s, self.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(memory).view(b, s, self.n_kv_heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(b, t, self.dim)
        if self.attn_sub_norm is not None:
            y = self.attn_sub_norm(y)
        return self.o_proj(y)


class DecoderBlock(TransformerBlock):
    """Pre-norm: x + self_attn(norm1(x)) (causal), + cross_attn(norm_cross(x), memory),
    + ffn(norm2(x)). TransformerBlock's attn / ffn / norm names, so the sharing code and
    checkpoints find the same parts as in the other blocks."""

    def __init__(self, cfg: TransformerLMConfig):
        super().__init__(cfg)
        self.norm_cross = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.cross_attn = CrossAttention(
            cfg.dim,
            cfg.n_heads,
            cfg.quant,
            cfg.attention_bias,
            cfg.dropout,
            n_kv_heads=cfg.kv_heads,
            rope_theta=None,
            sub_norm=make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.attn_sub_norm else None,
        )

    def forward(self, x, memory, memory_mask=None, rope=None):
        x = x + self.drop(self.attn(self.norm1(x), rope))
        x = x + self.drop(self.cross_attn(self.norm_cross(x), memory, memory_mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class TransformerSeq2Seq(nn.Module):
    """Encoder-decoder transformer (see the module's doc). config.tie_embeddings must be
    False; config.max_len bounds the source and the decoder's input (BOS and at most
    max_len - 1 target tokens; greedy_decode gives at most max_len tokens, the last one
    predicted at the last position). bos_id / eos_id: the target's start and end tokens
    (a CharVocab's or Tokenizer's 1 and 2).

    Initialised as the other models (GPT-2 style, LanguageModel.init_weights; shared modules
    once). head_kind "seq2seq" is what accelops.eval's lemmatisation task checks."""

    head_kind = "seq2seq"

    def __init__(self, config: TransformerLMConfig, *, sharing: str | None = None, bos_id: int = 1, eos_id: int = 2):
        super().__init__()
        if not isinstance(config, TransformerLMConfig):
            raise TypeError(f"config must be a TransformerLMConfig, got {type(config).__name__}")
        if config.tie_embeddings:
            raise ValueError("config.tie_embeddings=True: TransformerSeq2Seq keeps its own lm_head")
        if sharing not in SHARINGS:
            raise ValueError(f"sharing must be one of {SHARINGS}, got {sharing!r}")
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < config.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, {config.vocab_size}), got {v!r}")
        self.config = config
        self.bos_id, self.eos_id = bos_id, eos_id
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.encoder_blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))
        self.enc_norm = make_norm(config.norm, config.dim, config.norm_eps)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.dec_norm = make_norm(config.norm, config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()
        self.sharing = None
        if sharing == "encoder-decoder":
            from ..sharing import share_encoder_decoder

            share_encoder_decoder(self)

    _check_tokens = LanguageModel._check_tokens
    init_weights = LanguageModel.init_weights
    _mask = TransformerEncoder._mask

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def parameter_count(self):
        return count_parameters(self)

    def block_modules(self) -> nn.ModuleList:
        """The encoder's and the decoder's blocks in one (new) ModuleList, for counting the
        block parameters (shared tensors once). Not a `blocks` attribute on purpose:
        share_parameters would share into a copy and silently keep nothing."""
        return nn.ModuleList([*self.encoder_blocks, *self.decoder_blocks])

    # ------------------------------------------------------------------ forward

    def _embed(self, tokens: torch.Tensor):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        cfg = self.config
        rope = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype) if cfg.pos_emb == "rope" else None
        return self.drop(x), rope

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None):
        """-> (memory [batch, s, dim], the cross-attention mask [batch, 1, 1, s] or None)."""
        self._check_tokens("src", src)
        mask = self._mask(src, src_mask)
        attn_mask = None if mask is None else mask[:, None, None, :]
        x, rope = self._embed(src)
        for block in self.encoder_blocks:
            x = block(x, rope, None, attn_mask)
        return self.enc_norm(x), attn_mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None):
        """Decoder logits [batch, t, vocab_size] for the target prefix tgt (causal: position
        i's logits depend on tgt[:, :i+1] only)."""
        self._check_tokens("tgt", tgt)
        if tgt.shape[0] != memory.shape[0]:
            raise ValueError(f"tgt has {tgt.shape[0]} rows but the source has {memory.shape[0]}")
        x, rope = self._embed(tgt)
        for block in self.decoder_blocks:
            x = block(x, memory, memory_mask, rope)
        return self.lm_head(self.dec_norm(x))

    def forward(self, src, src_mask=None, tgt=None, targets=None):
        """Logits [batch, t, vocab_size] of the target given tgt (teacher forcing); with
        targets (tgt's shape, -100 ignored) -> (logits, mean cross-entropy)."""
        if tgt is None:
            raise ValueError("tgt (the decoder's input: BOS + target ids) is required; use greedy_decode to generate")
        memory, mask = self.encode(src, src_mask)
        logits = self.decode(tgt, memory, mask)
        if targets is None:
            return logits
        if not isinstance(targets, torch.Tensor) or targets.shape != tgt.shape:
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a tensor of tgt's shape {tuple(tgt.shape)}, got {got}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX
        )
        return logits, loss

    @torch.no_grad()
    def greedy_decode(
        self, src: torch.Tensor, src_mask: torch.Tensor | None = None, max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """Greedy decoding: from BOS, append the argmax token until EOS or max_new_tokens
        tokens (default and at most config.max_len: the decoder reads at most max_len
        positions). -> one list of ids a row, without BOS and EOS. The decoder reruns the
        whole prefix each step (no cache: the targets are a few characters)."""
        cap = self.config.max_len
        if max_new_tokens is None:
            max_new_tokens = cap
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= cap:
            raise ValueError(f"max_new_tokens must be an int in [1, max_len={cap}], got {max_new_tokens!r}")
        memory, mask = self.encode(src, src_mask)
        b = src.shape[0]
        tgt = torch.full((b, 1), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_new_tokens):
            nxt = self.decode(tgt, memory, mask)[:, -1].argmax(-1)
            nxt = nxt.masked_fill(done, self.eos_id)
            out.append(nxt)
            done |= nxt == self.eos_id
            if bool(done.all()) or tgt.shape[1] == cap:
                break
            tgt = torch.cat([tgt, nxt[:, None]], dim=1)
        rows = torch.stack(out, dim=1).tolist()
        return [r[: r.index(self.eos_id)] if self.eos_id in r else r for r in rows]

    # ------------------------------------------------------------------ int8 inference

    def to_int8(self) -> "TransformerSeq2Seq":
        """Post-training int8 in place, as LanguageModel.to_int8: the blocks' projections
        (and FFNs) of a fp32 / qat-int8 model become Int8Linear / FusedFFN(quant="int8");
        embeddings, norms and lm_head stay fp32; modules shared between the encoder and
        the decoder stay shared (one swap for both places)."""
        import dataclasses

        q = self.config.quant
        if q == "int8":
            return self
        if q == "bitlinear":
            raise ValueError("a bitlinear model deploys with accelops.convert(model, 'ternary'), not to_int8()")
        replaced: dict[int, nn.Module] = {}
        visited: set = set()
        _swap_int8(self.encoder_blocks, replaced, visited)
        _swap_int8(self.decoder_blocks, replaced, visited)
        self.config = dataclasses.replace(self.config, quant="int8")
        return self
