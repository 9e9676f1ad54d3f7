"""Layers family: BitLinear at inference (eval, no_grad: its cached packed weight and the
ternary kernel) against TernaryLinear, the packed inference layer it should match, and
nn.Linear, at decode (M=1); BitLinear's training forward (which quantizes the weight on
every call) is timed beside them for scale. Issue 22 item 6: a BitLinear(512, 32000) call
took 244.6 ms against 3.3 ms for nn.Linear; the target is BitLinear eval within 1.5x of
TernaryLinear at M=1.

Before timing, BitLinear eval's output is checked bit for bit against TernaryLinear's and
against its own training forward; a mismatch is reported as WRONG and not timed. The
target is judged on a paired ratio (BitLinear eval and TernaryLinear timed in alternating
short batches, the median of the per-round ratios, as bench_dispatch does): on a shared
machine the load moves between two rows timed one after the other.

    python bench/bench_layers.py [--quick] [--threads 1,2] [--results-dir DIR]
(or through bench/run.py, which runs every family)
"""

from __future__ import annotations

import copy
import os
import sys
import time

import common
import torch
from bench_dispatch import _interleaved, paired_ratio
from torch import nn
from tqdm import tqdm

from accelops.nn import BitLinear, TernaryLinear

FAMILY = "layers"
SHAPES = [(32000, 512), (4096, 4096)]  # (N, K): the vocabulary head, a 7B-class projection
MS = [1]
QUICK_SHAPES = [(256, 320)]  # K not a multiple of 128: the padded packed layout
TARGET_VS_TERNARY = 1.5

# key -> (label, accelops?)
METHODS = {
    "bitlinear_eval": ("BitLinear eval, no_grad (cached packed weight)", True),
    "ternary_linear": ("TernaryLinear", True),
    "linear": ("nn.Linear fp32", False),
    "bitlinear_train": ("BitLinear training forward (grad enabled, quantizes every call)", True),
}


def _bytes_read(key: str, layer) -> int:
    """Weight bytes one call reads: what sets how many copies keep its weights cold."""
    if key == "bitlinear_eval":
        return common.tensor_bytes(*layer._packed_weight())
    if key == "ternary_linear":
        return common.tensor_bytes(layer.w_packed, layer.w_scale)
    return common.tensor_bytes(layer.weight)


def _layers(n: int, k: int, device) -> dict:
    g = torch.Generator().manual_seed(n * 100003 + k)
    linear = nn.Linear(k, n, device=device)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
    bit = BitLinear.from_linear(linear).eval()
    return {
        "bitlinear_eval": bit,
        "ternary_linear": TernaryLinear.from_bitlinear(bit),
        "linear": linear,
        "bitlinear_train": bit,
    }


def _call(key: str, layer, x):
    if key == "bitlinear_train":

        def run():
            with torch.enable_grad():  # weight requires grad: the training path
                return layer(x)

        return run

    def run():
        with torch.no_grad():
            return layer(x)

    return run


def _check(layers: dict, x) -> dict:
    with torch.no_grad():
        fast = layers["bitlinear_eval"](x)
        tern = layers["ternary_linear"](x)
    train = layers["bitlinear_train"](x).detach()
    return {
        "ok": bool(torch.equal(fast, tern) and torch.equal(fast, train)),
        "equal_ternary_linear": bool(torch.equal(fast, tern)),
        "equal_training_forward": bool(torch.equal(fast, train)),
        "against": "TernaryLinear and BitLinear's training forward, bit-exact",
    }


def run_case(cfg, timer, meta, n, k, m, threads, out_path, progress) -> list[dict]:
    base = _layers(n, k, cfg.device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(cfg.device)
    check = _check(base, x)
    rows, timed_calls = [], {}
    for key, (label, is_accelops) in METHODS.items():
        progress.set_postfix_str(f"{threads}t N={n} K={k} M={m} {key}")
        layer = base[key]
        extra = common.copies_for(cfg, _bytes_read(key, layer)) - 1
        if key == "bitlinear_eval":
            # Copies sharing the fp32 weight (which this path does not read), each with its
            # own packed cache: cold packed weights without 16 x 64 MiB of fp32 copies.
            copies = [layer] + [BitLinear.from_linear(layer).eval() for _ in range(extra)]
        else:
            copies = [layer] + [copy.deepcopy(layer) for _ in range(extra)]
        row = {
            **meta,
            "family": FAMILY,
            "op": "linear_layer",
            "method": key,
            "label": label,
            "accelops": is_accelops,
            "threads": threads,
            "M": m,
            "N": n,
            "K": k,
            "dtype": "float32",
            **common.cold_fields(cfg, _bytes_read(key, layer), len(copies)),
            "status": "ok",
        }
        if key == "bitlinear_eval":
            row["check"] = check
        if key == "bitlinear_eval" and not check["ok"]:
            row.update(status="wrong", reason="output differs from TernaryLinear's or the training forward's")
        else:
            try:
                calls = [_call(key, c, x) for c in copies]
                for call in calls:  # each copy's packed cache made once, as a deployed layer's is
                    call()
                timed_calls[key] = common.rotating(calls)
                timed = common.time_call(timed_calls[key], timer)
                # per-row timing details go in one dict: the results database takes a family's
                # scalar fields as the case's configuration
                row["timing"] = {f: timed.pop(f) for f in ("extra_warmup_calls", "memory_call_timed")}
                row.update(timed)
            except Exception as exc:  # a row, not a crash
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        row["loadavg_1m"] = os.getloadavg()[0]
        rows.append(row)
        progress.update(1)
    if {"bitlinear_eval", "ternary_linear"} <= set(timed_calls):
        pair = {k: timed_calls[k] for k in ("bitlinear_eval", "ternary_linear")}
        _, samples = _interleaved(pair, cfg.budget_s, 5 if cfg.quick else 21, batch_s=0.003)
        med, p20, p80 = paired_ratio(samples["bitlinear_eval"], samples["ternary_linear"])
        eval_row = next(r for r in rows if r["method"] == "bitlinear_eval")
        eval_row["paired_vs_ternary_linear"] = {
            "median": med,
            "p20": p20,
            "p80": p80,
            "rounds": len(samples["bitlinear_eval"]),
        }
    for row in rows:
        common.append_row(out_path, row)
    return rows


def _ratio(a, b):
    """a's time over b's: how many times slower a is."""
    if not a or not b or a["status"] != "ok" or b["status"] != "ok":
        return None
    return a["median_us"] / b["median_us"]


def _cell(row):
    if row is None:
        return "-"
    if row["status"] == "ok":
        return (
            f"{common.fmt_time(row['median_us'])} ({common.fmt_time(row['p20_us'])} - {common.fmt_time(row['p80_us'])})"
        )
    return {"wrong": "**WRONG**", "error": "error"}.get(row["status"], row["status"])


def summarize(rows, cfg, threads, wall_s) -> str:
    by = {(r["N"], r["K"], r["M"], r["method"]): r for r in rows}
    cases = list(dict.fromkeys((r["N"], r["K"], r["M"]) for r in rows))
    out = common.run_header(FAMILY, rows[0], cfg, threads, wall_s, versions=("torch",)) + [
        "fp32 input; median (p20 - p80) of adaptive repeats, weights cold (rotating copies). "
        "Ratios are time over time: BitLinear eval's time / the other's; paired: the median "
        "(p20-p80) of per-round ratios of alternating short batches of the two.",
        "",
    ]
    fmt = lambda r: "-" if r is None else f"{r:.2f}x"  # noqa: E731
    table, targets = [], []
    for n, k, m in cases:
        r = lambda key: by.get((n, k, m, key))  # noqa: E731
        vs_tern, vs_lin = _ratio(r("bitlinear_eval"), r("ternary_linear")), _ratio(r("bitlinear_eval"), r("linear"))
        pair = (r("bitlinear_eval") or {}).get("paired_vs_ternary_linear")
        paired = "-" if pair is None else f"{pair['median']:.2f}x [{pair['p20']:.2f}-{pair['p80']:.2f}]"
        table.append(
            [
                f"{k}x{n}",
                m,
                _cell(r("bitlinear_eval")),
                _cell(r("ternary_linear")),
                _cell(r("linear")),
                _cell(r("bitlinear_train")),
                fmt(vs_tern),
                paired,
                fmt(vs_lin),
            ]
        )
        if m == 1:
            mark = "-" if pair is None else ("✓" if pair["median"] <= TARGET_VS_TERNARY else "✗")
            targets.append(
                ["BitLinear eval vs TernaryLinear (paired)", f"{k}x{n}", m, paired, f"<= {TARGET_VS_TERNARY}x", mark]
            )
    out += [
        common.md_table(
            [
                "in x out",
                "M",
                "BitLinear eval",
                "TernaryLinear",
                "nn.Linear",
                "BitLinear training fwd",
                "eval / TernaryLinear",
                "paired",
                "eval / nn.Linear",
            ],
            table,
        ),
        "",
    ]
    hits = sum(t[-1] == "✓" for t in targets)
    out += [
        f"Targets: {hits} of {len(targets)} met.",
        "",
        common.md_table(["target", "in x out", "M", "time ratio", "goal", ""], targets),
        "",
    ]
    return "\n".join(out)


def run(cfg: common.Config) -> common.FamilyResult:
    meta = common.run_metadata(cfg)
    timer = common.Timer(cfg)
    shapes = cfg.shapes or (QUICK_SHAPES if cfg.quick else SHAPES)
    ms = cfg.ms or MS
    out_path = cfg.results_file(FAMILY)
    summaries, all_rows = [], []
    total = len(cfg.threads) * len(shapes) * len(ms) * len(METHODS)
    with tqdm(total=total, desc=FAMILY, file=sys.stderr, dynamic_ncols=True) as progress:
        for threads in cfg.threads:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            rows = []
            for n, k in shapes:
                for m in ms:
                    rows += run_case(cfg, timer, meta, n, k, m, threads, out_path, progress)
            summaries.append(summarize(rows, cfg, threads, time.perf_counter() - t0))
            all_rows += rows
    failures = [
        f"{r['label']} {r['K']}x{r['N']} M={r['M']} {r['threads']}t: {r['status']}: {r.get('reason')}"
        for r in all_rows
        if r["accelops"] and r["status"] != "ok"
    ]
    summary = "\n".join(["## Layers benchmark (BitLinear inference)", "", *summaries])
    return common.FamilyResult(FAMILY, summary, all_rows, failures)


def main(argv=None) -> int:
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
