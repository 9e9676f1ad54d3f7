"""The study journal: one JSON object a line, each flushed and fsynced before the study
goes on, so a crash loses at most the line being written.

Records: a header ``{"type": "study", "version", "optimizer": spec}``, then in the order
they happened ``{"type": "ask", "trial": {...}}`` when a trial starts and
``{"type": "result", "trial_id", "status", "loss", "error", "duration", "info"}`` when it
ends. Reading tolerates a torn *last* line (the write a crash interrupted: a warning, and
the next append starts by cutting it off); a bad line anywhere else is a ValueError naming
the line.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np

__all__ = ["JournalWriter", "read_journal", "to_json"]

VERSION = 1


def to_json(obj):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None, tuples to lists,
    anything else unknown to its repr."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    return repr(obj)


def read_journal(path) -> tuple[list[dict], int]:
    """The records of a journal and the byte length of its intact part."""
    with open(path, "rb") as f:
        data = f.read()
    records, pos, lineno = [], 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        last = end == -1 or end == len(data) - 1
        line = data[pos:] if end == -1 else data[pos:end]
        lineno += 1
        try:
            if end == -1:
                raise ValueError("no newline at the end")
            rec = json.loads(line)
            if not isinstance(rec, dict) or "type" not in rec:
                raise ValueError("not a journal record")
        except ValueError as e:
            if last:
                warnings.warn(f"{path}: ignoring a torn last line {lineno} ({e}); the trial it "
                              "described is treated as not written", stacklevel=3)
                break
            raise ValueError(f"{path}: line {lineno} is corrupt ({e}); only a torn last line can be "
                             "recovered, so this journal cannot be resumed") from None
        records.append(rec)
        pos = end + 1
    return records, pos


class JournalWriter:
    """Appends records; ``keep`` bytes of an existing file are kept (a torn tail is cut)."""

    def __init__(self, path, keep: int | None = None):
        self.path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        if keep is None:
            self._f = open(self.path, "xb")  # a fresh journal never overwrites one
        else:
            self._f = open(self.path, "r+b")
            self._f.truncate(keep)
            self._f.seek(keep)

    def write(self, record: dict) -> None:
        line = json.dumps(to_json(record), allow_nan=False, separators=(",", ":")).encode() + b"\n"
        self._f.write(line)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        if not self._f.closed:
            self._f.close()
