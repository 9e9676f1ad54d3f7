"""Configurations of the language models: dataclasses validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..reference.ffn import ACTIVATIONS as FUSED_ACTIVATIONS

__all__ = ["QUANTS", "CELLS", "ACTIVATIONS", "POS_EMBS", "NORMS", "TransformerLMConfig", "RNNLMConfig"]

# None: fp32 nn.Linear. "bitlinear": BitNet b1.58 training (ternary weights, int8 activations,
# straight-through). "int8": W8A8 inference layers (Int8Linear); a trained fp32 or qat-int8
# model becomes one with model.to_int8(). "qat-int8": int8 quantization-aware training.
QUANTS = (None, "bitlinear", "int8", "qat-int8")
CELLS = ("lstm", "gru")
# The FFN activations: the fused op's (swiglu, geglu, gelu) and "relu2", BitNet b1.58's
# gated squared ReLU (relu(g)^2 * u), which the fused op does not implement: an FFN with
# relu2 (or with ffn_sub_norm) runs unfused (accelops.models.layers.UnfusedFFN).
ACTIVATIONS = FUSED_ACTIVATIONS + ("relu2",)
POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _positive_float(name: str, value) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


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
    LM head stay fp32.

    Architecture options (the defaults are the original model: learned positions,
    LayerNorm, multi-head attention, SwiGLU, no sub-layer norms, no biases):

    pos_emb: "learned" (an embedding of max_len positions added to the tokens) or "rope"
        (rotary embeddings on q and k, Llama / transformers' rotate-half layout, base
        rope_theta; no position parameters).
    norm, norm_eps: "layernorm" or "rmsnorm" for every norm of the model, with that epsilon.
    n_kv_heads: key/value heads (grouped-query attention); None = n_heads. Must divide n_heads.
    activation: "swiglu", "geglu", "gelu" (fused FFN) or "relu2" (BitNet's gated squared
        ReLU, relu(gate)^2 * up; runs unfused).
    attn_sub_norm / ffn_sub_norm: BitNet's sub-layer norms, a norm (of kind `norm`) on the
        attention output before o_proj / on the FFN's hidden activation before down_proj.
        ffn_sub_norm makes the FFN run unfused.
    attn_bias / mlp_bias: biases of q/k/v/o and of gate/up/down; None = `bias`.
    max_len: the context: positions 0 .. max_len - 1 (also the generation limit).
    """

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
    n_kv_heads: int | None = None
    pos_emb: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    attn_sub_norm: bool = False
    ffn_sub_norm: bool = False
    attn_bias: bool | None = None
    mlp_bias: bool | None = None

    def __post_init__(self):
        if self.hidden is None and isinstance(self.dim, numbers.Integral):
            self.hidden = 4 * self.dim
        _common(self)
        _positive_int("n_heads", self.n_heads)
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                f"the head size would be {self.dim / self.n_heads:g}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.n_kv_heads is not None:
            _positive_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}): each key/value "
                    "head serves a whole group of query heads"
                )
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"pos_emb must be one of {POS_EMBS}, got {self.pos_emb!r}")
        _positive_float("rope_theta", self.rope_theta)
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"pos_emb='rope' needs an even head size, got dim / n_heads = {self.head_dim}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        _positive_float("norm_eps", self.norm_eps)
        for name in ("attn_sub_norm", "ffn_sub_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("attn_bias", "mlp_bias"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool or None (= bias), got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """n_kv_heads, or n_heads when it is None (multi-head attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def attention_bias(self) -> bool:
        return self.bias if self.attn_bias is None else self.attn_bias

    @property
    def ffn_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    @classmethod
    def bitnet_2b4t(cls, **overrides) -> "TransformerLMConfig":
        """The shape of Microsoft's BitNet b1.58 2B4T (microsoft/bitnet-b1.58-2B-4T): hidden
        2560, 30 layers, 20 heads of 128, 5 key/value heads, FFN 6912 with squared ReLU,
        vocabulary 128256 (Llama 3's tokenizer), RoPE base 500000, RMSNorm eps 1e-5,
        4096 positions, tied embeddings, BitNet's attn/ffn sub-layer norms, no biases.

        Checked against transformers 5.23's BitNetConfig() defaults, which agree on every
        number but two: max_position_embeddings there is 2048 (the 2B4T checkpoint's
        config.json says 4096) and tie_word_embeddings is False (the checkpoint ties them).
        rope_theta: BitNetConfig.default_theta = 500000. hidden_act "relu2", rms_norm_eps 1e-5,
        attention_bias False match.

        quant stays None (fp32 projections): the published weights are ternary already, so
        load them (TransformerLM.from_hf_bitnet) and deploy with
        accelops.convert(model, "ternary"); `overrides` replace any field (e.g. quant,
        n_layers for a smaller model of the same architecture, max_len)."""
        fields = dict(
            vocab_size=128256,
            dim=2560,
            n_layers=30,
            n_heads=20,
            n_kv_heads=5,
            hidden=6912,
            max_len=4096,
            activation="relu2",
            pos_emb="rope",
            rope_theta=500000.0,
            norm="rmsnorm",
            norm_eps=1e-5,
            attn_sub_norm=True,
            ffn_sub_norm=True,
            tie_embeddings=True,
            bias=False,
        )
        fields.update(overrides)
        return cls(**fields)


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
