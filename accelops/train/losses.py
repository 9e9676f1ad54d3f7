"""Models with several targets: a loss_fn (or model) may return a dict of named scalar
losses; WeightedLoss turns it into the weighted sum the optimizer minimises and keeps each
component, detached, for the logs."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["WeightedLoss", "RESERVED_NAMES"]

# Columns of metrics.csv a component may not shadow.
RESERVED_NAMES = (
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
    "val_loss",
    "val_bpc",
)


def _check_weights(weights):
    if weights is None:
        return None
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(f"loss_weights must be a non-empty dict {{name: weight}}, got {weights!r}")
    out = {}
    for name, w in weights.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"loss_weights keys must be loss names (str), got {name!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"loss_weights[{name!r}] must be a finite number, got {w!r}")
        out[name] = float(w)
    return out


class WeightedLoss:
    """Callable (model, batch) -> the scalar to backpropagate.

    loss_fn(model, batch) may return a scalar tensor (passed through) or a dict
    {name: scalar tensor}: the result is sum(weights.get(name, 1.0) * loss). A weight
    named after no loss the model returns is an error (a typo would otherwise silently
    weigh nothing). The components of every call since the last pop() are accumulated,
    detached, and pop() gives their mean."""

    def __init__(self, loss_fn, weights=None):
        self.loss_fn = loss_fn
        self.weights = _check_weights(weights)
        self.names: tuple[str, ...] | None = None  # the components' names, once seen
        self._sum: dict | None = None
        self._count = 0

    def __call__(self, model, batch) -> torch.Tensor:
        out = self.loss_fn(model, batch)
        if isinstance(out, Mapping):
            return self._combine(out)
        if self.weights is not None:
            raise TypeError(
                f"loss_weights={self.weights} were given but the loss is a single "
                f"{type(out).__name__}: the model (or loss_fn) must return a dict of named losses"
            )
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise TypeError(
                "loss_fn must return a scalar loss tensor or a dict of them; got "
                f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
            )
        return out

    def _combine(self, out: Mapping) -> torch.Tensor:
        if not out:
            raise ValueError("the model returned an empty dict of losses")
        names = tuple(sorted(out))
        if self.names is None:
            clash = sorted(set(names) & set(RESERVED_NAMES)) + sorted(n for n in names if n.startswith("lr-group"))
            if clash:
                raise ValueError(
                    f"loss component name(s) {clash} clash with metrics columns {RESERVED_NAMES}: "
                    "rename them (e.g. 'loss_a')"
                )
            if self.weights is not None:
                unknown = sorted(set(self.weights) - set(names))
                if unknown:
                    raise ValueError(
                        f"loss_weights has key(s) {unknown} that the model's losses do not have; "
                        f"its losses are {list(names)}"
                    )
            self.names = names
        elif names != self.names:
            raise ValueError(
                f"the model returned losses {list(names)}, earlier {list(self.names)}: the set of "
                "named losses must not change between batches"
            )
        total = None
        for name in names:
            value = out[name]
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise TypeError(
                    f"loss {name!r} must be a scalar tensor, got {type(value).__name__}"
                    f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}"
                )
            w = 1.0 if self.weights is None else self.weights.get(name, 1.0)
            term = value if w == 1.0 else value * w
            total = term if total is None else total + term
        parts = torch.stack([out[n].detach().float() for n in names])
        self._sum = parts if self._sum is None else self._sum + parts
        self._count += 1
        return total

    def pop(self) -> dict:
        """{name: mean component tensor} over the calls since the last pop ({} for scalar losses)."""
        if self._sum is None:
            return {}
        mean = self._sum / self._count
        self._sum, self._count = None, 0
        return dict(zip(self.names, mean.unbind(0)))
