"""Tuned dispatch: the backend and thread count of a call come from what `accelops tune`
measured on this machine for that op and shape.

The table is a JSON file (`$ACCELOPS_DISPATCH_TABLE`, default
~/.cache/accelops/dispatch.json) holding one table per machine fingerprint (see
accelops/_machine.py). Each entry is one measured (op, shape) with the winner among the
candidates tried (on the CPU: "native", the C++ kernel, and "aten_int_mm", the same op
with ATen's int8 GEMM for the sums, each at 1..n threads, "native" at n threads with each
tile configuration (n_block, k_chunk) of accelops.tune.TILE_GRID, and "reference";
on CUDA "native", the Triton kernel, with its built-in configuration and with each of
accelops.kernels.int8.matmul_config_grid, and "reference"). A shape never measured takes the winner of its nearest measured
neighbour in log2-shape space (same op). A file without a table for this machine is
ignored with one warning; ACCELOPS_BACKEND still overrides everything; under
torch.compile the table is not consulted (the compiled graph keeps the default).

Cost per call (measured by bench/bench_dispatch.py): one dict lookup keyed by
(op, shape) after the first call of a shape; the first call of a shape runs the
neighbour search once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_TABLE = "ACCELOPS_DISPATCH_TABLE"
ENV_DISABLE = "ACCELOPS_TUNED"  # "0": ignore any table
FORMAT_VERSION = 1
# The ops that consult the table, and the names of the shape dimensions they key it by.
TUNED_OPS = {
    "ternary_matmul": ("M", "N", "K"),
    "int8_linear": ("M", "N", "K"),
}
# The Triton GEMM whose configuration (block sizes, warps, stages) a CUDA entry may set
# (accelops.kernels.int8.matmul_config).
TRITON_GEMM = {"ternary_matmul": "ternary", "int8_linear": "int8"}


def default_path() -> Path:
    env = os.environ.get(ENV_TABLE)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "accelops" / "dispatch.json"


@dataclass(frozen=True)
class Choice:
    backend: str  # "native" (the registered kernel), "aten_int_mm" or "reference"
    threads: int | None  # torch threads for the call (None: leave as it is)
    predicted: bool = False  # True when taken from a neighbouring shape
    source: tuple | None = None  # the measured shape it came from
    tiles: tuple | None = None  # (n_block, k_chunk) of the C++ kernel ("native" only; None: its own)
    config: tuple | None = None  # (kind, sorted (key, value) pairs) of the Triton GEMM on CUDA


class DispatchTable:
    """The measured entries of one machine: {op: {shape tuple: Choice}}."""

    def __init__(self, entries: dict, fingerprint: str, path: Path | None = None):
        self.entries = entries
        self.fingerprint = fingerprint
        self.path = path
        self._logs = {
            op: [(shape, tuple(math.log2(max(1, d)) for d in shape)) for shape in shapes]
            for op, shapes in entries.items()
        }
        self._cache: dict = {}
        self._lock = threading.Lock()

    @classmethod
    def from_json(cls, table: dict, fingerprint: str, path=None) -> "DispatchTable":
        entries: dict = {}
        for e in table.get("entries", []):
            op = e["op"]
            if op not in TUNED_OPS:
                continue
            shape = tuple(int(e["shape"][d]) for d in TUNED_OPS[op])
            w = e["winner"]
            tiles = w.get("tiles")
            tiles = (int(tiles["n_block"]), int(tiles["k_chunk"])) if tiles else None
            config = w.get("config")
            config = (TRITON_GEMM[op], tuple(sorted((k, int(v)) for k, v in config.items()))) if config else None
            entries.setdefault(op, {})[shape] = Choice(w["backend"], w.get("threads"), False, shape, tiles, config)
        return cls(entries, fingerprint, path)

    def predict(self, op: str, shape: tuple) -> Choice | None:
        """The measured winner for shape, else that of its nearest neighbour (log2 space)."""
        measured = self.entries.get(op)
        if not measured:
            return None
        exact = measured.get(shape)
        if exact is not None:
            return exact
        logs = tuple(math.log2(max(1, d)) for d in shape)
        best, best_d = None, math.inf
        for other, other_logs in self._logs[op]:
            d = sum((a - b) ** 2 for a, b in zip(logs, other_logs))
            if d < best_d:
                best, best_d = other, d
        c = measured[best]
        return Choice(c.backend, c.threads, True, best, c.tiles, c.config)

    def lookup(self, op: str, shape: tuple) -> Choice | None:
        key = (op, shape)
        try:
            return self._cache[key]
        except KeyError:
            pass
        choice = self.predict(op, shape)
        with self._lock:
            if len(self._cache) > 65536:  # shapes without end (e.g. varying M): keep the cache bounded
                self._cache.clear()
            self._cache[key] = choice
        return choice


_state = {"loaded": False, "table": None}
_load_lock = threading.Lock()


def load(path=None, warn: bool = True) -> DispatchTable | None:
    """Read the table file (None when it is missing, unreadable or for another machine)."""
    from .._machine import machine_info

    path = Path(path) if path is not None else default_path()
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT_VERSION}")
        tables = data["tables"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if warn:
            warnings.warn(
                f"accelops: dispatch table {path} is unreadable ({exc}); using the default dispatch",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    here = machine_info()["fingerprint"]
    if here not in tables:
        if warn:
            others = ", ".join(sorted(tables)) or "none"
            warnings.warn(
                f"accelops: dispatch table {path} holds no table for this machine (fingerprint {here}; "
                f"it has {others}): ignored, using the default dispatch; run `accelops tune` here",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return DispatchTable.from_json(tables[here], here, path)


def active() -> DispatchTable | None:
    """The table of this process, read once on first use."""
    if not _state["loaded"]:
        with _load_lock:
            if not _state["loaded"]:
                _state["table"] = None if os.environ.get(ENV_DISABLE, "1") == "0" else load()
                _state["loaded"] = True
    return _state["table"]


def reset(table: DispatchTable | None = None, loaded: bool = False) -> None:
    """Forget the process's table (re-read on next use), or install `table` (tests, tune)."""
    _state["table"] = table
    _state["loaded"] = loaded or table is not None


def choice_for(op: str, device: torch.device, shape: tuple) -> Choice | None:
    """The tuned choice for this call, or None for the default dispatch. Callers ask only
    when ACCELOPS_BACKEND did not force the backend (_backend.choose_and_forced)."""
    if device.type != "cpu" and device.type != "cuda":
        return None
    # Before active(): dynamo cannot trace its lock, so a process whose first accelops call
    # was inside torch.compile failed with "Unsupported context manager".
    if torch.compiler.is_compiling():
        return None
    table = _state["table"] if _state["loaded"] else active()
    if table is None:
        return None
    return table.lookup(op, shape)


def call_with(choice: Choice | None, fn, *args):
    """fn(*args) under the choice's thread count (never more threads than the caller allows)
    and, for the C++ kernel, its tile sizes (restored afterwards)."""
    if choice is None:
        return fn(*args)
    if choice.config is not None and choice.backend == "native" and args[0].device.type == "cuda":
        # The Triton GEMM's measured configuration, for this thread's launches in the call.
        from ..kernels.int8 import matmul_config

        kind, items = choice.config
        with matmul_config(kind, dict(items)):
            return fn(*args)
    if choice.tiles is not None and choice.backend == "native" and args[0].device.type == "cpu":
        with cpu_tiles(choice.tiles):
            return _with_threads(choice, fn, *args)
    return _with_threads(choice, fn, *args)


@contextlib.contextmanager
def cpu_tiles(tiles: tuple):
    """Within the block, this thread's C++ int8/ternary kernels use tiles (n_block, k_chunk)."""
    ext = _extension()
    previous = ext.set_cpu_tiles(*tiles)
    try:
        yield
    finally:
        ext.set_cpu_tiles(*previous)


def describe(winner: dict) -> str:
    """A table entry's choice in words: 'native x2', 'native x2 tiles 32/4096', ..."""
    text = f"{winner['backend']} x{winner['threads']}"
    if winner.get("tiles"):
        text += f" tiles {winner['tiles']['n_block']}/{winner['tiles']['k_chunk']}"
    if winner.get("config"):
        text += f" config {json.dumps(winner['config'], sort_keys=True)}"
    return text


def _with_threads(choice: Choice, fn, *args):
    if not choice.threads:
        return fn(*args)
    current = torch.get_num_threads()
    threads = min(choice.threads, current)
    if threads == current:
        return fn(*args)
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(current)


def _extension():
    from ._backend import extension

    module, why = extension()
    if module is None:
        raise RuntimeError(f"accelops: the dispatch table chose tile sizes of the C++ kernel, but {why}")
    return module
