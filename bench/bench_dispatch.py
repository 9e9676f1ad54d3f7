"""Dispatch family: tuned dispatch (accelops tune + the table accelops.ops consults)
against the fixed default dispatch and against exhaustive search, in one run.

For every bench shape of the tuned ops (accelops.tune.BENCH_SHAPES; --quick: two small
ones), the run first tunes (every candidate: the C++ kernel and the same op with ATen's
int8 GEMM for the sums, each at 1..T threads, and the reference; interleaved rounds), installs the resulting table in this process only (the
user's own table file is not touched), then times, interleaved again:
  default  - accelops.ops.<op> with no table: the kernel at T threads,
  tuned    - accelops.ops.<op> consulting the table (lookup included),
  best     - the exhaustive search's fastest candidate (accelops.ops.<op> through a table
             holding only that choice, or the reference), each the same public call.
Targets (issue 9): tuned within 3% of best on every shape; on at least one op, tuned
beats the default by 10% or more (geometric mean over its shapes). Dispatch cost: the
median time of accelops.ops.int8_linear on a 1x16x16 problem with the table minus
without it (target <= 2 us), the same with autotune on after its first call (issue 26,
target <= 2 us), and the lookup alone.

    python bench/bench_dispatch.py [--quick] [--threads 2] [--results-dir DIR]
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time

import common
import torch

from accelops import ops
from accelops._machine import machine_info
from accelops.ops import _tuning
from accelops.ops._tuning import DispatchTable
from accelops.tune import BENCH_SHAPES, _inputs, _percentile, measure

FAMILY = "dispatch"
QUICK_SHAPES = [{"op": "ternary_matmul", "M": 1, "N": 256, "K": 256}, {"op": "int8_linear", "M": 4, "N": 256, "K": 256}]


def _interleaved(
    fns: dict, budget_s: float, rounds: int, seed: int = 0, batch_s: float | None = None, max_rounds: int = 201
) -> tuple[dict, dict]:
    """Batches of each fn timed in interleaved rounds, the order shuffled every round (a
    fixed order would give one method a systematic place, e.g. always right after the
    2-thread default had woken the thread pool).

    Without batch_s: `rounds` rounds, each batch budget_s / rounds long. With batch_s:
    batches about batch_s long and as many rounds as budget_s allows, between `rounds` and
    max_rounds: short batches taken close together make each round's pair of samples see
    the same machine state.

    Returns (name -> (median, p20, p80) in us, name -> the per-round samples in us); the
    ratio of two methods' samples in the same round is a paired measurement that cancels
    the drift of the machine's load between rounds."""
    per_call, samples = {}, {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for name, fn in fns.items():
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        per_call[name] = max(min(times), 1e-7)
    if batch_s is None:
        calls = {k: max(1, int(budget_s / rounds / v)) for k, v in per_call.items()}
    else:
        calls = {k: max(1, int(batch_s / v)) for k, v in per_call.items()}
        slowest_batch = max(calls[k] * per_call[k] for k in fns)
        rounds = max(rounds, min(max_rounds, int(budget_s / slowest_batch)))
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - t) / calls[name] * 1e6)
    summary = {k: (_percentile(v, 0.5), _percentile(v, 0.2), _percentile(v, 0.8)) for k, v in samples.items()}
    return summary, samples


def paired_ratio(a: list, b: list) -> tuple[float, float, float]:
    """(median, p20, p80) of a[i] / b[i] over rounds: a's time relative to b's."""
    ratios = [x / y for x, y in zip(a, b)]
    return _percentile(ratios, 0.5), _percentile(ratios, 0.2), _percentile(ratios, 0.8)


def _op_call(op, shape):
    """accelops.ops.<op> on the shape's inputs (the public call that consults the table)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(shape["M"], shape["K"], generator=g), torch.randn(shape["N"], shape["K"], generator=g)
    if op == "ternary_matmul":
        wp, ws = ops.quantize_weight_ternary(w)
        return lambda: ops.ternary_matmul(x, wp, ws, k=shape["K"])
    wq, ws = ops.quantize_weight_int8(w)
    return lambda: ops.int8_linear(x, wq, ws)


def _untuned(fn):
    def call():
        _tuning.reset(None, loaded=True)
        return fn()

    return call


def _tuned(fn, table):
    def call():
        _tuning.reset(table)
        return fn()

    return call


def _with_threads(fn, threads):
    def call():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return call


def overhead(budget_s: float) -> dict:
    """Cost per call of the dispatch on a 1x16x16 int8_linear (where the kernel takes ~10 us,
    so the lookup shows): with no table (autotune off, the fixed default), with a table whose
    entry for the shape is the default's choice, and with autotune on after its first call
    measured the key (the table's choice replaced by the default's, so that only the lookup
    differs); and the lookup alone."""
    x = torch.randn(1, 16)
    wq, ws = ops.quantize_weight_int8(torch.randn(16, 16))
    call = lambda: ops.int8_linear(x, wq, ws)  # noqa: E731
    fp = machine_info()["fingerprint"]
    default = {"backend": "native", "threads": None}
    table = DispatchTable.from_json(
        {"entries": [{"op": "int8_linear", "shape": {"M": 1, "N": 16, "K": 16}, "winner": default}]},
        fp,
    )
    auto = DispatchTable({}, fp, None, autotune=True)  # this process only: the user's file is not touched
    _tuning.reset(auto)
    start = time.perf_counter()
    call()  # measures the key
    first_call_s = time.perf_counter() - start
    measured = auto.measured[0] if auto.measured else None
    for key in list(auto.keyed):
        auto.keyed[key] = _tuning.Choice("native", None)
    auto._cache.clear()
    setups = {
        "without": lambda: _tuning.reset(None, loaded=True),
        "with": lambda: _tuning.reset(table),
        "autotuned": lambda: _tuning.reset(auto),
    }
    times = {k: [] for k in setups}
    for _ in range(15):
        for name, setup in setups.items():
            setup()
            call()
            n = 2000
            t = time.perf_counter()
            for _ in range(n):
                call()
            times[name].append((time.perf_counter() - t) / n * 1e6)
    _tuning.reset(table)
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        table.lookup("int8_linear", (1, 16, 16))
    lookup_us = (time.perf_counter() - t) / n * 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "call_without_us": med["without"],
        "call_with_us": med["with"],
        "call_autotuned_us": med["autotuned"],
        "overhead_us": med["with"] - med["without"],
        "autotune_overhead_us": med["autotuned"] - med["without"],
        "lookup_us": lookup_us,
        "autotune_first_call_s": first_call_s,
        "autotune_choice": measured["winner"] if measured else None,
    }


def run(cfg: common.Config) -> common.FamilyResult:
    meta = common.run_metadata(cfg)
    shapes = QUICK_SHAPES if cfg.quick else BENCH_SHAPES
    budget = 0.02 if cfg.quick else max(0.3, cfg.budget_s / 2)
    rounds = 3 if cfg.quick else 7
    # More, shorter rounds for the three-way comparison (batches of ~3 ms, 21 to 201
    # rounds): its verdict is a median of per-round paired ratios, which resolves the 3%
    # the target asks for only when the pairs are many and taken close together.
    compare_rounds = 5 if cfg.quick else 21
    out_path = cfg.results_file(FAMILY)
    rows, sections, failures = [], ["## Dispatch benchmark (tuned vs default vs exhaustive search)", ""], []
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        entries = [measure(s["op"], s, threads, budget, rounds) for s in shapes]
        table = DispatchTable.from_json({"entries": entries}, machine_info()["fingerprint"])
        _tuning.reset(table)
        mine = []
        try:
            for s, e in zip(shapes, entries):
                public = _op_call(s["op"], s)
                best = min(e["candidates"], key=lambda c: c["median_us"])
                # The same public call (validation included) for default, tuned and best:
                # best through a table that holds only its choice for this shape (the
                # reference, which no table path calls, directly at its thread count).
                if best["backend"] == "reference":
                    best_fn = _untuned(_with_threads(_inputs(s["op"], s)["reference"], best["threads"]))
                else:
                    only_best = DispatchTable.from_json(
                        {
                            "entries": [
                                {
                                    **e,
                                    "winner": {
                                        "backend": best["backend"],
                                        "threads": best["threads"],
                                        "tiles": best.get("tiles"),
                                        "config": best.get("config"),
                                    },
                                }
                            ]
                        },
                        table.fingerprint,
                    )
                    best_fn = _tuned(public, only_best)
                fns = {"default": _untuned(public), "tuned": _tuned(public, table), "best": best_fn}
                timed, samples = _interleaved(fns, budget, compare_rounds, seed=len(mine), batch_s=0.003)
                paired = {
                    "tuned_vs_best": paired_ratio(samples["tuned"], samples["best"]),
                    "default_vs_tuned": paired_ratio(samples["default"], samples["tuned"]),
                }
                for method, (med, p20, p80) in timed.items():
                    row = {
                        **meta,
                        "family": FAMILY,
                        "op": s["op"],
                        "method": method,
                        "label": {
                            "default": "default dispatch",
                            "tuned": "accelops tuned dispatch",
                            "best": "exhaustive-search best",
                        }[method],
                        "accelops": method == "tuned",
                        "threads": threads,
                        "M": s["M"],
                        "N": s["N"],
                        "K": s["K"],
                        "median_us": med,
                        "p20_us": p20,
                        "p80_us": p80,
                        "status": "ok",
                        "winner": e["winner"],
                        "best_candidate": {
                            "backend": best["backend"],
                            "threads": best["threads"],
                            "tiles": best.get("tiles"),
                        },
                        "candidates": e["candidates"],
                        **{f"{k}_{q}": v for k, r in paired.items() for q, v in zip(("median", "p20", "p80"), r)},
                    }
                    common.append_row(out_path, row)
                    mine.append(row)
            cost = overhead(0.2)
        finally:
            _tuning.reset()
        cost_row = {
            **meta,
            "family": FAMILY,
            "op": "int8_linear",
            "method": "dispatch_overhead",
            "label": "table lookup cost per call",
            "accelops": True,
            "threads": threads,
            "M": 1,
            "N": 16,
            "K": 16,
            "status": "ok",
            **cost,
        }
        common.append_row(out_path, cost_row)
        rows += mine + [cost_row]
        sections += common.run_header(FAMILY, meta, cfg, threads, time.perf_counter() - t0)
        sections += summarize(mine, cost)
    return common.FamilyResult(FAMILY, "\n".join(sections) + "\n", rows, failures)


def summarize(rows, cost) -> list[str]:
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["M"], r["N"], r["K"]), {})[r["method"]] = r
    lines = [
        "Times are medians over rounds; the ratios are medians of per-round paired ratios "
        "(p20-p80 in brackets), the three methods' order shuffled every round.",
        "",
        "| op | M | N x K | table's choice | best candidate | default | tuned | best | tuned vs best "
        "| tuned vs default |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    per_op, worst = {}, 0.0
    for (op, m, n, k), d in by.items():
        de, tu, be = d["default"]["median_us"], d["tuned"]["median_us"], d["best"]["median_us"]
        t = d["tuned"]
        w, b = t["winner"], t["best_candidate"]
        tb = (t["tuned_vs_best_median"], t["tuned_vs_best_p20"], t["tuned_vs_best_p80"])
        dt = (t["default_vs_tuned_median"], t["default_vs_tuned_p20"], t["default_vs_tuned_p80"])
        worst = max(worst, tb[0] - 1)
        per_op.setdefault(op, []).append(dt[0])
        lines.append(
            f"| {op} | {m} | {n}x{k} | {_tuning.describe(w)} | {_tuning.describe(b)} | "
            f"{common.fmt_time(de)} | {common.fmt_time(tu)} | {common.fmt_time(be)} | "
            f"{tb[0]:.3f}x [{tb[1]:.3f}-{tb[2]:.3f}] | {dt[0]:.2f}x [{dt[1]:.2f}-{dt[2]:.2f}] |"
        )
    lines.append("")
    for op, speedups in per_op.items():
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        lines.append(
            f"- {op}: tuned vs default, geometric mean over {len(speedups)} shapes: {geo:.3f}x "
            f"({'>= 1.10x: met' if geo >= 1.10 else 'below 1.10x'})"
        )
    lines.append(f"- worst tuned vs exhaustive best: {worst:+.1%} ({'<= 3%: met' if worst <= 0.03 else 'MISSED'})")
    lines.append(
        f"- dispatch cost: accelops.ops.int8_linear 1x16x16 {cost['call_without_us']:.2f} us without a table,"
        f" {cost['call_with_us']:.2f} us with one ({cost['overhead_us']:+.2f} us; target <= 2 us); "
        f"lookup alone {cost['lookup_us']:.2f} us"
    )
    lines.append(
        f"- autotune: after its first call (which measured for {cost['autotune_first_call_s']:.2f} s), "
        f"{cost['call_autotuned_us']:.2f} us a call ({cost['autotune_overhead_us']:+.2f} us over no table; "
        f"target <= 2 us)"
    )
    return lines + [""]


def main(argv=None) -> int:
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
