"""convert(model, mode): swap a model's nn.Linear layers for accelops layers in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .bitlinear import BitLinear
from .qat import QATLinear
from .quantized_linear import Int8Linear, TernaryLinear

__all__ = ["convert", "ConvertReport", "Swap", "MODES"]

MODES = ("bitlinear", "ternary", "int8", "dynamic-int8", "qat-int8", "int8-from-qat")


@dataclass
class Swap:
    fqn: str
    from_type: str
    to_type: str
    in_features: int
    out_features: int


@dataclass
class ConvertReport:
    """What convert() swapped. bytes_before / bytes_after count every tensor the swapped
    layers hold (weights, scales, bias), each shared layer once."""

    mode: str
    swapped: list[Swap] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (fqn, why)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    @property
    def compression(self) -> float:
        """bytes_before / bytes_after (e.g. ~10 for ternary); 1.0 when nothing was swapped."""
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    def __str__(self) -> str:
        lines = [
            f"convert(mode={self.mode!r}): swapped {self.num_swapped} layer(s), "
            f"weights {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} ({self.compression:.2f}x smaller)"
        ]
        if self.swapped:
            rows = [("fqn", "from", "to", "in", "out")]
            rows += [(s.fqn, s.from_type, s.to_type, str(s.in_features), str(s.out_features)) for s in self.swapped]
            widths = [max(len(r[i]) for r in rows) for i in range(5)]
            for r in rows:
                lines.append("  " + "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                              for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        for fqn, why in self.skipped:
            lines.append(f"  skipped {fqn}: {why}")
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def _bytes(module: nn.Module) -> int:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def _swap_for(module: nn.Module, mode: str, per_channel: bool, qat: dict):
    """-> (a function making the new module, None) or (None, why it is not swapped)."""
    if type(module) is QATLinear:
        if mode == "int8-from-qat":
            return (lambda m: m.to_int8_linear()), None
        return None, f"already a QATLinear; mode={mode!r} converts only plain nn.Linear (use mode='int8-from-qat')"
    if mode == "int8-from-qat":
        if type(module) is nn.Linear:
            return None, "a plain nn.Linear, not a QATLinear (mode='int8-from-qat' converts QATLinear only)"
        if isinstance(module, nn.Linear):
            return None, f"{type(module).__name__} is not a QATLinear"
        return None, None
    if type(module) is BitLinear:
        if mode == "ternary":
            return (lambda m: TernaryLinear.from_bitlinear(m)), None
        return None, f"already a BitLinear; mode={mode!r} converts only plain nn.Linear (use mode='ternary')"
    if type(module) is nn.Linear:
        if mode == "bitlinear":
            return (lambda m: BitLinear.from_linear(m, per_channel=per_channel)), None
        if mode == "ternary":
            return (lambda m: TernaryLinear.from_linear(m, per_channel=per_channel)), None
        if mode == "qat-int8":
            return (lambda m: QATLinear.from_linear(m, **qat)), None
        return (lambda m: Int8Linear.from_linear(m)), None  # "int8" and "dynamic-int8": the same layer
    if isinstance(module, nn.Linear):
        # Subclasses such as nn.MultiheadAttention's out_proj are read through `.weight` by
        # their owner, not called, so swapping them would silently change nothing or break.
        return None, f"{type(module).__name__} is a subclass of nn.Linear, not nn.Linear"
    return None, None


def convert(model: nn.Module, mode: str, filter: Callable[[nn.Module, str], bool] | None = None,
            per_channel: bool = False, *, activation: str = "per_token", weight: str = "int8",
            group_size: int = 128) -> ConvertReport:
    """Swap `model`'s nn.Linear layers in place, recursing through its children.

    mode: "bitlinear" (training layer sharing the latent weight and bias Parameters),
    "ternary" (packed inference layer; a BitLinear is converted with its own per_channel)
    or "int8" (W8A8, per output channel). "dynamic-int8" is the same as "int8": Int8Linear
    quantizes the weights once, here, and the activations per token at run time.
    "qat-int8" makes QATLinear training layers sharing the weight and bias Parameters, with
    `activation` ("per_token" or "per_tensor"), `weight` ("int8" or "int4") and `group_size`
    (int4); "int8-from-qat" turns trained QATLinear layers (int8 weights, per-token
    activations) into Int8Linear layers whose outputs equal theirs bit for bit (others raise).
    filter(module, fqn) -> bool is asked about each swappable layer; only those it returns
    True for are swapped. per_channel applies to
    "bitlinear" and "ternary" from nn.Linear. New layers live on the original's device and
    return outputs in the input's dtype. A layer object reachable under several names is
    swapped once and the new one put at every name, so sharing survives.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be callable as filter(module, fqn) -> bool, got {type(filter).__name__}")
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
    qat = {"activation": activation, "weight": weight, "group_size": group_size}
    if mode == "qat-int8":
        QATLinear(1, 1, activation=activation, weight=weight, group_size=group_size, device="meta")  # checks them
    elif qat != {"activation": "per_token", "weight": "int8", "group_size": 128}:
        raise ValueError(f"activation, weight and group_size apply to mode='qat-int8' only, got mode={mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError(
            f"model is itself a {type(model).__name__}: convert swaps children in place and cannot replace the "
            "object you hold; wrap it (nn.Sequential(layer)) or call TernaryLinear/Int8Linear/BitLinear.from_linear"
        )
    if mode == "int8-from-qat":
        # Refuse before swapping anything, so a bad layer leaves the model as it was.
        for fqn, m in model.named_modules():
            if type(m) is QATLinear and (m.activation != "per_token" or m.weight_bits != "int8"):
                if filter is None or filter(m, fqn):
                    raise ValueError(
                        f"{fqn} is a QATLinear with activation={m.activation!r}, weight={m.weight_bits!r}: only "
                        "activation='per_token', weight='int8' has an exact Int8Linear form (Int8Linear quantizes "
                        "activations per token and weights per output channel); skip it with filter="
                    )
    report = ConvertReport(mode=mode)
    replaced: dict[int, nn.Module] = {}  # id(old) -> new, so a shared layer stays shared
    _convert_children(model, "", mode, filter, per_channel, qat, report, replaced, set())
    return report


def _convert_children(parent, prefix, mode, filter, per_channel, qat, report, replaced, visited):
    if id(parent) in visited:
        return  # a shared container: its layers were swapped on the first visit
    visited.add(id(parent))
    # _modules rather than named_children(), which yields a module held twice only once
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        fqn = prefix + name
        if id(child) in replaced:
            new = replaced[id(child)]
            setattr(parent, name, new)
            report.swapped.append(Swap(fqn, type(child).__name__, type(new).__name__,
                                       child.in_features, child.out_features))
            continue
        make, why = _swap_for(child, mode, per_channel, qat)
        if make is None:
            if why is not None:
                report.skipped.append((fqn, why))
            _convert_children(child, fqn + ".", mode, filter, per_channel, qat, report, replaced, visited)
            continue
        if filter is not None:
            keep = filter(child, fqn)
            if not isinstance(keep, bool):
                raise TypeError(f"filter must return a bool, got {type(keep).__name__} for {fqn!r}")
            if not keep:
                report.skipped.append((fqn, "filter returned False"))
                continue
        new = make(child)
        replaced[id(child)] = new
        setattr(parent, name, new)
        report.swapped.append(Swap(fqn, type(child).__name__, type(new).__name__,
                                   child.in_features, child.out_features))
        report.bytes_before += _bytes(child)
        report.bytes_after += _bytes(new)
