"""RNNLM: a stacked LSTM/GRU language model whose projections are accelops layers."""

from __future__ import annotations

import torch
from torch import nn

from ._base import LanguageModel, make_linear
from .config import RNNLMConfig

__all__ = ["RNNLM", "RNNBlock"]


class RNNBlock(nn.Module):
    """Pre-norm residual: x + out_proj(rnn(norm(x))), out_proj (hidden -> dim) the layer
    config.quant picks. One RNN layer a block (rather than one nn.LSTM(num_layers=n)) so
    every layer has its projection and blocks can be shared like transformer blocks."""

    def __init__(self, cfg: RNNLMConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        rnn = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.rnn = rnn(cfg.dim, cfg.hidden, batch_first=True)
        self.out_proj = make_linear(cfg.quant, cfg.hidden, cfg.dim, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if y.device.type == "cpu" and isinstance(self.rnn, nn.LSTM) and torch.is_autocast_enabled("cpu"):
            # CPU autocast sends nn.LSTM to a bf16/fp16 oneDNN primitive that fails to build
            # (torch 2.13, this machine: "could not create a primitive descriptor"): the cell
            # runs in fp32 and the projections after it stay under autocast.
            with torch.autocast("cpu", enabled=False):
                h, _ = self.rnn(y.float())
        else:
            h, _ = self.rnn(y)
        return x + self.drop(self.out_proj(h))


class RNNLM(LanguageModel):
    """Token embedding, config.n_layers RNNBlocks (LSTM or GRU), final LayerNorm, LM head
    (the token embedding when config.tie_embeddings). Each forward starts from a zero state.
    `logits = model(tokens)`, `logits, loss = model(tokens, targets)`."""

    def __init__(self, config: RNNLMConfig):
        super().__init__()
        if not isinstance(config, RNNLMConfig):
            raise TypeError(f"config must be an RNNLMConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(RNNBlock(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(tokens))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
