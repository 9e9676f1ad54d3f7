"""`accelops tune`: measure every backend and thread count of the tuned ops on this
machine for a set of shapes, and write the dispatch table that accelops.ops consults
(accelops/ops/_tuning.py).

Candidates per (op, shape): the registered kernel ("native": the C++ kernel on CPU) at
1..T torch threads (T = torch.get_num_threads() when tuning); on the CPU also the same op
with ATen's int8 GEMM computing the sums ("aten_int_mm": torch._int_mm, oneDNN on x86;
the accelops quantization and epilogue around it) at 1..T threads; and the pure-PyTorch
reference at T threads. "aten_int_mm" is only eligible where its result equals the
kernel's bit for bit on random and extreme inputs of the shape (exactness_failure): on
x86 without VNNI oneDNN's int8 GEMM may saturate int16 pair sums, and a table must never
change a result. The C++ kernel at T threads is also timed with each tile configuration
of TILE_GRID (columns per parallel task, K per pass; set per call through
accelops._C.set_cpu_tiles, result unchanged). On CUDA (`--device cuda`) the candidates
are the native (Triton) kernel with its built-in configuration and with each of
accelops.kernels.int8.matmul_config_grid (block sizes, GROUP_M, warps, stages; a
configuration that fails to launch or changes the result is excluded), and the
reference; the table's configuration is set around the call with matmul_config. (No GPU
has been lent to this project: the CUDA search is tested under the Triton interpreter
only, never timed on a GPU.) Timing: candidates are measured in interleaved
rounds (one batch of calls each per round, so a change of machine load hits them all
alike), median and p20/p80 over the batches. The winner is the fastest median, except
that the default (native at T threads) is kept unless another candidate beats it by
more than `margin` (2%): a table should not flip choices on noise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from . import ops
from ._machine import machine_info
from .ops import _tuning
from .ops._tuning import TUNED_OPS
from .reference import int8 as int8_ref
from .reference import ternary as ternary_ref

# The matmul benchmark's shapes (bench/bench_matmul.py) and two small layers where the
# fork/join of a second thread costs more than it brings.
BENCH_SHAPES = [
    {"op": op, "M": m, "N": n, "K": k}
    for op in ("ternary_matmul", "int8_linear")
    for (n, k) in ((256, 256), (1024, 1024), (4096, 4096), (11008, 4096), (4096, 11008))
    for m in (1, 32, 512)
]


# Tile configurations (n_block, k_chunk) of the C++ kernels tried at the full thread count
# (0: the kernel's own choice; see CpuTiles in csrc/cpu/kernels.h): columns per parallel
# task (load balance across threads, weight rows kept in L2) and K per pass (activation
# slice kept in L1). Measured on the bench shapes, the kernels' defaults were within 5% of
# the best of these on most shapes and 10-15% behind on a few large GEMMs.
TILE_GRID = [(nb, kc) for nb in (16, 32, 64, 128) for kc in (0, 4096)]
INT_MM_OPS = {"ternary_matmul": "ternary_matmul_int_mm", "int8_linear": "int8_linear_int_mm"}


def _weights(op: str, w: torch.Tensor):
    if op == "ternary_matmul":
        return ops.quantize_weight_ternary(w)
    if op == "int8_linear":
        return ops.quantize_weight_int8(w)
    raise ValueError(f"op must be one of {sorted(TUNED_OPS)}, got {op!r}")


def _candidate_fns(op: str, x, wq, ws, bias=None) -> dict:
    """backend -> a call of that backend on these inputs."""
    fns = {
        "native": lambda: getattr(torch.ops.accelops, op)(x, wq, ws, bias),
        "reference": lambda: getattr(ternary_ref if op == "ternary_matmul" else int8_ref, op)(x, wq, ws, bias),
    }
    if x.device.type == "cpu" and hasattr(torch.ops.accelops, INT_MM_OPS[op]):
        fns["aten_int_mm"] = lambda: getattr(torch.ops.accelops, INT_MM_OPS[op])(x, wq, ws, bias)
    return fns


def _inputs(op: str, shape: dict, seed: int = 0, device="cpu") -> dict:
    """backend -> a call on random inputs of this shape (the timed candidates)."""
    g = torch.Generator().manual_seed(seed)
    m, n, k = shape["M"], shape["N"], shape["K"]
    x = torch.randn(m, k, generator=g).to(device)
    w = torch.randn(n, k, generator=g).to(device)
    return _candidate_fns(op, x, *_weights(op, w))


def exactness_failure(op: str, shape: dict, backend: str) -> str | None:
    """Why `backend` may not stand in for the kernel at this shape, or None when its result
    equals the kernel's bit for bit on random inputs and on the extreme ones: every
    activation and weight at the int8 (or ternary) limit with one sign, and alternating
    signs, where a GEMM that sums int8 pairs in saturating int16 (vpmaddubsw, as oneDNN
    does on x86 without VNNI) or accumulates in fewer than 32 bits goes wrong."""
    m, n, k = shape["M"], shape["N"], shape["K"]
    g = torch.Generator().manual_seed(1)
    signs = torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0)
    cases = [
        (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)),
        (torch.ones(m, k), torch.ones(n, k)),
        (-torch.ones(m, k), torch.ones(n, k)),
        (signs.expand(m, k).clone(), -signs.expand(n, k).clone()),
    ]
    for i, (x, w) in enumerate(cases):
        fns = _candidate_fns(op, x, *_weights(op, w))
        if backend not in fns:
            return f"{backend} is not available here"
        try:
            got, want = fns[backend](), fns["native"]()
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is not eligible
            return f"{backend} failed: {type(exc).__name__}: {exc}"
        if not torch.equal(got, want):
            what = ("random inputs", "all +1 x +1", "all -1 x +1", "alternating signs")[i]
            return f"{backend} differs from the kernel on {what} (max |diff| {(got - want).abs().max().item():.3g})"
    return None


def _time_batch(fn, calls: int, sync=None) -> float:
    if sync:
        sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync:
        sync()  # CUDA launches return before the kernel ran
    return (time.perf_counter() - start) / calls


def _percentile(values, q):
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure(
    op: str,
    shape: dict,
    max_threads: int | None = None,
    budget_s: float = 0.3,
    rounds: int = 7,
    margin: float = 0.02,
    device: str = "cpu",
) -> dict:
    """Time every candidate for one op and shape on `device` ("cpu" or "cuda") -> the table entry."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("accelops tune --device cuda: torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"accelops tune: device must be cpu or cuda, got {device}")
    max_threads = max_threads or torch.get_num_threads()
    fns = _inputs(op, shape, device=device)
    excluded = {}
    if "aten_int_mm" in fns:
        why = exactness_failure(op, shape, "aten_int_mm")
        if why:
            excluded["aten_int_mm"] = why
            del fns["aten_int_mm"]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    # (backend, threads, tiles, config, fn); the default is the first: native, no tiles or config.
    if device.type == "cpu":
        threaded = [b for b in ("native", "aten_int_mm") if b in fns]
        candidates = [(b, t, None, None, fns[b]) for b in threaded for t in range(1, max_threads + 1)]
        # The default first: the kernel at the full thread count, its own tiles.
        candidates.sort(key=lambda c: c[0] != "native" or c[1] != max_threads)
        # The kernel's tile sizes at the full thread count (where they decide how the columns
        # split between threads and how much of K a pass keeps in cache).
        candidates += [("native", max_threads, tiles, None, _with_tiles(fns["native"], tiles)) for tiles in TILE_GRID]
        candidates.append(("reference", max_threads, None, None, fns["reference"]))
    else:
        candidates = [("native", None, None, None, fns["native"])]
        candidates += _triton_configs(op, shape, fns["native"], excluded)
        candidates.append(("reference", None, None, None, fns["reference"]))
    before = torch.get_num_threads()
    samples = {i: [] for i in range(len(candidates))}
    calls = {}
    try:
        for i, (_, threads, _, _, fn) in enumerate(candidates):  # warm-up, and a batch size per candidate
            torch.set_num_threads(threads or before)
            fn()
            one = _time_batch(fn, 1, sync)
            calls[i] = max(1, int(budget_s / rounds / max(one, 1e-7)))
        fastest_one = min(_time_batch(c[4], 1, sync) for c in candidates if c[0] != "reference")
        for _ in range(rounds):
            for i, (backend, threads, _, _, fn) in enumerate(candidates):
                if backend == "reference" and samples[i] and samples[i][0] > 3 * fastest_one:
                    continue  # far slower: a few samples say so, more would only cost time
                torch.set_num_threads(threads or before)
                samples[i].append(_time_batch(fn, calls[i], sync))
    finally:
        torch.set_num_threads(before)
    results = []
    for i, (backend, threads, tiles, config, _) in enumerate(candidates):
        us = [s * 1e6 for s in samples[i]]
        results.append(
            {
                "backend": backend,
                "threads": threads,
                "tiles": _tiles_json(tiles),
                "config": config,
                "median_us": _percentile(us, 0.5),
                "p20_us": _percentile(us, 0.2),
                "p80_us": _percentile(us, 0.8),
                "samples": len(us),
            }
        )
    default = results[0]
    fastest = min(results, key=lambda r: r["median_us"])
    winner = fastest if fastest["median_us"] < default["median_us"] * (1 - margin) else default
    dims = TUNED_OPS[op]
    return {
        "op": op,
        "shape": {d: shape[d] for d in dims},
        "max_threads": max_threads,
        "device": device.type,
        "winner": {
            "backend": winner["backend"],
            "threads": winner["threads"],
            "tiles": winner["tiles"],
            "config": winner["config"],
        },
        "default_us": default["median_us"],
        "winner_us": winner["median_us"],
        "candidates": results,
        "excluded": excluded,
    }


# The autotuner's measurement on first use (measure_bounded). The reference is a candidate
# only up to this many multiply-adds: above it the kernels win by orders of magnitude and
# one reference call would eat the budget.
AUTOTUNE_REFERENCE_MACS = 1 << 22
# After one timed call each, candidates slower than this factor of the fastest are dropped:
# they cannot win, and their calls would take the rounds' time from the close ones.
AUTOTUNE_PRUNE = 1.5
AUTOTUNE_ROUNDS = 5
# The autotuner checks ATen's GEMM for exactness on at most this many output columns: what
# can go wrong (int16 pair sums that saturate, short accumulators) depends on K and on the
# instructions of the GEMM's kernel, not on how many columns it computes, and the check at
# the full N of a 4096x4096 layer cost 4-11 s on a busy 2-core machine (4 quantizations
# of the weight, 8 calls at M=512).
AUTOTUNE_EXACT_MAX_N = 256


def _thread_steps(max_threads: int) -> list[int]:
    """1, 2, 4, ... below max_threads, and max_threads (all of 1..T would be 2T candidates)."""
    return sorted({max_threads, *(1 << i for i in range(max_threads.bit_length()) if (1 << i) < max_threads)})


def measure_bounded(
    op: str,
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_threads: int | None = None,
    budget_s: float = 1.0,
    margin: float = 0.02,
) -> dict:
    """The autotuner's measurement (accelops/ops/_tuning.py): the candidates of `measure`
    on the CPU within about budget_s seconds, called on the first call's own inputs (x
    [..., K], its weight, scale and bias; x's first MAX_BUCKET rows at most, so nothing
    is allocated but the outputs) -> a table entry (with "source": "autotune").

    Candidates, in this order: the default (the kernel at max_threads, its own tiles), ATen's
    int8 GEMM and the kernel at 1, 2, 4, ... threads up to max_threads, the kernel with each
    tile configuration of TILE_GRID, and the reference on small shapes. Each gets a warm-up
    and one timed call, in order: the kernel and ATen's GEMM at every thread count always,
    the rest until the budget is spent (those left are listed as skipped); those within AUTOTUNE_PRUNE of the fastest then share what is left of it in
    AUTOTUNE_ROUNDS interleaved rounds (at most ten rounds' worth of single calls, so a small
    layer is done in a fraction of the budget). The winner is the fastest median unless the
    default is within `margin`; ATen's GEMM wins only after exactness_failure found it exact
    at the call's M and K (on at most AUTOTUNE_EXACT_MAX_N columns; checked then, outside the
    budget: 4 weight quantizations and 8 calls).
    The extra cost over budget_s is the two calls of the last candidate started before it
    ran out, one call per candidate in the round that passes it, and that check."""
    start = time.perf_counter()
    deadline = start + budget_s
    max_threads = max_threads or torch.get_num_threads()
    k = x.shape[-1]
    x = x.detach().reshape(-1, k)[: _tuning.MAX_BUCKET]
    m, n = x.shape[0], w.shape[0]
    shape = {"M": m, "N": n, "K": k}
    fns = _candidate_fns(op, x, w, w_scale, bias)
    steps = _thread_steps(max_threads)
    native, aten = fns["native"], fns.get("aten_int_mm")
    # (backend, threads, tiles, fn): the most promising kinds first, so that a budget spent
    # early has still compared the default with ATen's GEMM and with fewer threads.
    cands = [("native", max_threads, None, native)]
    if aten is not None:
        cands.append(("aten_int_mm", max_threads, None, aten))
    cands += [("native", t, None, native) for t in steps if t != max_threads]
    if aten is not None:
        cands += [("aten_int_mm", t, None, aten) for t in steps if t != max_threads]
    # These kinds are timed whatever the budget (2-4 candidates, a few calls each): with only
    # the budget, a busy machine reached 2 of 12 candidates at M=512 and never timed ATen's
    # GEMM at 1 thread, the case's winner (0.94x torchao compiled instead of ~1.0x).
    always = len(cands)
    cands += [("native", max_threads, tiles, _with_tiles(native, tiles)) for tiles in TILE_GRID]
    if m * n * k <= AUTOTUNE_REFERENCE_MACS:
        cands.append(("reference", max_threads, None, fns["reference"]))
    before = torch.get_num_threads()
    one, samples, skipped = {}, {}, []
    try:
        with torch.no_grad():
            for i, (backend, threads, tiles, fn) in enumerate(cands):
                if i >= always and time.perf_counter() >= deadline:
                    skipped.append(_label(backend, threads, tiles))
                    continue
                torch.set_num_threads(threads)
                fn()
                one[i] = max(_time_batch(fn, 1), 1e-7)
            fastest = min(one.values())
            live = [i for i in one if i == 0 or one[i] <= AUTOTUNE_PRUNE * fastest]
            remaining = deadline - time.perf_counter()
            span = min(remaining, max(0.05, 10 * sum(one[i] for i in live)))
            if span > 0:
                batch = {i: max(1, int(span / AUTOTUNE_ROUNDS / len(live) / one[i])) for i in live}
                for _ in range(AUTOTUNE_ROUNDS):
                    for i in live:
                        torch.set_num_threads(cands[i][1])
                        samples.setdefault(i, []).append(_time_until(cands[i][3], batch[i], deadline))
                    if time.perf_counter() >= deadline:
                        break
    finally:
        torch.set_num_threads(before)
    results = []
    for i, (backend, threads, tiles, _) in enumerate(cands):
        if i not in one:
            continue
        us = [v * 1e6 for v in samples.get(i, [one[i]])]
        results.append(
            {
                "backend": backend,
                "threads": threads,
                "tiles": _tiles_json(tiles),
                "config": None,
                "median_us": _percentile(us, 0.5),
                "p20_us": _percentile(us, 0.2),
                "p80_us": _percentile(us, 0.8),
                "samples": len(us),
                "pruned": i not in samples,
            }
        )
    excluded = {}
    timed_s = time.perf_counter() - start
    while True:
        default = results[0]
        fastest = min(results, key=lambda r: r["median_us"])
        winner = fastest if fastest["median_us"] < default["median_us"] * (1 - margin) else default
        if winner["backend"] != "aten_int_mm":
            break
        # At 1 thread: what it checks is the GEMM's arithmetic, which does not depend on the
        # thread count, and on a busy machine each 2-thread call of the check waited for a
        # core (3.3 s for the check at M=512, load 16 on 2 cores; 0.3 s at 1 thread).
        torch.set_num_threads(1)
        try:
            why = exactness_failure(op, {**shape, "N": min(n, AUTOTUNE_EXACT_MAX_N)}, "aten_int_mm")
        finally:
            torch.set_num_threads(before)
        if why is None:
            break
        excluded["aten_int_mm"] = why
        results = [r for r in results if r["backend"] != "aten_int_mm"]
    return {
        "op": op,
        "shape": {d: shape[d] for d in TUNED_OPS[op]},
        "max_threads": max_threads,
        "device": "cpu",
        "dtype": str(x.dtype).replace("torch.", ""),
        "source": "autotune",
        "winner": {
            "backend": winner["backend"],
            "threads": winner["threads"],
            "tiles": winner["tiles"],
            "config": None,
        },
        "default_us": default["median_us"],
        "winner_us": winner["median_us"],
        "candidates": results,
        "excluded": excluded,
        "skipped": skipped,
        "budget_s": budget_s,
        "timed_s": round(timed_s, 4),
        "elapsed_s": round(time.perf_counter() - start, 4),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _time_until(fn, calls: int, deadline: float) -> float:
    """Seconds per call of up to `calls` calls of fn, stopping after the call that passes
    the deadline: a batch sized from one lucky timing (a busy machine makes the next calls
    10x slower) must not run far past the budget."""
    start = time.perf_counter()
    done = 0
    while done < calls:
        fn()
        done += 1
        if time.perf_counter() >= deadline:
            break
    return (time.perf_counter() - start) / done


def _label(backend, threads, tiles) -> str:
    return f"{backend} x{threads}" + (f" tiles {tiles[0]}/{tiles[1]}" if tiles else "")


def _triton_configs(op: str, shape: dict, native, excluded: dict) -> list:
    """The Triton GEMM under each configuration of matmul_config_grid for this M, as
    candidates; a configuration that fails to launch (e.g. too much shared memory on this
    GPU) or changes the result is excluded, with the reason."""
    from .kernels.int8 import matmul_config, matmul_config_grid
    from .ops._tuning import TRITON_GEMM

    kind = TRITON_GEMM[op]
    want = native()
    out = []
    for cfg in matmul_config_grid(kind, shape["M"]):

        def call(cfg=cfg):
            with matmul_config(kind, cfg):
                return native()

        label = json.dumps(cfg, sort_keys=True)
        try:
            got = call()
        except Exception as exc:  # noqa: BLE001 - a configuration this GPU cannot run
            excluded[label] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        if not torch.equal(got, want):
            excluded[label] = "differs from the built-in configuration's result"
            continue
        out.append(("native", None, None, cfg, call))
    return out


def _tiles_json(tiles):
    return None if tiles is None else {"n_block": tiles[0], "k_chunk": tiles[1]}


def _with_tiles(fn, tiles):
    """fn under the C++ kernel's tile sizes (n_block, k_chunk), restored afterwards."""

    def call():
        with _tuning.cpu_tiles(tiles):
            return fn()

    return call


def _candidate_key(c: dict) -> tuple:
    return c["backend"], c["threads"], c.get("tiles"), c.get("config")


def shapes_from_model(config: dict, m_values=None) -> list[dict]:
    """The tuned ops a model config (an `accelops train` config) would call, at M = each of
    m_values (default: batch_size x seq_len of a training step, and 1 for decoding)."""
    from .nn.bitlinear import BitLinear
    from .nn.quantized_linear import Int8Linear
    from .train.config import build_model

    data = config.get("data", {})
    seq_len = int(data.get("seq_len", 128))
    model = build_model(dict(config.get("model", {})), int(data.get("vocab_size", 256)), seq_len)
    if m_values is None:
        m_values = sorted({1, int(config.get("train", {}).get("batch_size", 32)) * seq_len})
    found = []
    for module in model.modules():
        op = (
            "ternary_matmul"
            if isinstance(module, BitLinear)
            else "int8_linear"
            if isinstance(module, Int8Linear)
            else None
        )
        if op:
            found.append((op, module.out_features, module.in_features))
    return [{"op": op, "M": m, "N": n, "K": k} for op, n, k in sorted(set(found)) for m in m_values]


def write_table(entries: list[dict], path=None) -> Path:
    """Merge `entries` into the table of this machine in the file (other machines' tables
    and other keys kept; locked against other writers, written atomically)."""
    return _tuning.merge_entries(entries, path)


def explain(entries: list[dict]) -> dict:
    """Leave-one-out check of the nearest-neighbour prediction for unseen shapes: each
    measured shape is predicted from the others of its op -> per op: shapes, how often
    the prediction picks the measured winner, and the slowdown of the predicted choice
    against the best measured candidate (mean and worst)."""
    from .ops._tuning import DispatchTable

    report = {}
    for op in sorted({e["op"] for e in entries}):
        mine = [e for e in entries if e["op"] == op]
        hits, slowdowns = 0, []
        for i, held in enumerate(mine):
            others = [e for j, e in enumerate(mine) if j != i]
            if not others:
                continue
            table = DispatchTable.from_json({"entries": others}, "loo")
            shape = tuple(held["shape"][d] for d in TUNED_OPS[op])
            choice = table.predict(op, shape)
            key = (
                choice.backend,
                choice.threads,
                _tiles_json(choice.tiles),
                dict(choice.config[1]) if choice.config else None,
            )
            picked = next(c for c in held["candidates"] if _candidate_key(c) == key)
            best = min(c["median_us"] for c in held["candidates"])
            hits += key == _candidate_key(held["winner"])
            slowdowns.append(picked["median_us"] / best - 1.0)
        report[op] = {
            "model": "nearest measured shape in log2(M, N, K) space",
            "shapes": len(mine),
            "loo_winner_agreement": hits / len(slowdowns) if slowdowns else None,
            "loo_mean_slowdown": sum(slowdowns) / len(slowdowns) if slowdowns else None,
            "loo_worst_slowdown": max(slowdowns) if slowdowns else None,
        }
    return report


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=None,
        metavar="CONFIG",
        help="an `accelops train` config: tune the ops its quantized layers call",
    )
    src.add_argument(
        "--shapes",
        default=None,
        metavar="FILE",
        help='JSON list of {"op": "ternary_matmul"|"int8_linear", "M": .., "N": .., "K": ..}',
    )
    parser.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(TUNED_OPS)}")
    parser.add_argument("--m", default=None, help="with --model: row counts M to tune (default: 1 and batch x seq)")
    parser.add_argument("--threads", type=int, default=None, help="largest thread count tried (default: torch's)")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per candidate (default 0.3)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where to tune: cpu (threads, tiles, ATen's GEMM) or cuda (the Triton GEMM's "
        "block sizes, warps and stages); default cpu",
    )
    parser.add_argument(
        "--table", default=None, help=f"table file (default ${_tuning.ENV_TABLE} or ~/.cache/accelops/dispatch.json)"
    )
    parser.add_argument(
        "--explain", action="store_true", help="also report the leave-one-out error of the prediction for unseen shapes"
    )


def run_args(args, out=None) -> int:
    import sys

    out = out or sys.stdout
    if args.shapes:
        shapes = json.loads(Path(args.shapes).read_text())
    elif args.model:
        from .train.config import load_config

        m_values = [int(v) for v in args.m.split(",")] if args.m else None
        shapes = shapes_from_model(load_config(args.model), m_values)
    else:
        shapes = BENCH_SHAPES
    if args.ops:
        wanted = {o.strip() for o in args.ops.split(",")}
        unknown = wanted - set(TUNED_OPS)
        if unknown:
            raise SystemExit(f"accelops tune: --ops {sorted(unknown)} are not tuned ops ({', '.join(TUNED_OPS)})")
        shapes = [s for s in shapes if s["op"] in wanted]
    if not shapes:
        raise SystemExit("accelops tune: no shapes to tune (the model has no ternary/int8 layers?)")
    entries = []
    for shape in shapes:
        if shape.get("op") not in TUNED_OPS:
            raise SystemExit(f"accelops tune: op must be one of {', '.join(TUNED_OPS)}, got {shape.get('op')!r}")
        e = measure(shape["op"], shape, args.threads, args.budget, device=args.device)
        entries.append(e)
        print(
            f"{e['op']:<15} {json.dumps(e['shape'])}: {_tuning.describe(e['winner'])} "
            f"{e['winner_us']:.1f} us (default {e['default_us']:.1f} us)",
            file=out,
            flush=True,
        )
    path = write_table(entries, args.table)
    print(f"dispatch table for machine {machine_info()['fingerprint']} written to {path}", file=out)
    if args.explain:
        for op, r in explain(entries).items():
            agree = "n/a" if r["loo_winner_agreement"] is None else f"{r['loo_winner_agreement']:.0%}"
            mean = "n/a" if r["loo_mean_slowdown"] is None else f"{r['loo_mean_slowdown']:+.1%}"
            worst = "n/a" if r["loo_worst_slowdown"] is None else f"{r['loo_worst_slowdown']:+.1%}"
            print(
                f"{op}: {r['model']}; leave-one-out over {r['shapes']} shapes: picks the measured winner "
                f"{agree}, slowdown vs best mean {mean}, worst {worst}",
                file=out,
            )
    return 0
