"""Language models built from accelops layers: TransformerLM (decoder-only, causal attention
and FusedFFN) and RNNLM (stacked LSTM/GRU), configured by dataclasses whose `quant` picks
fp32, BitLinear, Int8Linear or QATLinear projections."""
from ._base import LanguageModel
from .config import CELLS, QUANTS, RNNLMConfig, TransformerLMConfig
from .rnn import RNNLM, RNNBlock
from .transformer import CausalSelfAttention, TransformerBlock, TransformerLM

__all__ = ["TransformerLMConfig", "TransformerLM", "RNNLMConfig", "RNNLM", "LanguageModel", "QUANTS", "CELLS",
           "CausalSelfAttention", "TransformerBlock", "RNNBlock"]
