"""Matmul family: accelops `ternary_matmul` and `int8_linear` against the baselines a user
would otherwise pick, at the shapes of a 7B-class LLaMA layer (hidden 4096, FFN 11008).

Every accelops output is checked against its pure-PyTorch reference before it is timed; a
wrong kernel is reported as WRONG and not timed. Ratios are baseline time / accelops time,
both measured in this run at the same thread count.

    python bench/bench_matmul.py [--quick] [--threads 1,2] [--results-dir DIR]
(or through bench/run.py, which runs every family)

ACCELOPS_BENCH_METHODS=ternary,ternary_lut,ternary_base3 (keys of METHODS) runs only those methods (the
stream_read row always runs): for a focused comparison on a busy machine.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import common
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import accelops.reference as R
from accelops import ops
from accelops._machine import machine_info
from accelops.ops import _tuning
from accelops.ops._tuning import DispatchTable
from accelops.tune import measure

FAMILY = "matmul"

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): attention/up/down projections
MS = [1, 32, 512]  # decode, small batch, prefill
# K=320 is not a multiple of 128, so the packed ternary layout's padding path is exercised.
QUICK_SHAPES = [(256, 320)]
QUICK_MS = [1, 32]

# bitnet.cpp I2_S kernel times on this machine kind, M=1, from its published runs: not
# measured by this script, so shown only as a labelled reference column.
BITNET_US = {
    1: {(4096, 4096): 178.0, (11008, 4096): 475.0, (4096, 11008): 436.0},
    2: {(4096, 4096): 92.0, (11008, 4096): 240.0, (4096, 11008): 223.0},
}
BITNET_LABEL = "bitnet.cpp I2_S (measured separately, not in this run)"

# (key, label). Order is the order rows are measured and shown.
METHODS = [
    ("ternary", "accelops ternary_matmul"),
    # The same weights in the lut3 format (lookup-table GEMV, 1.78 bits a weight): M=1 only.
    ("ternary_lut", "accelops ternary_matmul, lut3 format (lookup-table GEMV)"),
    # The same weights in the base3 format (5 weights a byte, 1.6 bits a weight): M=1 only.
    ("ternary_base3", "accelops ternary_matmul, base3 format (5 weights a byte, GEMV)"),
    ("int8", "accelops int8_linear"),
    # The same ops through a dispatch table that `accelops tune` measured for the case on
    # this machine just before (threads, tile sizes, ATen's int8 GEMM: accelops.tune).
    ("ternary_tuned", "accelops ternary_matmul, tuned (accelops tune)"),
    ("int8_tuned", "accelops int8_linear, tuned (accelops tune)"),
    # The same ops with the dispatch autotuner on (issue 26): the first call measured the
    # candidates within its default budget on the case's own tensors; timed after it.
    ("ternary_auto", "accelops ternary_matmul, autotuned on first call"),
    ("int8_auto", "accelops int8_linear, autotuned on first call"),
    ("fp32", "F.linear fp32"),
    ("bf16", "F.linear bf16"),
    ("int_mm", "torch._int_mm (int8 GEMM only)"),
    ("ref_ternary_compiled", "torch.compile(reference.ternary_matmul)"),
    ("ref_int8_compiled", "torch.compile(reference.int8_linear)"),
    ("torchao", "torchao int8 dynamic (eager)"),
    ("torchao_compiled", "torchao int8 dynamic (torch.compile)"),
]
LABELS = dict(METHODS)
ACCELOPS = {
    "ternary": "ternary_matmul",
    "ternary_lut": "ternary_matmul_lut",
    "ternary_base3": "ternary_matmul_base3",
    "int8": "int8_linear",
    "ternary_tuned": "ternary_matmul",
    "int8_tuned": "int8_linear",
    "ternary_auto": "ternary_matmul",
    "int8_auto": "int8_linear",
}
# The formats whose kernel is a GEMV only (checked and timed at M=1).
GEMV_ONLY = ("ternary_lut", "ternary_base3")
TUNED = {"ternary_tuned": "ternary_matmul", "int8_tuned": "int8_linear"}
AUTO = {"ternary_auto": "ternary_matmul", "int8_auto": "int8_linear"}


def selected_methods() -> list[str]:
    """The METHODS keys this run measures (ACCELOPS_BENCH_METHODS, default all)."""
    value = os.environ.get("ACCELOPS_BENCH_METHODS", "").strip()
    if not value:
        return [key for key, _ in METHODS]
    keys = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [k for k in keys if k not in LABELS]
    if unknown:
        raise SystemExit(
            f"bench_matmul: error: ACCELOPS_BENCH_METHODS: unknown method(s) {unknown}; known: {list(LABELS)}"
        )
    return keys


# --------------------------------------------------------------------------- correctness


def compare_to_reference(y: torch.Tensor, y_ref: torch.Tensor, rel_ulps: int = 4) -> dict:
    """The tests' contract: same NaN pattern, and every element within a few rounding steps
    of the output dtype of the reference (backends run the same fp32 epilogue)."""
    if y.shape != y_ref.shape or y.dtype != y_ref.dtype:
        return {"ok": False, "why": f"shape/dtype {tuple(y.shape)} {y.dtype} vs {tuple(y_ref.shape)} {y_ref.dtype}"}
    nan = torch.isnan(y_ref)
    if not torch.equal(torch.isnan(y), nan):
        return {"ok": False, "why": "NaN pattern differs from the reference"}
    a, b = y.double()[~nan], y_ref.double()[~nan]
    eps = torch.finfo(y.dtype).eps
    diff = (a - b).abs()
    ulps = (diff / (eps * b.abs()).clamp_min(1e-300)).max().item() if diff.numel() else 0.0
    ok = bool((diff <= rel_ulps * eps * b.abs() + 1e-30).all())
    return {
        "ok": ok,
        "max_rel_ulps": ulps,
        "max_abs_diff": diff.max().item() if diff.numel() else 0.0,
        "tolerance": f"{rel_ulps} ulps of {y.dtype}",
    }


def rel_err(y: torch.Tensor, y_true: torch.Tensor) -> float:
    """||y - y_true|| / ||y_true||: the error each method's arithmetic adds to fp32 F.linear."""
    y, y_true = y.double(), y_true.double()
    return ((y - y_true).norm() / y_true.norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------- set-up

# Methods that read the same weights share their copies.
WEIGHT_GROUP = {
    "ternary": "ternary",
    "ref_ternary_compiled": "ternary",
    "ternary_tuned": "ternary",
    "ternary_lut": "ternary_lut",
    "ternary_base3": "ternary_base3",
    "ternary_auto": "ternary",
    "int8": "int8",
    "ref_int8_compiled": "int8",
    "int_mm": "int8",
    "int8_tuned": "int8",
    "int8_auto": "int8",
    "fp32": "fp32",
    "bf16": "bf16",
    "torchao": "torchao",
    "torchao_compiled": "torchao",
}


class Shape:
    """Every method's weights for one (N, K), prepared once and shared by all M: per weight
    group, a list of copies (see common.Timer for why the CPU rotates through copies)."""

    def __init__(self, cfg, n: int, k: int, torchao_why: str | None):
        self.n, self.k = n, k
        g = torch.Generator().manual_seed(n * 100003 + k)
        # A trained layer's scale (std 1/sqrt(K)); the values only set the error column.
        w = (torch.randn(n, k, generator=g) / k**0.5).to(cfg.device)
        self.w = w
        w_packed, w_tscale = ops.quantize_weight_ternary(w)
        w_q, w_qscale = ops.quantize_weight_int8(w)
        base = {
            "ternary": (w_packed, w_tscale),
            "int8": (w_q, w_qscale),
            "fp32": (w,),
            "bf16": (w.to(torch.bfloat16),),
            "ternary_lut": (ops.convert_ternary_format(w_packed, "i2", "lut3", n=n, k=k), w_tscale),
            "ternary_base3": (ops.convert_ternary_format(w_packed, "i2", "base3", n=n, k=k), w_tscale),
        }
        # Only the groups of the methods this run measures (the ternary and int8 weights
        # always: the references and the stream_read row use them).
        wanted = {"ternary", "int8"} | {WEIGHT_GROUP[key] for key in selected_methods()}
        base = {group: args for group, args in base.items() if group in wanted}
        self.torchao_why = torchao_why
        if torchao_why is None and "torchao" in wanted:
            try:
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

                model = nn.Sequential(nn.Linear(k, n, bias=False)).to(cfg.device)
                with torch.no_grad():
                    model[0].weight.copy_(w)
                quantize_(model, Int8DynamicActivationInt8WeightConfig())
                base["torchao"] = (model,)
            except Exception as exc:
                self.torchao_why = f"torchao quantize_ failed: {type(exc).__name__}: {exc}"
        self.bytes = {
            group: common.tensor_bytes(*(a[0].weight if isinstance(a, nn.Module) else a for a in args))
            for group, args in base.items()
        }
        self.copies = {}
        for group, args in base.items():
            measured = group in {WEIGHT_GROUP[key] for key in selected_methods()}
            extra = common.copies_for(cfg, self.bytes[group]) - 1 if measured else 0
            self.copies[group] = [args] + [
                tuple(copy.deepcopy(a) if isinstance(a, nn.Module) else a.clone() for a in args) for _ in range(extra)
            ]

    def weight_bytes(self, key: str) -> int | None:
        return self.bytes.get(WEIGHT_GROUP[key])

    def n_copies(self, key: str) -> int:
        return len(self.copies.get(WEIGHT_GROUP[key], ()))


def tune_case(cfg, op: str, m: int, n: int, k: int, threads: int):
    """accelops tune for this one case, on this machine now -> (table, its winner)."""
    shape = {"op": op, "M": m, "N": n, "K": k}
    budget, rounds = (0.01, 2) if cfg.quick else (0.2, 5)
    entry = measure(op, shape, threads, budget, rounds, device=cfg.device.type)
    return DispatchTable.from_json({"entries": [entry]}, machine_info()["fingerprint"]), entry["winner"]


def build_calls(s: Shape, x: torch.Tensor, x_bf16, x_q, x_scale, tables=None):
    """key -> (callable, to_float(y) giving an output comparable with F.linear, or None),
    or key -> the reason the method does not run here."""
    m = x.shape[0]
    # Compiled per (shape, M) after torch._dynamo.reset(): each case gets a static-shape
    # graph, what a fixed-shape inference user gets, and no recompile limit is reached.
    # Weight copies are graph inputs of the same shape, so they reuse that graph.
    ref_t = torch.compile(R.ternary_matmul)
    ref_i = torch.compile(R.int8_linear)
    make = {
        "ternary": lambda wp, ws: lambda: ops.ternary_matmul(x, wp, ws, k=s.k),
        "ternary_lut": lambda wl, ws: lambda: ops.ternary_matmul_lut(x, wl, ws, n=s.n, k=s.k),
        "ternary_base3": lambda wb, ws: lambda: ops.ternary_matmul_base3(x, wb, ws, k=s.k),
        "int8": lambda wq, ws: lambda: ops.int8_linear(x, wq, ws),
        "ternary_tuned": lambda wp, ws: common.through_table(
            lambda: ops.ternary_matmul(x, wp, ws, k=s.k), tables["ternary_tuned"]
        ),
        "int8_tuned": lambda wq, ws: common.through_table(lambda: ops.int8_linear(x, wq, ws), tables["int8_tuned"]),
        "ternary_auto": lambda wp, ws: common.through_table(
            lambda: ops.ternary_matmul(x, wp, ws, k=s.k), tables["ternary_auto"]
        ),
        "int8_auto": lambda wq, ws: common.through_table(lambda: ops.int8_linear(x, wq, ws), tables["int8_auto"]),
        "fp32": lambda w: lambda: F.linear(x, w),
        "bf16": lambda w: lambda: F.linear(x_bf16, w),
        # An int8 linear layer's weight is stored [N, K]; its transpose is the column-major
        # [K, N] operand _int_mm wants (on this CPU 6x faster than a contiguous [K, N]).
        "int_mm": lambda wq, ws: lambda: torch._int_mm(x_q, wq.t()),
        "ref_ternary_compiled": lambda wp, ws: lambda: ref_t(x, wp, ws),
        "ref_int8_compiled": lambda wq, ws: lambda: ref_i(x, wq, ws),
        "torchao": lambda model: lambda: model(x),
        "torchao_compiled": lambda model: (lambda c: lambda: c(x))(torch.compile(model)),
    }
    calls = {}
    for key in selected_methods():
        group = WEIGHT_GROUP[key]
        if key == "int_mm" and m <= 16:
            calls[key] = "torch._int_mm needs M > 16"
        elif key == "ternary_lut" and m > 1:
            calls[key] = "the lut3 kernel is a GEMV (it reads the weights once per row of x): M=1 only"
        elif key == "ternary_base3" and m > 1:
            calls[key] = "the base3 kernel is a GEMV (it reads the weights once per row of x): M=1 only"
        elif group not in s.copies:
            calls[key] = s.torchao_why
        else:
            calls[key] = (common.rotating([make[key](*args) for args in s.copies[group]]), None)
    if not isinstance(calls.get("int_mm", ""), str):
        # Raw int8 GEMM: x already quantized, int32 out. Dequantized only for the error
        # column, outside the timing.
        w_qscale = s.copies["int8"][0][1]
        calls["int_mm"] = (calls["int_mm"][0], lambda acc: acc.double() * x_scale.double() * w_qscale.double())
    return calls


# --------------------------------------------------------------------------- memory limit

STREAM_KEY = "stream_read"
STREAM_LABEL = "streaming read of the M=1 case's bytes (memory limit)"


def stream_read_row(cfg, timer, meta, s: Shape, threads: int, out_path, progress) -> dict:
    """The memory limit of the ternary GEMV: a read of as many bytes as ternary_matmul reads at
    M=1 (the packed weight and an fp32 x row), cold the same way (a rotation of copies through
    >= max(2x L3, 1 GiB)), by torch.amax over an int64 view. Of the reads tried on a 2-core
    Zen 4 (sum over int32/int64/fp32 views, amax over uint8/int64/fp32 views) it was within a
    few % of the fastest at 1 thread and the fastest at 2 (torch splits it across the threads
    as the kernels split N). This row's time over the ternary M=1 row's is the fraction of the
    machine's read bandwidth the kernel reached (the target: >= 0.7)."""
    nbytes = s.bytes["ternary"] + s.k * 4
    padded = -(-nbytes // 64) * 64
    copies = common.copies_for(cfg, padded)
    buf = torch.ones(copies * padded, dtype=torch.uint8)  # written once: every page is real
    views = [buf[i * padded : (i + 1) * padded].view(torch.int64) for i in range(copies)]
    row = {
        **meta,
        "family": FAMILY,
        "method": STREAM_KEY,
        "label": STREAM_LABEL,
        "accelops": False,
        "threads": threads,
        "M": 1,
        "N": s.n,
        "K": s.k,
        "x_dtype": "float32",
        "bytes_moved": padded,
        "weight_bytes": padded,
        **common.cold_fields(cfg, padded, copies),
        "cache_flush_bytes": timer.flush_bytes,
        "budget_s": cfg.budget_s,
        "status": "ok",
        "how": "torch.amax over an int64 view of a rotating copy",
    }
    progress.set_postfix_str(f"{threads}t N={s.n} K={s.k} {STREAM_KEY}")
    if cfg.device.type != "cpu":
        row.update(status="skipped", reason="the CPU's memory limit: measured on CPU runs only")
    else:
        row.update(common.time_call(common.rotating([lambda v=v: v.amax() for v in views]), timer))
        row["gb_per_s"] = padded / row["median_us"] / 1e3
    del views, buf
    row["loadavg_1m"] = os.getloadavg()[0]
    common.append_row(out_path, row)
    return row


# --------------------------------------------------------------------------- one case


def run_case(cfg, timer, meta, s: Shape, m: int, threads: int, out_path, progress, stream=None) -> list[dict]:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, s.k, generator=g).to(cfg.device)
    x_bf16 = x.to(torch.bfloat16)
    x_q, x_scale = ops.quantize_activation_int8(x)
    y_fp32 = F.linear(x, s.w)

    # Correctness first, once per (shape, M), on the inputs that are then timed (the other
    # weight copies are clones of these).
    w_packed, w_tscale = s.copies["ternary"][0]
    w_q, w_qscale = s.copies["int8"][0]
    y_ref = {"ternary": R.ternary_matmul(x, w_packed, w_tscale), "int8": R.int8_linear(x, w_q, w_qscale)}
    tables, winners = {}, {}
    for key, op in TUNED.items():
        if key not in selected_methods():
            continue
        progress.set_postfix_str(f"{threads}t N={s.n} K={s.k} M={m} tune {op}")
        tables[key], winners[key] = tune_case(cfg, op, m, s.n, s.k, threads)
    w_lut = s.copies["ternary_lut"][0][0] if "ternary_lut" in s.copies else None  # not built unless selected
    w_b3 = s.copies["ternary_base3"][0][0] if "ternary_base3" in s.copies else None
    check_calls = {
        "ternary": lambda: compare_to_reference(ops.ternary_matmul(x, w_packed, w_tscale, k=s.k), y_ref["ternary"]),
        "ternary_lut": lambda: compare_to_reference(
            ops.ternary_matmul_lut(x, w_lut, w_tscale, n=s.n, k=s.k), y_ref["ternary"]
        ),
        "ternary_base3": lambda: compare_to_reference(
            ops.ternary_matmul_base3(x, w_b3, w_tscale, k=s.k), y_ref["ternary"]
        ),
        "int8": lambda: compare_to_reference(ops.int8_linear(x, w_q, w_qscale), y_ref["int8"]),
        "ternary_tuned": lambda: compare_to_reference(
            common.through_table(lambda: ops.ternary_matmul(x, w_packed, w_tscale, k=s.k), tables["ternary_tuned"])(),
            y_ref["ternary"],
        ),
        "int8_tuned": lambda: compare_to_reference(
            common.through_table(lambda: ops.int8_linear(x, w_q, w_qscale), tables["int8_tuned"])(), y_ref["int8"]
        ),
    }
    selected = selected_methods()
    checks = {
        key: check()
        for key, check in check_calls.items()
        if key in selected and not (key in GEMV_ONLY and m > 1)  # a GEMV: M=1 only (see build_calls)
    }
    # Autotune: a table of this process only (not the user's file), empty, measuring on the
    # first call (the check's), with the default budget; its cost is recorded per row.
    autotune_s = {}
    for key, op in AUTO.items():
        if key not in selected:
            continue
        progress.set_postfix_str(f"{threads}t N={s.n} K={s.k} M={m} autotune {op}")
        tables[key] = DispatchTable({}, machine_info()["fingerprint"], None, autotune=True)
        call = (
            (lambda: ops.ternary_matmul(x, w_packed, w_tscale, k=s.k))
            if op == "ternary_matmul"
            else (lambda: ops.int8_linear(x, w_q, w_qscale))
        )
        start = time.perf_counter()
        y = common.through_table(call, tables[key])()
        autotune_s[key] = time.perf_counter() - start
        checks[key] = compare_to_reference(y, y_ref["ternary" if op == "ternary_matmul" else "int8"])
        measured = tables[key].measured
        winners[key] = measured[0]["winner"] if measured else None
    for c in checks.values():
        c["against"] = "accelops.reference"
    # The compiled references are compared too, for information only: inductor may round
    # differently from eager (it is a baseline, not the spec).
    info_against = {"ref_ternary_compiled": "ternary", "ref_int8_compiled": "int8"}

    rows = []
    for key, call in build_calls(s, x, x_bf16, x_q, x_scale, tables).items():
        progress.set_postfix_str(f"{threads}t N={s.n} K={s.k} M={m} {key}")
        row = {
            **meta,
            "family": FAMILY,
            "method": key,
            "label": LABELS[key],
            "accelops": key in ACCELOPS,
            "threads": threads,
            "M": m,
            "N": s.n,
            "K": s.k,
            "x_dtype": str(x.dtype if key != "bf16" else x_bf16.dtype).replace("torch.", ""),
            "weight_bytes": s.weight_bytes(key),
            **common.cold_fields(cfg, s.weight_bytes(key), s.n_copies(key)),
            "cache_flush_bytes": timer.flush_bytes,
            "budget_s": cfg.budget_s,
            "status": "ok",
        }
        if key in checks:
            row["check"] = checks[key]
        if key in winners:
            row["tuned_choice"] = winners[key]
        if key in autotune_s:
            row["autotune_first_call_s"] = autotune_s[key]  # measuring included
        if isinstance(call, str):
            row.update(status="skipped", reason=call)
        elif key in checks and not checks[key]["ok"]:
            row.update(status="wrong", reason=f"output disagrees with accelops.reference.{ACCELOPS[key]}: not timed")
        else:
            fn, to_float = call
            try:
                timer.sync()
                start = time.perf_counter()
                y = fn()
                timer.sync()
                row["first_call_s"] = time.perf_counter() - start  # includes compilation
                row["rel_err_vs_fp32_linear"] = rel_err(to_float(y) if to_float else y, y_fp32)
                if key in info_against:
                    row["check_info"] = {
                        **compare_to_reference(y, y_ref[info_against[key]]),
                        "against": "accelops.reference (eager)",
                    }
                del y
                peak, how, seconds = common.peak_memory(fn, timer)
                row["peak_mem_bytes"], row["peak_mem_method"] = peak, how
                row.update(timer.measure(fn, seconds))
            except Exception as exc:  # a baseline that cannot run here is a row, not a crash
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        if key in ("ternary", *GEMV_ONLY) and m == 1 and stream and stream["status"] == "ok" and row["status"] == "ok":
            # The fraction of the read bandwidth measured just before on the same bytes.
            # (The lut3 and base3 rows read 11% and 20% fewer bytes than the stream row: their
            # fraction can pass 1.)
            row["stream_read_us"] = stream["median_us"]
            row["bandwidth_fraction"] = stream["median_us"] / row["median_us"]
            row["gb_per_s"] = (s.bytes[WEIGHT_GROUP[key]] + s.k * 4) / row["median_us"] / 1e3
        # Other processes on the machine show up here; a 1-minute load above the core count
        # means this row's threads waited for a core (flagged in the summary).
        row["loadavg_1m"] = os.getloadavg()[0]
        common.append_row(out_path, row)
        rows.append(row)
        progress.update(1)
    return rows


# --------------------------------------------------------------------------- summary


def _ratio(base: dict | None, mine: dict | None) -> float | None:
    if not base or not mine or base.get("status") != "ok" or mine.get("status") != "ok":
        return None
    return base["median_us"] / mine["median_us"]


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "ok":
        return common.fmt_time(row["median_us"])
    return {"skipped": "n/a", "wrong": "**WRONG**", "error": "error"}[row["status"]]


def _choice(row: dict | None) -> str:
    w = (row or {}).get("tuned_choice")
    return _tuning.describe(w) if w else "-"


def summarize(rows: list[dict], cfg, threads: int, wall_s: float) -> str:
    by = {(r["N"], r["K"], r["M"], r["method"]): r for r in rows}
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    ms = sorted({r["M"] for r in rows})
    meta = rows[0]
    mach = meta["machine"]
    bitnet = BITNET_US.get(threads, {}) if cfg.device.type == "cpu" else {}
    if not any(shape in bitnet for shape in shapes):
        bitnet = {}
    out = common.run_header(FAMILY, meta, cfg, threads, wall_s, versions=("torch", "torchao", "triton", "python"))[:-1]
    loads = [r["loadavg_1m"] for r in rows]
    cores = mach["cpu_affinity"] or mach["cpu_count"] or 1
    if max(loads) > cores:
        out.append(
            f"**Warning: the machine was busy** (1-minute load average {min(loads):.1f} to {max(loads):.1f} on "
            f"{cores} cores while rows were measured): other processes competed for the cores, and "
            "multi-threaded times in particular include waits for a core. Compare with care."
        )
    out.append("")
    if not cfg.flush:
        flush = "hot caches (--no-flush)"
    elif cfg.device.type == "cuda":
        flush = f"L2 flushed before each repeat ({common.fmt_bytes(common.CUDA_FLUSH_BYTES)} written)"
    else:
        target = common.cold_target_bytes(cfg)
        short_of = sorted({r["method"] for r in rows if r.get("status") == "ok" and r.get("cold") is False})
        flush = (
            "cold weights: each method rotates through copies of its weights so that each call "
            "reads them from DRAM, as a layer of a model does: at least "
            f"{common.fmt_bytes(target)} (max(2x L3, 1 GiB)) of copies between two reads of one "
            "(copies and bytes in the jsonl: weight_copies, cold_bytes)"
            + (f"; short of that, capped by memory or copy count: {', '.join(short_of)}" if short_of else "")
        )
    out.append(
        f"Median of adaptive repeats after warm-up, {flush}; x is fp32 (bf16 for F.linear bf16). "
        "Speed-up = baseline time / accelops time (>1: accelops faster). p20/p80, repeats, peak "
        f"memory and errors are in the detail table and in {cfg.results_file(FAMILY).name}."
    )
    out.append("")

    # Times of every method, then accelops' speed-up against each baseline.
    short = {
        "ternary": "ternary_matmul",
        "ternary_lut": "ternary_matmul lut3",
        "ternary_base3": "ternary_matmul base3",
        "int8": "int8_linear",
        "ternary_tuned": "ternary_matmul tuned",
        "int8_tuned": "int8_linear tuned",
        "ternary_auto": "ternary_matmul autotuned",
        "int8_auto": "int8_linear autotuned",
        "fp32": "F.linear fp32",
        "bf16": "F.linear bf16",
        "int_mm": "torch._int_mm",
        "ref_ternary_compiled": "compiled ref. ternary",
        "ref_int8_compiled": "compiled ref. int8",
        "torchao": "torchao",
        "torchao_compiled": "torchao compiled",
    }
    baselines = [
        ("fp32", "fp32"),
        ("int_mm", "_int_mm"),
        ("torchao", "torchao"),
        ("torchao_compiled", "torchao compiled"),
    ]
    methods = selected_methods()
    times, speedups, tuned_rows = [], [], []
    for n, k in shapes:
        for m in ms:
            r = lambda key: by.get((n, k, m, key))  # noqa: E731
            times.append([f"{n}x{k}", m] + [_cell(r(key)) for key in methods])
            speedups.append(
                [f"{n}x{k}", m]
                + [_fmt_ratio(_ratio(r(b), r(mine))) for mine in ("ternary", "int8") for b, _ in baselines]
            )
            tuned_rows.append(
                [f"{n}x{k}", m]
                + [_choice(r(key)) for key in TUNED]
                + [
                    _fmt_ratio(_ratio(r(plain), r(key)))
                    for key, plain in (("ternary_tuned", "ternary"), ("int8_tuned", "int8"))
                ]
                + [_fmt_ratio(_ratio(r(b), r(key))) for key in TUNED for b in ("fp32", "torchao_compiled")]
            )
            if bitnet:
                ref_us = bitnet.get((n, k)) if m == 1 else None
                t = r("ternary")
                times[-1].append(common.fmt_time(ref_us) if ref_us else "-")
                speedups[-1].append(
                    _fmt_ratio(ref_us / t["median_us"]) if ref_us and t and t["status"] == "ok" else "-"
                )
    time_headers = ["N x K", "M"] + [short[key] for key in methods] + ([BITNET_LABEL] if bitnet else [])
    speed_headers = ["N x K", "M"] + [f"{mine} vs {label}" for mine in ("ternary", "int8") for _, label in baselines]
    speed_headers += ["ternary vs bitnet.cpp (not in this run)"] if bitnet else []
    tuned_headers = [
        "N x K",
        "M",
        "ternary: table's choice",
        "int8: table's choice",
        "ternary tuned vs default",
        "int8 tuned vs default",
        "ternary tuned vs fp32",
        "ternary tuned vs torchao compiled",
        "int8 tuned vs fp32",
        "int8 tuned vs torchao compiled",
    ]
    out += [
        "Median time per call:",
        "",
        common.md_table(time_headers, times),
        "",
        "Speed-up of accelops (baseline time / accelops time):",
        "",
        common.md_table(speed_headers, speedups),
        "",
        "Tuned dispatch (a table `accelops tune` measured for each case just before, hot weights; timed "
        "like the others, cold):",
        "",
        common.md_table(tuned_headers, tuned_rows),
        "",
    ]

    # Autotune: the choice its first call measured, what that call cost, and the ratios.
    auto_rows = []
    for n, k in shapes:
        for m in ms:
            r = lambda key: by.get((n, k, m, key))  # noqa: E731
            if not any(r(key) for key in AUTO):
                continue
            auto_rows.append(
                [f"{n}x{k}", m]
                + [_choice(r(key)) for key in AUTO]
                + [
                    f"{r(key)['autotune_first_call_s']:.2f} s" if r(key) and "autotune_first_call_s" in r(key) else "-"
                    for key in AUTO
                ]
                + [
                    _fmt_ratio(_ratio(r(base), r(key)))
                    for key, plain in (("ternary_auto", "ternary"), ("int8_auto", "int8"))
                    for base in (plain, "int_mm", "torchao_compiled")
                ]
            )
    if auto_rows:
        out += [
            "Autotune on (ACCELOPS_AUTOTUNE, the default; times after the first call, which measured the "
            "candidates within the default budget on the case's own tensors) against autotune off (the "
            "plain rows), torch._int_mm and torchao compiled (ratio = baseline time / autotuned time):",
            "",
            common.md_table(
                [
                    "N x K",
                    "M",
                    "ternary: choice",
                    "int8: choice",
                    "ternary first call",
                    "int8 first call",
                    "ternary auto vs off",
                    "ternary auto vs _int_mm",
                    "ternary auto vs torchao compiled",
                    "int8 auto vs off",
                    "int8 auto vs _int_mm",
                    "int8 auto vs torchao compiled",
                ],
                auto_rows,
            ),
            "",
        ]

    # Memory limit at M=1: the ternary GEMV against a streaming read of the same bytes.
    mem_rows = []
    for n, k in shapes:
        for key in ("ternary", *GEMV_ONLY):
            st, t = by.get((n, k, 1, STREAM_KEY)), by.get((n, k, 1, key))
            if st is None or st["status"] != "ok" or (key in GEMV_ONLY and t is None):
                continue
            ok = t is not None and t["status"] == "ok"
            i2 = _ratio(by.get((n, k, 1, "ternary")), t)
            mem_rows.append(
                [
                    f"{n}x{k}",
                    common.fmt_bytes(st["bytes_moved"]),
                    common.fmt_time(st["median_us"]),
                    f"{st['gb_per_s']:.1f}",
                    short[key],
                    _cell(t),
                    f"{t['gb_per_s']:.1f}" if ok and "gb_per_s" in t else "-",
                    f"{st['median_us'] / t['median_us']:.2f}" if ok else "-",
                    _fmt_ratio(i2) if key != "ternary" else "-",
                ]
            )
    if mem_rows:
        out += [
            "Memory limit at M=1: ternary_matmul against a streaming read of the bytes it reads (packed "
            "weight + x row), cold the same way (torch.amax over an int64 view of rotating copies). The "
            "lut3 and base3 formats read 11% and 20% fewer bytes than the stream row (their GB/s count their "
            "own bytes); the last column is the i2 time over the format's (>1: the format is faster):",
            "",
            common.md_table(
                [
                    "N x K",
                    "bytes",
                    "streaming read",
                    "GB/s",
                    "method",
                    "M=1",
                    "GB/s",
                    "stream time / method time",
                    "vs i2 (ternary_matmul)",
                ],
                mem_rows,
            ),
            "",
        ]

    # Targets.
    targets = []

    def target(what, n, k, m, ratio, goal):
        mark = "-" if ratio is None else ("✓" if ratio >= goal else "✗")
        targets.append([what, f"{n}x{k}", m, _fmt_ratio(ratio), f">= {goal:g}x", mark])

    for n, k in shapes:
        r = lambda m, key: by.get((n, k, m, key))  # noqa: E731
        if 1 in ms:
            target("ternary_matmul vs fp32 F.linear", n, k, 1, _ratio(r(1, "fp32"), r(1, "ternary")), 5)
        if 1 in ms and r(1, STREAM_KEY):
            target(
                "ternary_matmul M=1: fraction of the streaming read's bandwidth",
                n,
                k,
                1,
                _ratio(r(1, STREAM_KEY), r(1, "ternary")),
                0.7,
            )
        if 32 in ms:
            target("ternary_matmul vs torch._int_mm", n, k, 32, _ratio(r(32, "int_mm"), r(32, "ternary")), 1)
        if 512 in ms:
            target("int8_linear vs fp32 F.linear", n, k, 512, _ratio(r(512, "fp32"), r(512, "int8")), 3)
        for m in ms:
            target("int8_linear vs torchao compiled", n, k, m, _ratio(r(m, "torchao_compiled"), r(m, "int8")), 1)
        for m in ms:
            target(
                "int8_linear tuned vs torchao compiled",
                n,
                k,
                m,
                _ratio(r(m, "torchao_compiled"), r(m, "int8_tuned")),
                1,
            )
        for m in ms:
            for key, op in AUTO.items():
                target(
                    f"{op} autotuned (no table beforehand) vs torchao compiled",
                    n,
                    k,
                    m,
                    _ratio(r(m, "torchao_compiled"), r(m, key)),
                    1,
                )
        if bitnet and (n, k) in bitnet and 1 in ms:
            t = r(1, "ternary")
            ratio = bitnet[(n, k)] / t["median_us"] if t and t["status"] == "ok" else None
            target(f"ternary_matmul vs {BITNET_LABEL}", n, k, 1, ratio, 1)
    hits = sum(t[-1] == "✓" for t in targets)
    out += [
        f"Targets: {hits} of {len(targets)} met.",
        "",
        common.md_table(["target", "N x K", "M", "speed-up", "goal", ""], targets),
        "",
    ]

    # Detail: every row.
    detail = []
    for n, k in shapes:
        for m in ms:
            for key, label in METHODS:
                row = by.get((n, k, m, key))
                if row is None:
                    continue
                if row["status"] == "ok":
                    spread = f"{common.fmt_time(row['p20_us'])} - {common.fmt_time(row['p80_us'])}"
                    detail.append(
                        [
                            f"{n}x{k}",
                            m,
                            label,
                            common.fmt_time(row["median_us"]),
                            spread,
                            row["repeats"],
                            common.fmt_bytes(row["weight_bytes"]),
                            common.fmt_bytes(row["peak_mem_bytes"]),
                            f"{row['rel_err_vs_fp32_linear']:.2e}",
                        ]
                    )
                else:
                    detail.append([f"{n}x{k}", m, label, _cell(row), row.get("reason", ""), "", "", "", ""])
    out += [
        "<details><summary>All rows</summary>",
        "",
        common.md_table(
            ["N x K", "M", "method", "median", "p20 - p80", "repeats", "weights", "peak memory", "rel. error vs fp32"],
            detail,
        ),
        "",
        "</details>",
        "",
    ]
    out += common.memory_note(rows)
    return "\n".join(out)


# --------------------------------------------------------------------------- entry points


def run(cfg: common.Config) -> common.FamilyResult:
    _, torchao_why = common.import_torchao()
    if torchao_why:
        print(f"note: {torchao_why}; torchao rows say so", file=sys.stderr)
    meta = common.run_metadata(cfg)
    timer = common.Timer(cfg)
    # The default rows are the fixed dispatch: no table (a user's ~/.cache one included);
    # the tuned rows install their own per call.
    _tuning.reset(None, loaded=True)
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if cfg.quick else (SHAPES, MS)
    shapes, ms = cfg.shapes or shapes, cfg.ms or ms
    out_path = cfg.results_file(FAMILY)
    summaries, all_rows = [], []
    with (
        torch.no_grad(),
        tqdm(
            total=len(cfg.threads) * len(shapes) * (len(ms) * len(METHODS) + 1),
            desc=FAMILY,
            file=sys.stderr,
            dynamic_ncols=True,
        ) as progress,
    ):
        for threads in cfg.threads:
            # Same count for every method in a pass. F.linear at M=1 stays single-threaded
            # (MKL GEMV) whatever this says; that is what a user gets.
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            rows = []
            for n, k in shapes:
                s = Shape(cfg, n, k, torchao_why)
                stream = stream_read_row(cfg, timer, meta, s, threads, out_path, progress)
                rows.append(stream)
                progress.update(1)
                for m in ms:
                    rows += run_case(cfg, timer, meta, s, m, threads, out_path, progress, stream)
                del s
            summaries.append(summarize(rows, cfg, threads, time.perf_counter() - t0))
            all_rows += rows
    _tuning.reset()
    failures = [
        f"{r['label']} N={r['N']} K={r['K']} M={r['M']} {r['threads']}t: {r['status']}: {r.get('reason')}"
        for r in all_rows
        if r["accelops"] and r["status"] not in ("ok", "skipped")
    ]
    summary = "\n".join(["## Matmul benchmark", "", *summaries])
    return common.FamilyResult(FAMILY, summary, all_rows, failures)


def main(argv=None) -> int:
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
