"""count_parameters(model): parameters, unique parameters, fp32 bytes and deployed bytes.

Shared by accelops.models (a model's size) and accelops.sharing (sizes before and after
sharing), so it lives below both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..reference.ternary import packed_cols
from .bitlinear import BitLinear
from .embedding import Int8Embedding
from .qat import QATLinear
from .quantized_linear import Int8Linear, TernaryLinear

__all__ = ["ParameterCount", "count_parameters"]

_FP32 = 4


@dataclass(frozen=True)
class ParameterCount:
    """Sizes of a model's weights.

    parameters: every weight counted once per module path that holds it, i.e. what the model
        would have without sharing. Int8Linear / TernaryLinear count their logical weight
        (out_features x in_features), not their buffers' bytes.
    unique_parameters: each tensor once, however many modules share it.
    fp32_bytes: unique_parameters at 4 bytes each.
    deployed_bytes: the unique tensors as they would be stored for inference: BitLinear and
        TernaryLinear weights packed ternary (2 bits a weight, K padded to 128) plus their
        scale; QATLinear and Int8Linear weights int8 (int4 QAT: 4 bits) plus fp32 scales;
        everything else (embeddings, norms, biases, RNN weights, LM head) in its own dtype.
        Observer state and other non-weight buffers are not counted.
    """

    parameters: int
    unique_parameters: int
    fp32_bytes: int
    deployed_bytes: int

    @property
    def shared_fraction(self) -> float:
        """1 - unique / total: 0.0 without sharing, 0.5 when every weight is used twice."""
        return 1.0 - self.unique_parameters / self.parameters if self.parameters else 0.0

    def __str__(self) -> str:
        return (
            f"{self.parameters:,} parameters ({self.unique_parameters:,} unique), "
            f"{self.fp32_bytes / 2**20:.3f} MiB fp32, {self.deployed_bytes / 2**20:.3f} MiB deployed"
        )


def _weights(module: nn.Module):
    """-> [(tensor whose identity marks sharing, logical element count, deployed bytes)] for
    the tensors `module` holds itself (not its children's)."""
    out = []
    quantized_weight = None
    if isinstance(module, BitLinear):
        w = module.weight
        n, k = w.shape
        quantized_weight = (w, w.numel(), n * packed_cols(k) + _FP32 * (n if module.per_channel else 1))
    elif isinstance(module, QATLinear):
        w = module.weight
        n, k = w.shape
        if module.weight_bits == "int8":
            nbytes = n * k + _FP32 * n
        else:
            groups = -(-k // module.group_size)
            nbytes = n * (-(-k // 2)) + _FP32 * n * groups
        quantized_weight = (w, w.numel(), nbytes)
    elif isinstance(module, (Int8Linear, TernaryLinear)):
        qw = getattr(module, module._qweight_name)
        nbytes = qw.numel() * qw.element_size() + module.w_scale.numel() * module.w_scale.element_size()
        out.append((qw, module.in_features * module.out_features, nbytes))
    elif isinstance(module, Int8Embedding):
        nbytes = module.w_q.numel() + module.w_scale.numel() * module.w_scale.element_size()
        out.append((module.w_q, module.w_q.numel(), nbytes))
    for name, p in module.named_parameters(recurse=False):
        if p is None:
            continue
        if quantized_weight is not None and p is quantized_weight[0]:
            out.append(quantized_weight)
        else:
            out.append((p, p.numel(), p.numel() * p.element_size()))
    return out


def count_parameters(model: nn.Module) -> ParameterCount:
    """Sizes of `model`'s weights (see ParameterCount); a tensor reachable through several
    modules (shared blocks, tied embeddings) is counted once in the unique figures."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    total = 0
    seen: dict[int, tuple[int, int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for tensor, numel, nbytes in _weights(module):
            total += numel
            seen.setdefault(id(tensor), (numel, nbytes))
    unique = sum(n for n, _ in seen.values())
    return ParameterCount(
        parameters=total,
        unique_parameters=unique,
        fp32_bytes=_FP32 * unique,
        deployed_bytes=sum(b for _, b in seen.values()),
    )
