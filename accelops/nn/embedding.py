"""The token embedding and the output head (LM head) in a lower precision for inference.

At a large vocabulary these two are the largest weights of a small model: BitNet b1.58
2B4T's 128256 x 2560 embedding is 1.3 GB in fp32, read whole by the head at every decoded
token, more than all 30 ternary layers together (0.52 GB packed). accelops.convert(...,
head=, embedding=) puts these layers in their place:

    Int8Embedding   int8 rows `w_q` [vocab, dim] with one fp32 scale a row `w_scale` [vocab];
                    a lookup dequantizes the rows it gathers. attend(h) is the head on the
                    same weight: int8_linear(h, w_q, w_scale) (per-row scales are the head's
                    per-output-channel scales), so a tied embedding and head keep ONE int8
                    weight.
    Bf16Embedding   the weight in bf16; lookups return the model's dtype. attend(h) likewise.
    Bf16Linear      a bias-free or biased linear layer whose weight is stored in bf16, computing
                    in bf16 and returning the input's dtype (an untied head).
    TiedHead        the output head of a model whose head and embedding are tied (transformers'
                    lm_head sharing embed_tokens' weight): it holds the embedding module itself
                    (the same object) and runs embedding.attend(h), so the tie survives .to(),
                    state_dict and accelops.save / load.

An untied head in int8 is an Int8Linear. Outputs: an embedding returns its `dtype` (the
dtype of the embedding it replaced; model.to(dtype) changes it, the stored weight keeps its
precision), the heads return the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["Int8Embedding", "Bf16Embedding", "Bf16Linear", "TiedHead"]


def _dtype(value) -> torch.dtype:
    """A torch.dtype, or its name ("float32", as accelops.save records it); None: float32."""
    if value is None:
        return torch.float32
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (the output dtype), got {value!r}")
    return value


def _check_ids(layer, ids: torch.Tensor) -> None:
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dtype.is_floating_point
        or ids.dtype.is_complex
        or ids.dtype == torch.bool
    ):
        raise TypeError(
            f"{type(layer).__name__} takes integer ids, got "
            f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}"
        )


def _apply_keeping(module: nn.Module, apply, fn, recurse, stored: dict) -> None:
    """module._apply(fn) (`apply`: the parent class's), then the tensors named in `stored`
    back in their dtype: the values from before, moved where fn put them (a dtype cast is
    undone without the round trip's rounding: bf16 -> fp16 -> bf16 would lose range)."""
    kept = {name: getattr(module, name).detach() for name in stored if getattr(module, name) is not None}
    apply(fn, recurse)
    for name, dtype in stored.items():
        now = getattr(module, name)
        if now is None or now.dtype == dtype:
            continue
        fixed = kept[name].to(now.device)
        if isinstance(now, nn.Parameter):
            now.data = fixed  # in place: a tie to this Parameter survives
        else:
            setattr(module, name, fixed)


class _LowPrecisionEmbedding(nn.Module):
    """What Int8Embedding and Bf16Embedding share: the sizes, the output dtype, and
    keeping the stored weight's precision under model.to(dtype) / .half()."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, dtype):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx must lie in [-{num_embeddings}, {num_embeddings}), got {padding_idx!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # Kept for nn.Embedding's interface; it only matters to gradients, which these lack.
        self.padding_idx = padding_idx if padding_idx is None or padding_idx >= 0 else padding_idx + num_embeddings
        self.dtype = _dtype(dtype)

    def _stored(self) -> dict:
        """{name: dtype} of the tensors whose precision is the layer's (kept by _apply)."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) changes what the lookups return (probed on an empty tensor),
        # not the precision the weight is stored in.
        probe = fn(torch.empty(0, dtype=self.dtype))
        _apply_keeping(self, super()._apply, fn, recurse, self._stored())
        if isinstance(probe, torch.Tensor) and probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, dtype={str(self.dtype).removeprefix('torch.')}"


class Int8Embedding(_LowPrecisionEmbedding):
    """nn.Embedding with int8 rows: `w_q` int8 [num_embeddings, embedding_dim] and `w_scale`
    fp32 [num_embeddings] (symmetric, one scale a row: quantize_weight_int8's per-output-channel
    layout, so attend(h) = int8_linear(h, w_q, w_scale) is the tied LM head). A lookup gathers
    the rows and dequantizes them to `dtype`. Loads its own state_dict or an nn.Embedding's
    (whose `weight` it quantizes on load)."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, device=None, dtype=None
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx, dtype)
        self.register_buffer("w_q", torch.zeros((num_embeddings, embedding_dim), dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))

    def _stored(self) -> dict:
        return {"w_scale": torch.float32}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids(self, ids)
        rows = F.embedding(ids, self.w_q).to(torch.float32)
        return (rows * F.embedding(ids, self.w_scale[:, None])).to(self.dtype)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """The head on this weight: h [..., embedding_dim] -> logits [..., num_embeddings]
        (dynamic W8A8: h quantized per token), in h's dtype."""
        if h.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"attend: h's last dim must be embedding_dim={self.embedding_dim}, got shape {tuple(h.shape)}"
            )
        return ops.int8_linear(h, self.w_q, self.w_scale)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight w_q * w_scale, fp32 [num_embeddings, embedding_dim] (a copy)."""
        return self.w_q.float() * self.w_scale[:, None]

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        w = embedding.weight
        new = cls(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device=w.device, dtype=w.dtype
        )
        w_q, w_scale = ops.quantize_weight_int8(w.detach().float())
        new.w_q.copy_(w_q)
        new.w_scale.copy_(w_scale)
        new.train(embedding.training)
        return new

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        float_key = prefix + "weight"
        if float_key in state_dict and prefix + "w_q" not in state_dict:
            w = state_dict.pop(float_key)
            if tuple(w.shape) != (self.num_embeddings, self.embedding_dim):
                error_msgs.append(
                    f"size mismatch for {float_key}: Int8Embedding({self.extra_repr()}) expects a float "
                    f"weight of shape {(self.num_embeddings, self.embedding_dim)}, the checkpoint has "
                    f"{tuple(w.shape)}"
                )
                return
            w_q, w_scale = ops.quantize_weight_int8(w.detach().float().to(self.w_scale.device))
            state_dict[prefix + "w_q"], state_dict[prefix + "w_scale"] = w_q, w_scale
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class Bf16Embedding(_LowPrecisionEmbedding):
    """nn.Embedding whose `weight` is stored in bf16 (a Parameter without gradient, so ties
    to it survive .to()); lookups return `dtype`, attend(h) is the head on the same weight."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, device=None, dtype=None
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx, dtype)
        self.weight = nn.Parameter(
            torch.zeros((num_embeddings, embedding_dim), dtype=torch.bfloat16, device=device), requires_grad=False
        )

    def _stored(self) -> dict:
        return {"weight": torch.bfloat16}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids(self, ids)
        return F.embedding(ids, self.weight).to(self.dtype)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"attend: h's last dim must be embedding_dim={self.embedding_dim}, got shape {tuple(h.shape)}"
            )
        return F.linear(h.to(torch.bfloat16), self.weight).to(h.dtype)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Bf16Embedding":
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        w = embedding.weight
        new = cls(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            new.weight.copy_(w)
        new.train(embedding.training)
        return new


class Bf16Linear(nn.Module):
    """y = x @ W^T + b with W (and b) stored in bf16, computed in bf16 (oneDNN / cuBLAS bf16
    GEMM), returned in x's dtype. Keeps nn.Linear's attribute names."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.zeros((out_features, in_features), dtype=torch.bfloat16, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16, device=device), requires_grad=False)
            if bias
            else None
        )

    def _apply(self, fn, recurse=True):
        # the stored precision is the layer's: model.float() / .half() leave it bf16
        _apply_keeping(self, super()._apply, fn, recurse, {"weight": torch.bfloat16, "bias": torch.bfloat16})
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Bf16Linear: x's last dim must be in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Bf16Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


_EMBEDDINGS = {"int8": Int8Embedding, "bf16": Bf16Embedding}


class TiedHead(nn.Module):
    """The output head of a tied model: logits = embedding.attend(h), where `embedding` is the
    model's own Int8Embedding / Bf16Embedding (the same module object, held here as a child),
    so head and embedding share one weight. in_features = embedding_dim, out_features =
    num_embeddings. `precision` ("int8" / "bf16") only picks the placeholder embedding built
    when constructed by size (accelops.load then puts the shared one in its place)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        precision: str = "int8",
        *,
        embedding: nn.Module | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embedding is None:
            if precision not in _EMBEDDINGS:
                raise ValueError(f"precision must be one of {tuple(_EMBEDDINGS)}, got {precision!r}")
            embedding = _EMBEDDINGS[precision](out_features, in_features, device=device, dtype=dtype)
        if not isinstance(embedding, tuple(_EMBEDDINGS.values())):
            raise TypeError(f"embedding must be an Int8Embedding or Bf16Embedding, got {type(embedding).__name__}")
        if (embedding.embedding_dim, embedding.num_embeddings) != (in_features, out_features):
            raise ValueError(
                f"embedding of {embedding.num_embeddings} x {embedding.embedding_dim} does not fit a head "
                f"of in_features={in_features}, out_features={out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.embedding = embedding

    @property
    def precision(self) -> str:
        return "int8" if isinstance(self.embedding, Int8Embedding) else "bf16"

    @property
    def bias(self):
        return None

    @property
    def weight(self) -> torch.Tensor:
        """The head's weight as the embedding gives it (Int8Embedding: a dequantized copy)."""
        return self.embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.embedding.attend(h)

    @classmethod
    def of(cls, embedding: nn.Module) -> "TiedHead":
        return cls(embedding.embedding_dim, embedding.num_embeddings, embedding=embedding)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to a {type(self.embedding).__name__}"
