"""TransformerEncoder: the encoder form of TransformerLM (bidirectional attention under a
padding mask), with heads for sequence classification, token classification and answer
spans.

The same TransformerLMConfig, blocks and embedding-to-norm pass as the decoder:
TransformerBlock with BidirectionalSelfAttention as its attention, CausalSelfAttention with
its `causal` flag off, which keeps its projections (q_proj .. o_proj, the layers
config.quant picks, grouped-query heads, rotary embeddings, BitNet's sub-layer norm) and
only changes what may attend to what. So every quant mode (config.quant for training; accelops.convert / to_int8 for
deployment) and every sharing strategy (accelops.sharing finds model.blocks) applies as it
does to the decoder.

`attention_mask` [batch, seq] marks the real tokens (1 / True) of right- or left-padded
rows: no position attends to a padded key, so a real token's output does not depend on
how much padding its row has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import count_parameters
from ._base import LanguageModel
from .config import TransformerLMConfig
from .layers import make_norm
from .transformer import CausalSelfAttention, TransformerBlock, TransformerLM

__all__ = [
    "BidirectionalSelfAttention",
    "EncoderBlock",
    "TransformerEncoder",
    "EncoderForSequenceClassification",
    "EncoderForTokenClassification",
    "EncoderForQuestionAnswering",
    "HEADS",
    "POOLINGS",
]

HEADS = ("sequence", "token", "span")
POOLINGS = ("mean", "first")
IGNORE_INDEX = -100  # labels that take no part in the loss (padding, word continuations)


class BidirectionalSelfAttention(CausalSelfAttention):
    """CausalSelfAttention's projections, attending in both directions. forward(x, rope, cache,
    mask): mask [batch, 1, 1, t] (True = the key is a real token) or None (every key is);
    cache must be None (an encoder reads its whole input at once)."""

    causal = False


class EncoderBlock(TransformerBlock):
    """TransformerBlock (pre-norm attention and FFN, whatever options the config sets) with
    bidirectional attention. Same parameter names as the decoder's block, so a decoder's
    block weights load into it."""

    attention_cls = BidirectionalSelfAttention


class TransformerEncoder(nn.Module):
    """Token embedding (+ learned positions, or RoPE in the attention), config.n_layers
    EncoderBlocks, final norm. forward(tokens, attention_mask=None) -> hidden states
    [batch, seq, dim]. Subclasses add a task head (EncoderFor*); `head_kind` names it
    (None here).

    config.tie_embeddings must be False (an encoder has no LM head to tie). Initialised as
    the decoder (GPT-2 style, LanguageModel.init_weights); build on the meta device and call
    to_empty() then init_weights() to allocate without initialising twice."""

    head_kind: str | None = None

    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        if not isinstance(config, TransformerLMConfig):
            raise TypeError(f"config must be a TransformerLMConfig, got {type(config).__name__}")
        if config.tie_embeddings:
            raise ValueError("config.tie_embeddings=True: an encoder has no LM head to tie to the embedding")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))
        self.norm = make_norm(config.norm, config.dim, config.norm_eps)
        self._build_head()
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    def _build_head(self) -> None:
        pass

    # The decoder's checks, initialisation and int8 conversion apply unchanged: they read
    # config, tok_emb and blocks only. (Not a LanguageModel subclass: its forward is an LM's,
    # and the pipeline strategy splits LanguageModels as LMs.)
    _check_tokens = LanguageModel._check_tokens
    init_weights = LanguageModel.init_weights
    to_int8 = LanguageModel.to_int8
    # The decoder's embedding, blocks and final norm, with no cache: the same attributes.
    _hidden = TransformerLM._hidden

    def parameter_count(self):
        return count_parameters(self)

    def _mask(self, tokens: torch.Tensor, attention_mask) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != tokens.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must be a tensor of the tokens' shape {tuple(tokens.shape)}, got {got}")
        mask = attention_mask.to(device=tokens.device, dtype=torch.bool)
        if mask.device.type == "cpu" and not bool(mask.any(dim=1).all()):
            # a row with no real token would attend to nothing (NaN through softmax)
            raise ValueError("attention_mask: every row needs at least one real token")
        return mask

    def encode(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [batch, seq, dim]; positions 0 .. seq-1 whatever the mask
        (pad on the right to keep a row's positions those of the unpadded row)."""
        self._check_tokens("tokens", tokens)
        mask = self._mask(tokens, attention_mask)
        attn_mask = None if mask is None else mask[:, None, None, :]  # [batch, 1, 1 (queries), keys]
        return self._hidden(tokens, mask=attn_mask)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(tokens, attention_mask)


def _check_num_labels(num_labels) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    return num_labels


def _check_labels(labels, shape, name: str = "labels") -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    return labels.long()


class _EncoderWithClassifier(TransformerEncoder):
    """An encoder whose head is dropout, then `classifier` (dim -> num_labels)."""

    def __init__(self, config: TransformerLMConfig, num_labels: int):
        self.num_labels = _check_num_labels(num_labels)
        super().__init__(config)

    def _build_head(self) -> None:
        self.head_drop = nn.Dropout(self.config.dropout)
        self.classifier = nn.Linear(self.config.dim, self.num_labels)

    def get_output_embeddings(self) -> nn.Module:
        # accelops.convert keeps the output head in its precision in the ternary modes (as
        # BitNet keeps the LM head): this is that head.
        return self.classifier


class EncoderForSequenceClassification(_EncoderWithClassifier):
    """One label a sequence: the hidden states pooled over the real tokens ("mean", the
    default: robust for small models trained briefly; or "first": the first token's, BERT's
    [CLS] reading, for inputs that start with BOS), dropout, then `classifier`
    (dim -> num_labels). forward(tokens, attention_mask=None, labels=None) -> logits
    [batch, num_labels], or (logits, mean cross-entropy) with labels [batch]."""

    head_kind = "sequence"

    def __init__(self, config: TransformerLMConfig, num_labels: int, pooling: str = "mean"):
        _check_num_labels(num_labels)  # first, as the other arguments' checks
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        super().__init__(config, num_labels)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "first":
            return h[:, 0]
        if attention_mask is None:
            return h.mean(dim=1)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(dim=1) / m.sum(dim=1)

    def forward(self, tokens, attention_mask=None, labels=None):
        h = self.encode(tokens, attention_mask)
        logits = self.classifier(self.head_drop(self.pool(h, attention_mask)))
        if labels is None:
            return logits
        labels = _check_labels(labels, logits.shape[:1])
        return logits, F.cross_entropy(logits.float(), labels)


class EncoderForTokenClassification(_EncoderWithClassifier):
    """One label a token: dropout, then `classifier` (dim -> num_labels) on every position.
    forward(tokens, attention_mask=None, labels=None) -> logits [batch, seq, num_labels], or
    (logits, mean cross-entropy over the labels that are not -100) with labels [batch, seq]
    (-100 for padding and for the second and later pieces of a word)."""

    head_kind = "token"

    def forward(self, tokens, attention_mask=None, labels=None):
        logits = self.classifier(self.head_drop(self.encode(tokens, attention_mask)))
        if labels is None:
            return logits
        labels = _check_labels(labels, logits.shape[:2])
        if attention_mask is not None:
            labels = labels.masked_fill(~attention_mask.to(device=labels.device, dtype=torch.bool), IGNORE_INDEX)
        return logits, F.cross_entropy(
            logits.reshape(-1, self.num_labels).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )


class EncoderForQuestionAnswering(TransformerEncoder):
    """Answer spans: `qa_outputs` (dim -> 2) gives each position a start and an end logit.
    forward(tokens, attention_mask=None, labels=None) -> logits [batch, seq, 2] (start
    logits [..., 0], end logits [..., 1]; padded positions get the dtype's lowest value, so
    they are never picked), or (logits, loss) with labels [batch, 2], the (start, end) token
    positions of the answer, end inclusive: the mean of the start and end cross-entropies
    (BERT's SQuAD loss)."""

    head_kind = "span"

    def _build_head(self) -> None:
        self.qa_outputs = nn.Linear(self.config.dim, 2)

    def get_output_embeddings(self) -> nn.Module:
        return self.qa_outputs

    def forward(self, tokens, attention_mask=None, labels=None):
        logits = self.qa_outputs(self.encode(tokens, attention_mask))
        if attention_mask is not None:
            pad = ~attention_mask.to(device=logits.device, dtype=torch.bool)
            logits = logits.masked_fill(pad[..., None], torch.finfo(logits.dtype).min)
        if labels is None:
            return logits
        labels = _check_labels(labels, (logits.shape[0], 2))
        t = logits.shape[1]
        if labels.device.type == "cpu" and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= t):
            raise ValueError(
                f"labels (answer start, end) must be positions in [0, {t}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        start = F.cross_entropy(logits[..., 0].float(), labels[:, 0])
        end = F.cross_entropy(logits[..., 1].float(), labels[:, 1])
        return logits, (start + end) / 2
