"""Language models built from accelops layers: TransformerLM (decoder-only, causal attention
and FusedFFN; options for rotary positions, RMSNorm, grouped-query attention, squared ReLU
and BitNet's sub-layer norms) and RNNLM (stacked LSTM/GRU), configured by dataclasses whose
`quant` picks fp32, BitLinear, Int8Linear or QATLinear projections. TransformerEncoder is the
same transformer with bidirectional attention under a padding mask, with heads for sequence
classification, token classification and answer spans (EncoderFor*); TransformerSeq2Seq its
encoder-decoder form (cross-attention, greedy decoding, encoder-decoder weight sharing)."""

from ._base import LanguageModel
from .config import ACTIVATIONS, CELLS, NORMS, POS_EMBS, QUANTS, RNNLMConfig, TransformerLMConfig
from .encoder import (
    BidirectionalSelfAttention,
    EncoderBlock,
    EncoderForQuestionAnswering,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
    TransformerEncoder,
)
from .layers import UnfusedFFN
from .rnn import RNNLM, RNNBlock
from .seq2seq import CrossAttention, DecoderBlock, TransformerSeq2Seq
from .transformer import CausalSelfAttention, TransformerBlock, TransformerLM

__all__ = [
    "TransformerLMConfig",
    "TransformerLM",
    "RNNLMConfig",
    "RNNLM",
    "LanguageModel",
    "QUANTS",
    "CELLS",
    "ACTIVATIONS",
    "POS_EMBS",
    "NORMS",
    "CausalSelfAttention",
    "TransformerBlock",
    "RNNBlock",
    "UnfusedFFN",
    "TransformerEncoder",
    "EncoderForSequenceClassification",
    "EncoderForTokenClassification",
    "EncoderForQuestionAnswering",
    "EncoderBlock",
    "BidirectionalSelfAttention",
    "TransformerSeq2Seq",
    "DecoderBlock",
    "CrossAttention",
]
