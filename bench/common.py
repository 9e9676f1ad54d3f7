"""Shared measuring and recording for every bench_<family>.py.

Every family times the same way (warm-up, then adaptive repeats, median with p20/p80,
cold weights: see Timer), records the same metadata (machine, versions, git commit,
thread count) and appends one JSON object a row to <results-dir>/<family>.jsonl, so rows
from different runs, machines and families can be compared side by side. When a family
finishes, its rows of the run are also stored in the results database
(<results-dir>/accelops.duckdb, see accelops.results) in one transaction.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import io
import itertools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch._inductor.config

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
CUDA_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MB)

# Inductor compiles in one process instead of starting a worker pool: on a 2-core machine
# the pool's start-up alone took ~13 s of the first compile, and the bench's graphs are
# small. Only compile latency changes, not the generated code that is timed.
torch._inductor.config.compile_threads = 1


# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    threads: list[int]
    quick: bool = False
    results_dir: Path = DEFAULT_RESULTS_DIR
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    budget_s: float = 1.0  # seconds of timed repeats per row (L2 flushes included)
    warmup_s: float = 0.2  # extra warm-up for fast calls, after the two untimed calls
    min_repeats: int = 3  # p20/p80 need a few samples even when one call takes seconds
    slow_s: float = 2.0  # a call this long is timed with as few calls as possible
    max_repeats: int = 1000
    flush: bool = True  # cold weights: L2 flush on CUDA, rotating weight copies on CPU
    ms: list[int] | None = None  # --m: override a family's row counts
    shapes: list[tuple[int, int]] | None = None  # --shapes: override a family's (N, K)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    db: Path | None = None  # --db; None: <results-dir>/accelops.duckdb (accelops_quick.duckdb with --quick)
    store_db: bool = True  # --no-db: JSON lines only

    def results_file(self, family: str) -> Path:
        # --quick rows go to their own file so smoke runs never mix into the real results.
        return self.results_dir / (f"{family}_quick.jsonl" if self.quick else f"{family}.jsonl")

    def database_file(self) -> Path:
        if self.db is not None:
            return self.db
        return self.results_dir / ("accelops_quick.duckdb" if self.quick else "accelops.duckdb")

    def summary_file(self, family: str) -> Path:
        return self.results_dir / (f"{family}_summary_quick.md" if self.quick else f"{family}_summary.md")


def _int_list(text: str) -> list[int]:
    """'1,2' -> [1, 2] (for --threads and --m)."""
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, e.g. 1,2, got {text!r}")
    return counts


def _shape_list(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes takes NxK[,NxK...], e.g. 4096x4096, got {text!r}")
    return shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and few repeats (smoke test, CI); rows go to <family>_quick.jsonl",
    )
    parser.add_argument(
        "--threads",
        type=_int_list,
        default=[2],
        help="torch thread count(s), e.g. 2 or 1,2: the suite runs once per count (default 2)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help=f"where rows are appended and summaries written (default {DEFAULT_RESULTS_DIR})",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when a GPU is present, else cpu"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of timed repeats per row (default 1.0, 0.05 with --quick)"
    )
    parser.add_argument(
        "--m",
        type=_int_list,
        default=None,
        metavar="M[,M...]",
        help="only these row counts M (default: the family's own)",
    )
    parser.add_argument(
        "--shapes",
        type=_shape_list,
        default=None,
        metavar="NxK[,NxK...]",
        help="only these weight shapes, N=out_features x K=in_features (default: the family's own)",
    )
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="results database the run is stored in (default <results-dir>/accelops.duckdb; "
        "accelops_quick.duckdb with --quick)",
    )
    parser.add_argument("--no-db", action="store_true", help="append JSON lines only, store nothing in the database")
    parser.add_argument(
        "--no-flush", action="store_true", help="hot caches: no L2 flush (CUDA), no rotating weight copies (CPU)"
    )


def config_from_args(args: argparse.Namespace) -> Config:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
        device = torch.device(args.device)
    cfg = Config(
        threads=args.threads,
        quick=args.quick,
        results_dir=args.results_dir,
        device=device,
        flush=not args.no_flush,
        ms=args.m,
        shapes=args.shapes,
        db=getattr(args, "db", None),
        store_db=not getattr(args, "no_db", False),
    )
    if args.quick:
        cfg.budget_s, cfg.warmup_s, cfg.max_repeats = 0.05, 0.01, 10
    if args.budget is not None:
        cfg.budget_s = args.budget
    return cfg


@dataclass
class FamilyResult:
    family: str
    summary: str  # markdown, printed and written to <family>_summary.md
    rows: list[dict]
    failures: list[str] = field(default_factory=list)  # accelops rows that are wrong or crashed


# --------------------------------------------------------------------------- quiet imports


@contextlib.contextmanager
def quiet_stderr():
    """Silence fd 2 (C++ libraries print there directly, past Python's logging)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def import_torchao():
    """-> (torchao module or None, why not). torchao's import logs that its CUDA libraries
    fail to load on CPU-only torch and torch warns about its Enum registration: noise here."""
    quiet = ["torchao", "torch.utils._pytree"]
    levels = {name: logging.getLogger(name).level for name in quiet}
    try:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), quiet_stderr():
            warnings.simplefilter("ignore")
            import torchao
            import torchao.quantization  # noqa: F401
        # Emitted later, at compile time, for every torchao tensor subclass.
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
        return torchao, None
    except Exception as exc:  # ImportError, or a broken build raising something else
        return None, f"torchao not importable: {type(exc).__name__}: {exc}"
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# --------------------------------------------------------------------------- metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import accelops

    return {
        "accelops": accelops.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchao": _version("torchao"),
        "python": platform.python_version(),
    }


def _cache_size(text: str) -> int:
    """sysfs cache size ("32768K", "1M", "512") -> bytes."""
    text = text.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def _l3_bytes() -> int | None:
    """One L3 instance's size, as cpu0 sees it."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                return _cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    return None


def _l3_total_bytes() -> int | None:
    """All L3 instances of the machine together (each CCD / socket has its own; one shared by
    several CPUs counted once), or None where sysfs does not say."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index*"):
        try:
            if (index / "level").read_text().strip() == "3":
                sizes[(index / "shared_cpu_list").read_text().strip()] = _cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    return sum(sizes.values()) or None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def machine(device: torch.device) -> dict:
    import accelops
    from accelops.results import machine_info

    info = accelops.info(file=io.StringIO())  # the public info, without its printout
    described = machine_info()
    return {
        "cpu_model": info.get("cpu_model"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "l3_bytes": _l3_bytes(),
        "l3_total_bytes": _l3_total_bytes(),
        "accelops_cpu_isa": info.get("cpu_isa"),
        "cpu_features": info.get("cpu_features"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "memory_bytes": described["memory_bytes"],
        "gpu_driver": described["gpu_driver"],
        "fingerprint": described["fingerprint"],
    }


def git_state() -> dict:
    def git(*args):
        # --no-optional-locks: do not refresh the index, so the bench never writes to .git
        # while others work in the same checkout.
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit = status = None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


ENV_RECORDED = (
    "THP_MEM_ALLOC_ENABLE",
    "OMP_NUM_THREADS",
    "ACCELOPS_BACKEND",
    "ACCELOPS_CPU_ISA",
    # the dispatch table and the autotuner decide the tuned ops' path (accelops/ops/_tuning.py)
    "ACCELOPS_AUTOTUNE",
    "ACCELOPS_AUTOTUNE_BUDGET",
    "ACCELOPS_TUNED",
    "ACCELOPS_DISPATCH_TABLE",
    "MALLOC_MMAP_THRESHOLD_",
    "LD_PRELOAD",
)


def run_metadata(cfg: Config) -> dict:
    """Fields shared by every row of a run."""
    return {
        "run_id": cfg.run_id,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        "device": cfg.device.type,
        "machine": machine(cfg.device),
        "versions": versions(),
        "quick": cfg.quick,
        # settings that change what is measured (THP_MEM_ALLOC_ENABLE=1 gives torch's own
        # allocations huge pages, as accelops' memory-bound kernels ask for theirs)
        "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
    }


def non_finite_fields(value, name: str = "") -> list[str]:
    """The paths (e.g. "curve.median[3]") of the NaN and infinite floats in a row."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [name]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_fields(v, f"{name}.{k}" if name else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite_fields(v, f"{name}[{i}]")]
    return []


def append_row(path: Path, row: dict) -> None:
    """Rows are appended as each one finishes: an interrupted run keeps what it measured.

    A NaN or infinite value is refused (ValueError naming the fields): json.dumps would
    write it as NaN/Infinity, which is no JSON, and every comparison with it is false, so a
    NaN median would pass the regression check. A value that is undefined on purpose is
    written as null, with the reason in a field of its own (bench_hpo's regret curves)."""
    bad = non_finite_fields(row)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"{path}: {row.get('family')} row ({row.get('label') or row.get('method')}) not written: "
            f"NaN or infinite value in {shown}; write null with the reason instead"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(row, allow_nan=False) + "\n"  # the check above, again, for any type it missed
    with open(path, "a") as f:
        f.write(text)


# --------------------------------------------------------------------------- timing


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Timer:
    """Times one callable: a few warm-up calls, then repeats sized to a time budget.

    Cold weights, hot code. On CUDA, L2 is flushed before every timed repeat (256 MB
    written; events time the kernels only). On CPU a cache sweep would also evict the
    interpreter and dispatcher (a 10-element add_ took 117 us after a 64 MB sweep instead of
    ~3 us), which would swamp the M=1 times; so the CPU callables rotate through copies of
    their weights instead (`copies_for`, `rotating`): each call reads weights that have not
    been touched for >= max(2x the machine's L3, 1 GiB) of traffic, as every layer of a model
    does, while code stays hot.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = cfg.device
        self.cuda = cfg.device.type == "cuda"
        self.flush_bytes = CUDA_FLUSH_BYTES if (cfg.flush and self.cuda) else 0
        self._buf = None
        if self.flush_bytes:
            self._buf = torch.empty(self.flush_bytes, dtype=torch.uint8, device=self.device)
        self.flush()  # first touch outside any measurement
        self.flush_s = self._wall(self.flush)

    def flush(self) -> None:
        if self._buf is not None:
            self._buf.zero_()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _wall(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def once(self, fn) -> float:
        """Seconds for one call: CUDA events on the GPU, perf_counter on the CPU."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def measure(self, fn, previous_s: float) -> dict:
        """Warm-up, then timed repeats. `previous_s`: how long the last untimed call took
        (the memory-measuring one, made after a first, possibly compiling, call).

        A call of `slow_s` or more (torch._int_mm on a CPU takes tens of seconds at M=512)
        gets no further warm-up and that previous call counts as its first repeat, so such
        a row costs min_repeats + 1 calls in all; its malloc_trim'd start adds page faults
        worth well under 1% of such a call.
        """
        cfg = self.cfg
        times, warm_calls, est = [], 0, previous_s
        if previous_s >= cfg.slow_s:
            times.append(previous_s)
        else:
            spent = previous_s
            while spent < cfg.warmup_s and warm_calls < 50:
                est = self.once(fn)
                spent += est
                warm_calls += 1
        repeats = int(cfg.budget_s / max(est + self.flush_s, 1e-9))
        repeats = max(cfg.min_repeats, min(cfg.max_repeats, repeats))
        while len(times) < repeats:
            self.flush()
            self.sync()
            times.append(self.once(fn))
        times.sort()
        return {
            "median_us": percentile(times, 0.5) * 1e6,
            "p20_us": percentile(times, 0.2) * 1e6,
            "p80_us": percentile(times, 0.8) * 1e6,
            "min_us": times[0] * 1e6,
            "repeats": repeats,
            "extra_warmup_calls": warm_calls,
            "memory_call_timed": previous_s >= cfg.slow_s,
        }


# Cold weights on the CPU: between two reads of one weight copy, at least this much other
# data is read. 2x the machine's whole L3 (all instances: a 2-socket Xeon reports 480 MiB), and
# never less than 1 GiB, so that no cache level or memory-side cache of any machine the bench
# runs on can still hold the copy.
COLD_MIN_BYTES = 1 << 30
COLD_L3_FACTOR = 2
COLD_MEMORY_SHARE = 16  # the rotating copies of one weight take at most 1/16 of the memory
COLD_MAX_COPIES = 4096  # tiny weights: Python-side overhead per copy, and they are not memory bound
QUICK_MAX_COPIES = 64  # --quick: tiny shapes, smoke test only


def cold_target_bytes(cfg: Config) -> int:
    """Bytes that must pass between two reads of one weight copy (0: not cold, --no-flush or
    CUDA, which flushes its L2 instead)."""
    if cfg.device.type != "cpu" or not cfg.flush:
        return 0
    return max(COLD_MIN_BYTES, COLD_L3_FACTOR * (_l3_total_bytes() or _l3_bytes() or (32 << 20)))


def copies_for(cfg: Config, weight_bytes: int) -> int:
    """How many copies of a weight the CPU callables rotate through, so that >=
    cold_target_bytes pass between two reads of one copy: ceil(target / weight bytes),
    at least 2, capped at 1/COLD_MEMORY_SHARE of the machine's memory (and COLD_MAX_COPIES,
    QUICK_MAX_COPIES with --quick). Rows record what they got (`cold_bytes`, see cold_fields)."""
    target = cold_target_bytes(cfg)
    if not target:
        return 1
    weight_bytes = max(weight_bytes, 1)
    copies = -(-target // weight_bytes)
    memory = _memory_bytes()
    if memory:
        copies = min(copies, memory // COLD_MEMORY_SHARE // weight_bytes)
    return max(2, min(QUICK_MAX_COPIES if cfg.quick else COLD_MAX_COPIES, copies))


def cold_fields(cfg: Config, weight_bytes: int | None, copies: int) -> dict:
    """What a row records about its cold weights: the copies rotated, the bytes they hold
    (what passes between two reads of one copy, the copy itself included) and the target."""
    target = cold_target_bytes(cfg)
    rotated = (weight_bytes or 0) * copies
    return {
        "weight_copies": copies,
        "cold_bytes": rotated,
        "cold_target_bytes": target,
        "cold": bool(target) and rotated >= target,
    }


def through_table(fn, table):
    """fn consulting dispatch table `table` (accelops tune's); afterwards the process has
    none, so calls outside it take the fixed default dispatch."""
    from accelops.ops import _tuning

    def call():
        _tuning.reset(table)
        try:
            return fn()
        finally:
            _tuning.reset(None, loaded=True)

    return call


def rotating(fns: list):
    """One callable that calls fns[0], fns[1], ... in turn (one per weight copy)."""
    if len(fns) == 1:
        return fns[0]
    it = itertools.cycle(fns)
    return lambda: next(it)()


# --------------------------------------------------------------------------- memory

_libc = None


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


MEMORY_METHODS = {
    "unavailable": "not measured: /proc/self/clear_refs is not writable here",
    "rss_hwm_delta": (
        "growth of resident memory during one call: VmHWM - VmRSS (Linux /proc/self/status) after "
        "resetting the high-water mark (clear_refs 5) and returning freed heap pages to the OS "
        "(malloc_trim); counts every allocator (torch, the C++ kernels' own buffers, MKL/oneDNN, "
        "compiled code) including the output, but not memory a library keeps cached from earlier calls"
    ),
    "cuda_max_allocated_delta": (
        "torch.cuda.max_memory_allocated during one call minus memory_allocated before it (output included)"
    ),
}


def peak_memory(fn, timer: Timer) -> tuple[int | None, str, float]:
    """-> (peak bytes beyond what was in use before the call, a MEMORY_METHODS key, seconds)."""
    if timer.cuda:
        timer.sync()
        torch.cuda.reset_peak_memory_stats(timer.device)
        base = torch.cuda.memory_allocated(timer.device)
        t0 = time.perf_counter()
        out = fn()
        timer.sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(timer.device) - base
        del out
        return peak, "cuda_max_allocated_delta", seconds
    if not _can_reset_hwm():
        seconds = timer._wall(fn)
        return None, "unavailable", seconds
    # No gc.collect(): tensors are freed by reference counting, and a full collection
    # costs ~0.3 s once torch.compile has run.
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _proc_status_kib("VmHWM") - base
    del out
    return max(peak, 0) * 1024, "rss_hwm_delta", seconds


def time_call(call, timer: Timer) -> dict:
    """One row's measurements of `call`: the first call's time, peak memory, then the
    timer's repeats (median, p20/p80, ...)."""
    row = {}
    timer.sync()
    start = time.perf_counter()
    call()
    timer.sync()
    row["first_call_s"] = time.perf_counter() - start
    peak, how, seconds = peak_memory(call, timer)
    row["peak_mem_bytes"], row["peak_mem_method"] = peak, how
    row.update(timer.measure(call, seconds))
    return row


def tensor_bytes(*tensors) -> int:
    """Storage bytes, looking inside tensor subclasses (torchao's quantized weights)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            total += tensor_bytes(*(getattr(t, n) for n in names))
        else:
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- formatting


def fmt_time(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1e3:
        return f"{us:.3g} us"
    if us < 1e6:
        return f"{us / 1e3:.3g} ms"
    return f"{us / 1e6:.3g} s"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1 << 20:
        return f"{n / 1024:.3g} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.3g} MiB"
    return f"{n / (1 << 30):.3g} GiB"


def run_header(
    family: str, meta: dict, cfg, threads: int, wall_s: float, versions=("torch", "triton", "python")
) -> list[str]:
    """The first lines of a family's summary for one thread count: a heading, then the
    machine, versions, commit, date and run id of the rows."""
    mach, ver = meta["machine"], meta["versions"]
    commit = (meta["git_commit"] or "unknown")[:10] + (" (uncommitted changes)" if meta["git_dirty"] else "")
    libs = ", ".join(f"{name} {ver.get(name)}" for name in versions)
    return [
        f"### {family}, {threads} thread{'s' if threads > 1 else ''}, {cfg.device.type}"
        + (" (--quick: tiny shapes, not comparable)" if cfg.quick else ""),
        "",
        f"{mach['gpu'] or mach['cpu_model']}, {mach['cpu_count']} cores, torch threads {threads}; accelops CPU "
        f"ISA {mach['accelops_cpu_isa']}. accelops {ver['accelops']} at {commit}, {libs}. {meta['date']}, "
        f"run {meta['run_id']}, {wall_s / 60:.1f} min.",
        "",
    ]


def memory_note(rows: list[dict]) -> list[str]:
    """The summary's closing line on how peak memory was measured (none if it was not)."""
    how = next((r["peak_mem_method"] for r in rows if r.get("peak_mem_method")), None)
    return [f"Peak memory: {MEMORY_METHODS[how]}.", ""] if how else []


def thp_note(meta: dict) -> str:
    return f"{'SET' if meta.get('env', {}).get('THP_MEM_ALLOC_ENABLE') == '1' else 'not set'}"


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def family_main(doc: str, run, argv=None) -> int:
    """The command line of one bench_<family>.py run on its own: common flags, run, report."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    return report(cfg, [run(cfg)])


def report(cfg: Config, results: list[FamilyResult]) -> int:
    """Write each family's summary, print it, and list accelops rows that failed.
    -> exit status: 1 when an accelops kernel was wrong or crashed (its timing is void)."""
    failures = []
    for result in results:
        path = cfg.summary_file(result.family)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.summary)
        print(result.summary)
        print(f"rows appended to {cfg.results_file(result.family)}; summary written to {path}")
        failures += result.failures
        if cfg.store_db:
            failures += store_in_database(cfg, result.family)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


def store_in_database(cfg: Config, family: str) -> list[str]:
    """Store this run's rows of `family` (read back from its JSON-lines file, which holds
    everything the family appended, subprocess rows included) in the results database
    -> failures. The JSON lines stay the crash-safe record: a failed store loses nothing
    and `accelops results import` can repeat it."""
    from accelops.results import ResultsDB

    path = cfg.results_file(family)
    rows, where = [], []
    if path.exists():
        with open(path) as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("run_id") == cfg.run_id and row.get("family") == family:
                    rows.append(row)
                    where.append(f"{path}:{number}")  # a refused row is named by its line
    if not rows:
        return []
    db = ResultsDB(cfg.database_file())
    try:
        stored = db.write_rows(rows, where=where)
    except Exception as exc:  # noqa: BLE001 - reported as a failure of the run, rows kept in JSON lines
        return [
            f"{family}: rows not stored in {db.path}: {type(exc).__name__}: {exc} "
            f"(they are in {path}; `accelops results import --db {db.path} {path}` stores them)"
        ]
    print(f"{stored['measurements']} {family} rows stored in {db.path} (run {cfg.run_id})")
    return []
