"""Fake-quant family: accelops `fake_quantize` / `fake_quantize_learnable` against what a
QAT user runs otherwise: torch.fake_quantize_per_{channel,tensor}_affine (eager and under
torch.compile) and torch._fake_quantize_learnable_per_channel_affine, forward alone and
forward + backward (the gradient w.r.t. x, and scale/zero point for LSQ).

Every accelops output and gradient is checked against torch's before it is timed (forward
bit-exact; LSQ scale/zero-point gradients to summation-order tolerance); a wrong kernel is
reported as WRONG and not timed. Speed-up = baseline time / accelops time, same run.

    python bench/bench_fake_quant.py [--quick] [--threads 1,2] [--results-dir DIR]
"""

from __future__ import annotations

import os
import sys
import time

import common
import torch
from tqdm import tqdm

from accelops import ops
from accelops.reference import fake_quant as R

FAMILY = "fake_quant"
SHAPES = [(4096, 4096), (11008, 4096)]  # a weight per channel (axis 0), or activations per tensor
QUICK_SHAPES = [(256, 320)]
QMIN, QMAX = -128, 127

# (key, label, accelops?). Each case times every method that applies to it.
METHODS = {
    "accelops": ("accelops", True),
    "torch": ("torch eager", False),
    "torch_compiled": ("torch.compile(torch op)", False),
}
CASES = [  # (case key, description)
    ("per_channel", "per-channel (axis 0) int8"),
    ("per_tensor", "per-tensor int8"),
    ("lsq_per_channel", "learnable (LSQ) per-channel"),
]
PASSES = ["fwd", "fwd+bwd"]
# Issue 28's goals against torch eager, on every CPU, with and without THP_MEM_ALLOC_ENABLE=1
# (one run each: torch reads the variable once per process).
TARGETS = {
    ("per_channel", "fwd+bwd"): ("per-channel fake_quantize fwd+bwd vs torch", 5),
    ("lsq_per_channel", "fwd+bwd"): ("LSQ per-channel fwd+bwd vs torch", 4),
}


def _qparams(case, x, gen):
    n = x.shape[0]
    if case == "per_tensor":
        scale = float(x.abs().max()) / 127 * 0.8
        return scale, 0
    scale = x.abs().amax(dim=1) / 127 * 0.8  # some values clamp
    if case == "lsq_per_channel":
        return scale, torch.randn(n, generator=gen)
    return scale, torch.zeros(n, dtype=torch.int32)


def _forward_fns(case, scale, zero):
    """-> {method: f(x, scale, zero) -> y} for this case."""
    if case == "per_channel":
        mine = lambda x, s, z: ops.fake_quantize(x, s, z, QMIN, QMAX, axis=0)  # noqa: E731
        theirs = lambda x, s, z: torch.fake_quantize_per_channel_affine(x, s, z, 0, QMIN, QMAX)  # noqa: E731
    elif case == "per_tensor":
        mine = lambda x, s, z: ops.fake_quantize(x, s, z, QMIN, QMAX)  # noqa: E731
        theirs = lambda x, s, z: torch.fake_quantize_per_tensor_affine(x, s, z, QMIN, QMAX)  # noqa: E731
    else:
        mine = lambda x, s, z: ops.fake_quantize_learnable(x, s, z, QMIN, QMAX, axis=0)  # noqa: E731
        theirs = lambda x, s, z: torch._fake_quantize_learnable_per_channel_affine(  # noqa: E731
            x, s, z, 0, QMIN, QMAX, 1.0
        )
    return {"accelops": mine, "torch": theirs, "torch_compiled": torch.compile(theirs, dynamic=False)}


def _call(fn, pass_, case, x, scale, zero, grad):
    """A zero-argument callable running one pass; it returns what the pass produces."""
    learnable = case == "lsq_per_channel"
    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                return fn(x, scale, zero)

        return run
    xg = x.detach().requires_grad_()
    sg = scale.detach().requires_grad_() if learnable else scale
    zg = zero.detach().requires_grad_() if learnable else zero
    inputs = (xg, sg, zg) if learnable else (xg,)

    def run():
        # autograd.grad, not .backward(): no accumulation into .grad between repeats
        return torch.autograd.grad(fn(xg, sg, zg), inputs, grad)

    return run


def _check(case, pass_, mine, theirs, gold=None) -> dict:
    """Forward and dx bit-exact with torch; LSQ's dscale/dzero (sums over a channel) judged
    against an fp64 sum of the same terms: within 2x torch's own error (+1e-6 relative)."""
    if pass_ == "fwd":
        return {"ok": bool(torch.equal(mine, theirs)), "against": "torch eager, bit-exact"}
    ok = bool(torch.equal(mine[0], theirs[0]))
    out = {"against": "torch eager (dx bit-exact; dscale/dzero within 2x torch's error vs an fp64 sum)"}
    for name, a, b, g in zip(("dscale", "dzero"), mine[1:], theirs[1:], (gold or ())):
        err, torch_err = float((a.double() - g).abs().max()), float((b.double() - g).abs().max())
        out[f"{name}_err"], out[f"{name}_torch_err"] = err, torch_err
        ok = ok and err <= 2 * torch_err + 1e-6 * float(g.abs().max())
    out["ok"] = ok
    return out


def _lsq_gold(x, scale, zero, grad):
    _, ds, dz = R.fake_quantize_learnable_backward(grad.double(), x.double(), scale, zero, QMIN, QMAX, 0)
    return ds.double(), dz.double()


def run_case(cfg, timer, meta, shape, case, threads, out_path, progress) -> list[dict]:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 0.05).to(cfg.device)
    grad = torch.randn(shape, generator=gen).to(cfg.device)
    scale, zero = _qparams(case, x, gen)
    if isinstance(scale, torch.Tensor):
        scale, zero = scale.to(cfg.device), zero.to(cfg.device)
    fns = _forward_fns(case, scale, zero)
    rows = []
    for pass_ in PASSES:
        calls = {key: _call(fn, pass_, case, x, scale, zero, grad) for key, fn in fns.items()}
        reference = calls["torch"]()
        gold = _lsq_gold(x, scale, zero, grad) if (case == "lsq_per_channel" and pass_ == "fwd+bwd") else None
        check = _check(case, pass_, calls["accelops"](), reference, gold)
        for key, call in calls.items():
            label, is_accelops = METHODS[key]
            progress.set_postfix_str(f"{threads}t {shape} {case} {pass_} {key}")
            row = {
                **meta,
                "family": FAMILY,
                "method": key,
                "label": label,
                "accelops": is_accelops,
                "case": case,
                "pass": pass_,
                "threads": threads,
                "shape": list(shape),
                "dtype": "float32",
                "bytes": x.numel() * x.element_size(),
                "budget_s": cfg.budget_s,
                "status": "ok",
            }
            if is_accelops:
                row["check"] = check
            if is_accelops and not check["ok"]:
                row.update(status="wrong", reason="output or gradient disagrees with torch's: not timed")
            else:
                try:
                    row.update(common.time_call(call, timer))
                except Exception as exc:  # a baseline that cannot run here is a row, not a crash
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
            row["loadavg_1m"] = os.getloadavg()[0]
            common.append_row(out_path, row)
            rows.append(row)
            progress.update(1)
    return rows


def _ratio(base, mine):
    if not base or not mine or base["status"] != "ok" or mine["status"] != "ok":
        return None
    return base["median_us"] / mine["median_us"]


def _fmt(r):
    return "-" if r is None else f"{r:.2f}x"


def _cell(row):
    if row is None:
        return "-"
    if row["status"] == "ok":
        return (
            f"{common.fmt_time(row['median_us'])} ({common.fmt_time(row['p20_us'])} - {common.fmt_time(row['p80_us'])})"
        )
    return {"wrong": "**WRONG**", "error": "error", "skipped": "n/a"}[row["status"]]


def summarize(rows, cfg, threads, wall_s) -> str:
    by = {(tuple(r["shape"]), r["case"], r["pass"], r["method"]): r for r in rows}
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    meta = rows[0]
    out = common.run_header(FAMILY, meta, cfg, threads, wall_s, versions=("torch", "triton")) + [
        "fp32 tensors; median (p20 - p80) of adaptive repeats after warm-up. fwd+bwd = forward and "
        "torch.autograd.grad of x (and of scale and zero point for LSQ). Speed-up = baseline / accelops. "
        "accelops asks for transparent huge pages for its large outputs (first-touch page faults of a "
        "fresh 64 MiB tensor cost more than the kernel on a VM); torch does so only with "
        f"THP_MEM_ALLOC_ENABLE=1, which was {common.thp_note(meta)} "
        "in this run.",
        "",
    ]
    table, mem, targets = [], [], []
    for shape in shapes:
        for case, desc in CASES:
            for pass_ in PASSES:
                r = lambda key: by.get((shape, case, pass_, key))  # noqa: E731
                table.append(
                    [
                        f"{shape[0]}x{shape[1]}",
                        desc,
                        pass_,
                        _cell(r("accelops")),
                        _cell(r("torch")),
                        _cell(r("torch_compiled")),
                        _fmt(_ratio(r("torch"), r("accelops"))),
                        _fmt(_ratio(r("torch_compiled"), r("accelops"))),
                    ]
                )
                mem.append(
                    [f"{shape[0]}x{shape[1]}", desc, pass_]
                    + [common.fmt_bytes((r(k) or {}).get("peak_mem_bytes")) for k in METHODS]
                )
                if (case, pass_) in TARGETS:
                    name, goal = TARGETS[(case, pass_)]
                    ratio = _ratio(r("torch"), r("accelops"))
                    mark = "-" if ratio is None else ("✓" if ratio >= goal else "✗")
                    targets.append([name, f"{shape[0]}x{shape[1]}", _fmt(ratio), f">= {goal:g}x", mark])
    out += [
        common.md_table(
            ["shape", "case", "pass", "accelops", "torch eager", "torch.compile", "vs eager", "vs compiled"], table
        ),
        "",
    ]
    hits = sum(t[-1] == "✓" for t in targets)
    out += [
        f"Targets: {hits} of {len(targets)} met.",
        "",
        common.md_table(["target", "shape", "speed-up", "goal", ""], targets),
        "",
    ]
    out += [
        "Peak memory growth during one call (output and saved tensors included):",
        "",
        common.md_table(["shape", "case", "pass"] + [METHODS[k][0] for k in METHODS], mem),
        "",
    ]
    out += common.memory_note(rows)
    return "\n".join(out)


def run(cfg: common.Config) -> common.FamilyResult:
    meta = common.run_metadata(cfg)
    timer = common.Timer(cfg)
    shapes = QUICK_SHAPES if cfg.quick else SHAPES
    shapes = cfg.shapes or shapes
    out_path = cfg.results_file(FAMILY)
    summaries, all_rows = [], []
    total = len(cfg.threads) * len(shapes) * len(CASES) * len(PASSES) * len(METHODS)
    with tqdm(total=total, desc=FAMILY, file=sys.stderr, dynamic_ncols=True) as progress:
        for threads in cfg.threads:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            rows = []
            for shape in shapes:
                for case, _ in CASES:
                    rows += run_case(cfg, timer, meta, shape, case, threads, out_path, progress)
            summaries.append(summarize(rows, cfg, threads, time.perf_counter() - t0))
            all_rows += rows
    failures = [
        f"{r['label']} {r['case']} {r['pass']} {r['shape']} {r['threads']}t: {r['status']}: {r.get('reason')}"
        for r in all_rows
        if r["accelops"] and r["status"] not in ("ok", "skipped")
    ]
    summary = "\n".join(["## Fake-quant benchmark", "", *summaries])
    return common.FamilyResult(FAMILY, summary, all_rows, failures)


def main(argv=None) -> int:
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
