"""Configurations of the language models: dataclasses validated on construction."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..reference.ffn import ACTIVATIONS

__all__ = ["QUANTS", "CELLS", "TransformerLMConfig", "RNNLMConfig"]

# None: fp32 nn.Linear. "bitlinear": BitNet b1.58 training (ternary weights, int8 activations,
# straight-through). "int8": W8A8 inference layers (Int8Linear); a trained fp32 or qat-int8
# model becomes one with model.to_int8(). "qat-int8": int8 quantization-aware training.
QUANTS = (None, "bitlinear", "int8", "qat-int8")
CELLS = ("lstm", "gru")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _common(cfg) -> None:
    for name in ("vocab_size", "dim", "n_layers", "hidden", "max_len"):
        _positive_int(name, getattr(cfg, name))
    if cfg.quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {cfg.quant!r}")
    for name in ("tie_embeddings", "bias"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(cfg, name)!r}")
    d = cfg.dropout
    if not isinstance(d, numbers.Real) or isinstance(d, bool) or not 0.0 <= d < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {d!r}")


@dataclass
class TransformerLMConfig:
    """Decoder-only transformer. hidden is the FFN width (default 4 * dim, filled in on
    construction); dim must divide into n_heads heads. quant picks the layers of the
    attention projections (q/k/v/o) and the FFN (see QUANTS); embeddings, norms and the
    LM head stay fp32."""

    vocab_size: int
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    hidden: int | None = None
    max_len: int = 256
    quant: str | None = None
    tie_embeddings: bool = False
    dropout: float = 0.0
    activation: str = "swiglu"
    bias: bool = False

    def __post_init__(self):
        if self.hidden is None and isinstance(self.dim, numbers.Integral):
            self.hidden = 4 * self.dim
        _common(self)
        _positive_int("n_heads", self.n_heads)
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                             f"the head size would be {self.dim / self.n_heads:g}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")


@dataclass
class RNNLMConfig:
    """Stacked LSTM or GRU language model. Each of the n_layers blocks is a pre-norm residual
    block: an RNN layer of width hidden, then out_proj (hidden -> dim) through the layer
    that quant picks. The recurrent weights themselves stay fp32 (torch's fused LSTM/GRU
    kernels); max_len bounds the input length only."""

    vocab_size: int
    dim: int = 256
    hidden: int = 512
    n_layers: int = 2
    cell: str = "lstm"
    max_len: int = 256
    quant: str | None = None
    tie_embeddings: bool = False
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self):
        _common(self)
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
