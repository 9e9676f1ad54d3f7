"""Tuned dispatch: the backend, thread count and tile sizes of a call come from what was
measured on this machine for that op and shape, ahead of time by `accelops tune` or on
first use by the autotuner.

The table is a JSON file (`$ACCELOPS_DISPATCH_TABLE`, default
$XDG_CACHE_HOME/accelops/dispatch.json or ~/.cache/accelops/dispatch.json) holding one
table per machine fingerprint (see accelops/_machine.py). Each entry is one measured
(op, shape) with the winner among the candidates tried (on the CPU: "native", the C++
kernel, and "aten_int_mm", the same op with ATen's int8 GEMM for the sums, each at
several thread counts, "native" at the full count with each tile configuration
(n_block, k_chunk) of accelops.tune.TILE_GRID, and "reference"; on CUDA "native", the
Triton kernel, with its built-in configuration and with each of
accelops.kernels.int8.matmul_config_grid, and "reference").

Autotune (CPU; ACCELOPS_AUTOTUNE=0 turns it off): the first call of an op for a key
(op, M bucket, N, K, x dtype, torch threads) with no entry for that key measures the
candidates within a time budget (accelops.tune.measure_bounded; ACCELOPS_AUTOTUNE_BUDGET
seconds, default AUTOTUNE_BUDGET_S), uses the winner and merges it into the file (under
a file lock, atomic replace). M buckets are powers of two (3 -> 4, 33 -> 64) up to
MAX_BUCKET, above which one bucket holds every M (measured at M = MAX_BUCKET at most).
Never while torch.compile traces, on fake/meta/functorch-wrapped tensors, under a
dispatch or torch-function mode, or inside an autograd backward: there the cached choice
or the default is used. With autotune off, a key without an entry takes the winner of
the nearest measured shape in log2-shape space (same op), or the default (the kernel at
the caller's threads, its own tiles) when the op has no entry at all.

A file without a table for this machine, or unreadable, is ignored with one warning (and
replaced, merged, by the autotuner's first write); ACCELOPS_BACKEND still overrides
everything; ACCELOPS_TUNED=0 ignores the file and measures nothing; under torch.compile
the table is not consulted (the compiled graph keeps the default).

Cost per call (measured by bench/bench_dispatch.py): one dict lookup keyed by
(op, shape, dtype, threads) after the first call of a key.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_TABLE = "ACCELOPS_DISPATCH_TABLE"
ENV_DISABLE = "ACCELOPS_TUNED"  # "0": ignore any table, measure nothing
ENV_AUTOTUNE = "ACCELOPS_AUTOTUNE"  # "0": never measure on first use
ENV_AUTOTUNE_BUDGET = "ACCELOPS_AUTOTUNE_BUDGET"  # seconds of measuring per key
# Seconds of measuring per key on first use. The 12-13 CPU candidates of a 4096x4096 layer
# at M=512 take about 0.5 s for their warm-up calls alone on 2 cores; 1 s leaves the rest
# for interleaved rounds of the few that come within 1.5x of the fastest.
AUTOTUNE_BUDGET_S = 1.0
# M above this shares one bucket (measured at this M): GEMMs this tall all behave as large
# ones, and measuring at a huge M would cost seconds a call.
MAX_BUCKET = 2048
FORMAT_VERSION = 1
# The ops that consult the table, and the names of the shape dimensions they key it by.
TUNED_OPS = {
    "ternary_matmul": ("M", "N", "K"),
    "int8_linear": ("M", "N", "K"),
}
BACKEND_NAMES = ("native", "aten_int_mm", "reference")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# The Triton GEMM whose configuration (block sizes, warps, stages) a CUDA entry may set
# (accelops.kernels.int8.matmul_config).
TRITON_GEMM = {"ternary_matmul": "ternary", "int8_linear": "int8"}


def default_path() -> Path:
    env = os.environ.get(ENV_TABLE)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "accelops" / "dispatch.json"


def autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "1").strip() != "0"


def autotune_budget() -> float:
    value = os.environ.get(ENV_AUTOTUNE_BUDGET, "").strip()
    if not value:
        return AUTOTUNE_BUDGET_S
    try:
        budget = float(value)
    except ValueError:
        budget = -1.0
    if not (0 < budget < math.inf):
        raise ValueError(f"{ENV_AUTOTUNE_BUDGET} must be a positive number of seconds, got {value!r}")
    return budget


def bucket_m(m: int) -> int:
    """The M bucket of a call: the next power of two (0 for M=0), at most MAX_BUCKET."""
    if m <= 0:
        return 0
    return min(1 << (m - 1).bit_length(), MAX_BUCKET)


def entry_key(e: dict) -> tuple:
    """(op, M bucket, N, K, x dtype, threads, device) of a table entry: what one measurement
    stands for. Entries of `accelops tune` (no dtype: float32 inputs) have the same kind."""
    shape = e["shape"]
    return (
        e["op"],
        bucket_m(int(shape["M"])),
        int(shape["N"]),
        int(shape["K"]),
        e.get("dtype") or "float32",
        e.get("max_threads"),
        e.get("device") or "cpu",
    )


@dataclass(frozen=True)
class Choice:
    backend: str  # "native" (the registered kernel), "aten_int_mm" or "reference"
    threads: int | None  # torch threads for the call (None: leave as it is)
    predicted: bool = False  # True when taken from a neighbouring shape
    source: tuple | None = None  # the measured shape it came from
    tiles: tuple | None = None  # (n_block, k_chunk) of the C++ kernel ("native" only; None: its own)
    config: tuple | None = None  # (kind, sorted (key, value) pairs) of the Triton GEMM on CUDA


def _choice_of(e: dict) -> tuple[str, tuple, Choice]:
    """(op, shape, Choice) of a table entry; KeyError/ValueError/TypeError when malformed."""
    op = e["op"]
    if op not in TUNED_OPS:
        raise ValueError(f"op {op!r} is not a tuned op")
    shape = tuple(int(e["shape"][d]) for d in TUNED_OPS[op])
    w = e["winner"]
    if w["backend"] not in BACKEND_NAMES:
        raise ValueError(f"backend {w['backend']!r} is not one of {BACKEND_NAMES}")
    threads = w.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads {threads!r} is not a positive int")
    tiles = w.get("tiles")
    tiles = (int(tiles["n_block"]), int(tiles["k_chunk"])) if tiles else None
    config = w.get("config")
    config = (TRITON_GEMM[op], tuple(sorted((k, int(v)) for k, v in config.items()))) if config else None
    return op, shape, Choice(w["backend"], threads, False, shape, tiles, config)


class DispatchTable:
    """The measured entries of one machine: {op: {shape tuple: Choice}}, and the same by key
    (entry_key). With autotune set, a key with no entry is measured on its first call."""

    def __init__(self, entries: dict, fingerprint: str, path: Path | None = None, keyed=None, autotune=False):
        self.entries = entries
        self.fingerprint = fingerprint
        self.path = path
        self.keyed = dict(keyed or {})
        self.autotune = autotune
        self._logs = {
            op: [(shape, tuple(math.log2(max(1, d)) for d in shape)) for shape in shapes]
            for op, shapes in entries.items()
        }
        self._cache: dict = {}
        self._lock = threading.Lock()
        self._failed: set = set()  # keys whose measurement failed: not tried again
        self.measured: list[dict] = []  # the entries this process measured (autotune), in order

    @classmethod
    def from_json(cls, table: dict, fingerprint: str, path=None, autotune=False) -> "DispatchTable":
        entries: dict = {}
        keyed: dict = {}
        bad = []
        for i, e in enumerate(table.get("entries", [])):
            try:
                op, shape, choice = _choice_of(e)
                key = entry_key(e)
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                if isinstance(e, dict) and e.get("op") is not None and e.get("op") not in TUNED_OPS:
                    continue  # an op this version does not tune (a newer accelops wrote it)
                bad.append(f"entry {i}: {type(exc).__name__}: {exc}")
                continue
            entries.setdefault(op, {})[shape] = choice
            # A measurement by `accelops tune` (longer, more rounds) is kept over the
            # autotuner's for the same key.
            if key not in keyed or e.get("source") != "autotune":
                keyed[key] = choice
        if bad:
            warnings.warn(
                f"accelops: dispatch table {path or '(in memory)'}: {len(bad)} malformed entries ignored "
                f"({'; '.join(bad[:3])})",
                RuntimeWarning,
                stacklevel=3,
            )
        return cls(entries, fingerprint, path, keyed, autotune)

    def add(self, e: dict) -> Choice:
        """Install a measured entry (the autotuner's) -> its Choice."""
        op, shape, choice = _choice_of(e)
        with self._lock:
            self.entries.setdefault(op, {})[shape] = choice
            self._logs.setdefault(op, []).append((shape, tuple(math.log2(max(1, d)) for d in shape)))
            self.keyed[entry_key(e)] = choice
            self.measured.append(e)
            self._cache.clear()  # predictions made before may now have a nearer neighbour
        return choice

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

    def lookup(self, op: str, shape: tuple, args: tuple | None = None) -> Choice | None:
        """The choice for a call of op on shape (M, N, K) at the caller's torch thread count;
        args: the call's (x, weight, scale, bias), whose x gives the dtype and device (None:
        float32 on the CPU, and nothing to measure with)."""
        if args is None:
            key = (op, shape, torch.float32, torch.get_num_threads(), False)
        else:  # is_cuda: CPU and GPU calls of one shape have entries of their own
            key = (op, shape, args[0].dtype, torch.get_num_threads(), args[0].is_cuda)
        try:
            return self._cache[key]
        except KeyError:
            pass
        return self._resolve(key, args)

    def _resolve(self, key: tuple, args) -> Choice | None:
        op, shape, dtype, threads, _ = key
        x = None if args is None else args[0]
        device = "cpu" if x is None else x.device.type
        dname = DTYPE_NAMES.get(dtype, str(dtype))
        k = (op, bucket_m(shape[0]), shape[1], shape[2], dname, threads, device)
        choice = self.keyed.get(k) or self.keyed.get((*k[:5], None, device))
        if choice is None and self.autotune and device == "cpu" and k not in self._failed and shape[0] > 0:
            if args is None or measuring_blocked(args) is not None:
                return self.predict(op, shape)  # not cached: a later plain call measures
            choice = _autotune(self, k, shape, args)
        if choice is None:
            choice = self.predict(op, shape)
        with self._lock:
            if len(self._cache) > 65536:  # shapes without end (e.g. varying M): keep the cache bounded
                self._cache.clear()
            self._cache[key] = choice
        return choice


# --------------------------------------------------------------------------- autotune

_measuring = threading.local()
_measure_lock = threading.Lock()
_warned: set = set()


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def measuring_blocked(args: tuple) -> str | None:
    """Why a call with these tensors must not measure now (None: it may). Measuring runs
    the kernels many times on the call's tensors: under tracing, a mode or a transform
    those are fake, traced or wrapped, and the timings meaningless."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if getattr(_measuring, "active", False):
        return "already measuring"
    for t in args:
        if t is None:
            continue
        if type(t) is not torch.Tensor:
            return f"a tensor subclass ({type(t).__name__}: fake, functional or traced)"
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return "a torch.func transform is active"
        if t.device.type != "cpu":
            return f"a tensor on {t.device}"
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return "tracing"
    if _get_current_dispatch_mode() is not None:
        return "a TorchDispatchMode (fake tensors, tracing, profiling) is active"
    if torch._C._len_torch_function_stack() > 0:
        return "a TorchFunctionMode (e.g. a torch.device context) is active"
    if torch._C._current_graph_task_id() != -1:
        return "inside an autograd backward"
    return None


def _autotune(table: DispatchTable, key: tuple, shape: tuple, args: tuple) -> Choice | None:
    """Measure key's candidates (once per process: a thread that finds the measurement
    done by another waits for it and takes its result), persist the winner, return it."""
    op, _, n, k, dname, threads, _ = key
    with _measure_lock:
        done = table.keyed.get(key)
        if done is not None or key in table._failed:
            return done
        from ..tune import measure_bounded

        _measuring.active = True
        try:
            entry = measure_bounded(op, *args, max_threads=threads, budget_s=autotune_budget())
        except Exception as exc:  # noqa: BLE001 - a failed measurement falls back, never fails the call
            table._failed.add(key)
            _warn_once(
                f"fail:{op}",
                f"accelops.{op}: measuring the dispatch candidates for M={shape[0]} N={n} K={k} failed "
                f"({type(exc).__name__}: {exc}); using the default dispatch",
            )
            return None
        finally:
            _measuring.active = False
        choice = table.add(entry)
    if table.path is not None:
        try:
            merge_entries([entry], table.path)
        except OSError as exc:
            _warn_once(
                "write",
                f"accelops: could not write the dispatch table {table.path} ({exc}); measured choices "
                f"last only for this process (set {ENV_TABLE} to a writable file)",
            )
    return choice


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on path's sibling .lock file (held by one process at a time)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replace only
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def merge_entries(entries: list[dict], path=None) -> Path:
    """Merge `entries` into this machine's table in the file: under a file lock, read what
    is there (other machines' tables and other keys kept; an unreadable file is replaced),
    replace the entries of the same keys (entry_key), write a temporary file and rename it
    over the old one, so readers see the old file or the new one, never a half-written one,
    and two writers at once lose nothing."""
    from .._machine import machine_info

    path = Path(path) if path is not None else default_path()
    info = machine_info()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        data = {"format": FORMAT_VERSION, "tables": {}}
        try:
            old = json.loads(path.read_text())
            if old.get("format") == FORMAT_VERSION and isinstance(old.get("tables"), dict):
                data = old
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError):
            pass  # unreadable: replaced by a fresh one
        table = data["tables"].get(info["fingerprint"])
        if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
            table = data["tables"][info["fingerprint"]] = {"machine": {}, "entries": []}
        table["machine"] = {k: v for k, v in info.items() if k != "fingerprint"}
        table["torch"] = torch.__version__
        table["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def safe_key(e):
            try:
                return entry_key(e)
            except (KeyError, ValueError, TypeError, AttributeError):
                return None  # malformed: dropped

        new_keys = {entry_key(e) for e in entries}
        table["entries"] = [
            e for e in table["entries"] if (key := safe_key(e)) is not None and key not in new_keys
        ] + list(entries)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path


# --------------------------------------------------------------------------- the table in use

_state = {"loaded": False, "table": None}
_load_lock = threading.Lock()


def load(path=None, warn: bool = True, autotune: bool = False) -> DispatchTable | None:
    """Read the table file (None when it is missing, unreadable or for another machine;
    with autotune, an empty table of this machine then, to be filled by measuring)."""
    from .._machine import machine_info

    path = Path(path) if path is not None else default_path()
    here = machine_info()["fingerprint"]
    empty = DispatchTable({}, here, path, autotune=True) if autotune else None
    then = "measuring the candidates here on first use" if autotune else "using the default dispatch"
    if not path.exists():
        return empty
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"format {got!r}, expected {FORMAT_VERSION}")
        tables = data["tables"]
        if not isinstance(tables, dict):
            raise TypeError("'tables' is not an object")
        mine = tables.get(here)
        if mine is not None and not isinstance(mine, dict):
            raise TypeError("this machine's table is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if warn:
            warnings.warn(
                f"accelops: dispatch table {path} is unreadable ({exc}); {then}", RuntimeWarning, stacklevel=3
            )
        return empty
    if mine is None:
        if warn:
            others = ", ".join(sorted(tables)) or "none"
            warnings.warn(
                f"accelops: dispatch table {path} holds no table for this machine (fingerprint {here}; "
                f"it has {others}): ignored, {then}" + ("" if autotune else "; run `accelops tune` here"),
                RuntimeWarning,
                stacklevel=3,
            )
        return empty
    return DispatchTable.from_json(mine, here, path, autotune=autotune)


def active() -> DispatchTable | None:
    """The table of this process, read once on first use."""
    if not _state["loaded"]:
        with _load_lock:
            if not _state["loaded"]:
                if os.environ.get(ENV_DISABLE, "1") == "0":
                    _state["table"] = None
                else:
                    autotune = autotune_enabled()
                    if autotune:
                        autotune_budget()  # a bad budget raises here, naming the variable
                    _state["table"] = load(autotune=autotune)
                _state["loaded"] = True
    return _state["table"]


def reset(table: DispatchTable | None = None, loaded: bool = False) -> None:
    """Forget the process's table (re-read on next use), or install `table` (tests, tune)."""
    _state["table"] = table
    _state["loaded"] = loaded or table is not None


def choice_for(op: str, device: torch.device, shape: tuple, args: tuple | None = None) -> Choice | None:
    """The tuned choice for this call (args: its x, weight, scale, bias), or None for the default dispatch.
    Callers ask only when ACCELOPS_BACKEND did not force the backend
    (_backend.choose_and_forced). The first call of a key may measure (autotune)."""
    if device.type != "cpu" and device.type != "cuda":
        return None
    # Before active(): dynamo cannot trace its lock, so a process whose first accelops call
    # was inside torch.compile failed with "Unsupported context manager".
    if torch.compiler.is_compiling():
        return None
    table = _state["table"] if _state["loaded"] else active()
    if table is None:
        return None
    return table.lookup(op, shape, args)


def _autograd_not_needed(args: tuple) -> bool:
    """True when no input of the call can need a gradient, so the op's autograd kernel may be
    skipped. That kernel is Python (torch.library.register_autograd) and costs ~4.7 us a call
    even when it only forwards, twice the ternary GEMV's own time on a small layer. Plain
    tensors only: a subclass, a torch.func transform or tracing keeps the full dispatch."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if a is None:
            continue
        if type(a) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(a):
            return False
        if grad and a.requires_grad:
            return False
    return True


def call_with(choice: Choice | None, fn, *args):
    """fn(*args) under the choice's thread count (never more threads than the caller allows)
    and, for the C++ kernel, its tile sizes (restored afterwards). Below the autograd keys
    when no input needs a gradient (same kernels, same result; see _autograd_not_needed)."""
    if _autograd_not_needed(args):
        with torch._C._AutoDispatchBelowAutograd():
            return _call_with(choice, fn, *args)
    return _call_with(choice, fn, *args)


def _call_with(choice: Choice | None, fn, *args):
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
