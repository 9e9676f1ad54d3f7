"""What TransformerLM and RNNLM share: the projection layers config.quant picks, input
checks, the loss, GPT-2 style initialisation, tied embeddings, sizes and the int8 form."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import (
    FFN,
    BitLinear,
    FusedFFN,
    Int8Linear,
    ParameterCount,
    QATLinear,
    TernaryLinear,
    convert,
    count_parameters,
)
from .layers import UnfusedFFN

INIT_STD = 0.02
# Projections that write into the residual stream: GPT-2 scales their init by
# 1/sqrt(2 * n_layers) so the residual's variance does not grow with depth.
RESIDUAL_PROJECTIONS = ("o_proj", "down_proj", "out_proj")


def make_linear(quant, in_features: int, out_features: int, bias: bool) -> nn.Module:
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if quant == "bitlinear":
        return BitLinear(in_features, out_features, bias=bias)
    if quant == "int8":
        return Int8Linear(in_features, out_features, bias=bias)
    return QATLinear(in_features, out_features, bias=bias)  # "qat-int8": per-token, int8 (exact Int8Linear form)


def make_ffn(quant, dim: int, hidden: int, activation: str, bias: bool, sub_norm: nn.Module | None = None) -> nn.Module:
    if activation == "relu2" or sub_norm is not None:
        # The fused op has no squared ReLU and no norm between the activation and down_proj:
        # three projections of the kind quant picks, the rest in plain PyTorch.
        gate = None if activation == "gelu" else make_linear(quant, dim, hidden, bias)
        return UnfusedFFN(
            gate, make_linear(quant, dim, hidden, bias), make_linear(quant, hidden, dim, bias), activation, sub_norm
        )
    if quant == "qat-int8":
        # The unfused FFN with QATLinear projections (same gate_proj/up_proj/down_proj names,
        # so the state_dict matches the fused one), not FusedFFN(quant="qat-int8"): QATLinear
        # sums the int8 codes exactly, so to_int8() gives bit-identical outputs; the fused op
        # multiplies dequantized values in fp32 and would differ by rounding.
        ffn = FFN(dim, hidden, activation, bias=bias)
        convert(ffn, "qat-int8")
        return ffn
    return FusedFFN(dim, hidden, activation, bias=bias, quant=quant)


def _int8_ffn(ffn: nn.Module) -> FusedFFN:
    new = FusedFFN(ffn.dim, ffn.hidden, ffn.activation, bias=False, quant="int8", device="meta")
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(ffn, name)
        if layer is not None:
            setattr(new, name, _int8_linear(layer))
    new.train(ffn.training)
    return new


def _int8_linear(layer: nn.Module) -> Int8Linear:
    if type(layer) is QATLinear:
        return layer.to_int8_linear()  # the trained codes: outputs equal the QAT layer's
    return Int8Linear.from_linear(layer)


class LanguageModel(nn.Module):
    """Base of TransformerLM and RNNLM: subclasses build tok_emb, blocks, norm and lm_head
    (None when tied) and implement _hidden(tokens) -> final hidden states."""

    config: object

    # ------------------------------------------------------------------ forward

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens [batch, seq] integer ids -> logits [batch, seq, vocab_size]; with targets
        (same shape, -100 ignored) -> (logits, mean cross-entropy)."""
        self._check_tokens("tokens", tokens)
        if targets is not None:
            if not isinstance(targets, torch.Tensor):
                raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
            if targets.shape != tokens.shape:
                raise ValueError(
                    f"targets must have the tokens' shape {tuple(tokens.shape)}, got {tuple(targets.shape)}"
                )
            if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
                raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
        logits = self.head(self._hidden(tokens))
        if targets is None:
            return logits
        return logits, self.loss(logits, targets)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits: lm_head(h), or with tied embeddings h @ tok_emb.weight^T
        (a converted tok_emb, Int8Embedding / Bf16Embedding, runs its attend(h): int8_linear or
        a bf16 GEMM on the one weight that serves both)."""
        if self.lm_head is not None:
            return self.lm_head(h)
        if type(self.tok_emb) is nn.Embedding:
            return F.linear(h, self.tok_emb.weight)
        return self.tok_emb.attend(h)

    # transformers' names, which accelops.convert(head=..., embedding=...) reads
    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def get_output_embeddings(self) -> nn.Module | None:
        """lm_head, or None when the embeddings are tied (head() then reads tok_emb)."""
        return self.lm_head

    @property
    def head_reads_input_embeddings(self) -> bool:
        """True when tied: there is no head module, head() computes with tok_emb's weight."""
        return self.lm_head is None

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long())

    def _check_tokens(self, name: str, tokens) -> None:
        cfg = self.config
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of token ids, got {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one position, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the model's max_len={cfg.max_len}; "
                "feed at most max_len tokens (crop or slide a window)"
            )
        # Checked on the CPU only: on a GPU this would synchronise every step (an
        # out-of-range id there trips the embedding's device assert instead).
        if tokens.device.type == "cpu" and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"{name} must lie in [0, vocab_size={cfg.vocab_size}), got values in [{lo}, {hi}]")

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def init_weights(self) -> "LanguageModel":
        """GPT-2 style: N(0, 0.02) for embeddings and projections, N(0, 0.02 / sqrt(2 n_layers))
        for the projections into the residual stream (o_proj, down_proj, out_proj), zero
        biases, unit norms, torch's default for LSTM/GRU weights. Int8Linear layers get a
        quantized N(0, 0.02) weight. Call it after to_empty() when the model was built on
        the meta device; shared modules are initialised once."""
        resid_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, m in self.named_modules():
            std = resid_std if name.rsplit(".", 1)[-1] in RESIDUAL_PROJECTIONS else INIT_STD
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, INIT_STD)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.LSTM, nn.GRU)):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):  # BitLinear and QATLinear too
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (Int8Linear, TernaryLinear)):
                w = torch.randn(m.out_features, m.in_features, device=m.w_scale.device) * std
                if isinstance(m, Int8Linear):
                    w_q, w_scale = ops.quantize_weight_int8(w)
                    m.w_q.copy_(w_q)
                else:
                    w_q, w_scale = ops.quantize_weight_ternary(w, m.per_channel)
                    m.w_packed.copy_(w_q)
                m.w_scale.copy_(w_scale)
            else:
                continue
            if isinstance(m, (nn.Linear, Int8Linear, TernaryLinear)) and m.bias is not None:
                m.bias.zero_()
        return self

    def tie_embeddings_(self) -> "LanguageModel":
        """Use the token embedding as the LM head from now on (drops lm_head's weight), in
        place. The tie is structural (the head reads tok_emb.weight), so it survives .to(),
        to_empty() and state_dict round trips; the state_dict then has no lm_head.weight."""
        self.lm_head = None
        self.config = dataclasses.replace(self.config, tie_embeddings=True)
        return self

    def parameter_count(self) -> ParameterCount:
        """Parameters, unique parameters, fp32 bytes and deployed bytes (see
        accelops.nn.ParameterCount)."""
        return count_parameters(self)

    # ------------------------------------------------------------------ int8 inference

    def to_int8(self) -> "LanguageModel":
        """Post-training int8, in place: the projections of a trained fp32 model (quant=None)
        become Int8Linear (W8A8, weights quantized per output channel now, activations per
        token at run time) and its FusedFFNs FusedFFN(quant="int8"); a qat-int8 model's
        QATLinear layers become the Int8Linear holding their trained codes (same outputs).
        Embeddings, norms, RNN weights and the LM head stay fp32. Shared modules stay shared.
        config.quant becomes "int8". Returns self.

        Equivalently, TransformerLM(replace(cfg, quant="int8")).load_state_dict(fp32_state)
        quantizes on load (Int8Linear loads nn.Linear checkpoints)."""
        q = self.config.quant
        if q == "int8":
            return self
        if q == "bitlinear":
            raise ValueError(
                "a bitlinear model is trained for ternary weights, not int8: deploy it with "
                "accelops.convert(model, 'ternary') on its BitLinear layers instead of to_int8()"
            )
        replaced: dict[int, nn.Module] = {}
        _swap_int8(self.blocks, replaced, set())
        self.config = dataclasses.replace(self.config, quant="int8")
        return self


def _swap_int8(parent: nn.Module, replaced: dict, visited: set) -> None:
    if id(parent) in visited:
        return
    visited.add(id(parent))
    for name, child in list(parent._modules.items()):  # _modules: a module held twice is seen twice
        if child is None:
            continue
        if id(child) in replaced:
            setattr(parent, name, replaced[id(child)])
            continue
        if isinstance(child, (FusedFFN, FFN)) and not (isinstance(child, FusedFFN) and child.quant == "int8"):
            new = _int8_ffn(child)
        elif type(child) in (nn.Linear, QATLinear):
            new = _int8_linear(child)
        else:
            _swap_int8(child, replaced, visited)
            continue
        replaced[id(child)] = new
        setattr(parent, name, new)
