"""Pieces shared by the reducer and the hooks: the bucket both hand to a compressor, the
error a failed collective becomes, and per-parameter storage of error-feedback state."""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


class CommunicationError(RuntimeError):
    """A collective issued by accelops.distributed failed: a peer process died, or did not
    take part within the timeout."""


def timeout_seconds(value) -> float | None:
    """timeout option -> seconds (None: the process group's own)."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"timeout must be seconds (a number) or a datetime.timedelta, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {value}")
    return float(value)


def comm_error(what: str, timeout_s: float | None, exc: BaseException) -> CommunicationError:
    """exc (from a collective about `what`) as a CommunicationError that says what happened.
    An error that already is one, possibly wrapped by torch's future machinery on its way
    (a RuntimeError "Got the following error when running the callback: ..."), is unwrapped."""
    if isinstance(exc, CommunicationError):
        return exc
    text = str(exc)
    start = text.find("accelops.distributed: ")
    if start >= 0:
        return CommunicationError(text[start:].split("\n\nAt:")[0])
    limit = f"within the {timeout_s:g} s timeout" if timeout_s else "within the process group's timeout"
    return CommunicationError(
        f"accelops.distributed: {what} failed: a peer process died or did not take part {limit}. "
        f"The collective cannot complete; restart the job (from a checkpoint). "
        f"Cause: {type(exc).__name__}: {str(exc).strip()[:600]}"
    )


def completed(value) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


def group_ranks(group) -> list[int]:
    """Global ranks of a process group (for building a dedicated group over the same ranks)."""
    return dist.get_process_group_ranks(group)


@dataclass
class Bucket:
    """One bucket as a compressor sees it: DDP's GradBucket or the reducer's own.

    buffer: the bucket's gradients (this rank's, not averaged) one after the other, 1-D;
    params/keys: the parameters in buffer order and their stable names (layout of the
    buffer: cumulative numel, no padding); is_last: the step's final bucket."""

    index: int
    buffer: torch.Tensor
    params: list
    keys: tuple
    is_last: bool

    @property
    def layout(self) -> tuple:
        return tuple((k, p.numel()) for k, p in zip(self.keys, self.params))


class PerParamStore:
    """fp32 state the size of a bucket (error-feedback residuals), stored per bucket but
    addressed by the names of the parameters in it, so a bucket layout that changes (DDP
    rebuilds its buckets after the first step; a resumed run starts from the initial
    layout) carries each parameter's slice over instead of losing or misplacing it."""

    def __init__(self):
        self._flat: dict[tuple, torch.Tensor] = {}  # layout -> fp32 [sum numel]
        self._loose: dict[str, torch.Tensor] = {}  # name -> fp32 [numel], not in any current bucket

    def get(self, layout: tuple, device: torch.device) -> torch.Tensor:
        flat = self._flat.get(layout)
        if flat is not None and flat.device == device:
            return flat
        names = {k for k, _ in layout}
        for old in [lay for lay in self._flat if any(k in names for k, _ in lay)]:
            self._explode(old)
        flat = torch.zeros(sum(n for _, n in layout), dtype=torch.float32, device=device)
        offset = 0
        for key, n in layout:
            piece = self._loose.pop(key, None)
            if piece is not None and piece.numel() == n:
                flat[offset : offset + n].copy_(piece.reshape(-1))
            offset += n
        self._flat[layout] = flat
        return flat

    def _explode(self, layout: tuple) -> None:
        flat = self._flat.pop(layout)
        offset = 0
        for key, n in layout:
            self._loose[key] = flat[offset : offset + n]
            offset += n

    def items(self):
        """(name, fp32 tensor) for every parameter slice held, as copies."""
        for layout, flat in self._flat.items():
            offset = 0
            for key, n in layout:
                yield key, flat[offset : offset + n].clone()
                offset += n
        for key, piece in self._loose.items():
            yield key, piece.clone()

    def load(self, pieces: dict) -> None:
        self._flat.clear()
        self._loose = {str(k): v.detach().to(torch.float32).reshape(-1).clone() for k, v in pieces.items()}

    def clear(self) -> None:
        self._flat.clear()
        self._loose.clear()
