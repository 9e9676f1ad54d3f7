"""FFN family: accelops FusedFFN (one fused op, forward and backward) against the same
Llama-style MLP in eager PyTorch (nn.Linear x3, F.silu, a product) and under
torch.compile (inductor), at a 1B-class layer: 4096 tokens, dim 1024, hidden 2816, fp32,
SwiGLU.

Two modes: "forward" (inference: no grad) and "train" (one training step: forward, then
backward with a fixed output gradient into x and every weight; the gradients are cleared,
not zeroed, between steps so each step allocates them as a first step does).

Time: the variants of a mode are timed round-robin (eager, compiled, fused, then the next
round in rotated order) in one process, so load from other processes on this shared
machine hits every variant alike; median with p20/p80 over the rounds.

Peak memory: every (variant, mode) runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536
(so glibc mmaps every buffer above 64 KiB and returns it on free: RSS follows the live
tensors). The child builds the weights and inputs, runs one untimed step (compiling, and
loading the BLAS code and buffers), frees it, then resets the kernel's high-water mark
(/proc/self/clear_refs 5) and reports VmHWM minus the VmRSS just before the measured step.
Resetting the mark is what makes this the step's own peak: ru_maxrss cannot be reset, so
after the warm-up (needed for torch.compile, whose compile peak dwarfs a step) it would
report the warm-up's peak. Where clear_refs is not writable the child falls back to
ru_maxrss minus that RSS and says so in the row.

    python bench/bench_ffn.py [--quick] [--threads 1,2] [--results-dir DIR]
(or through bench/run.py, which runs every family)
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import common
import torch

FAMILY = "ffn"
SHAPE = (4096, 1024, 2816)  # tokens, dim, hidden
QUICK_SHAPE = (64, 32, 48)
ACTIVATION = "swiglu"
DTYPE = torch.float32
METHODS = [
    ("fused", "accelops FusedFFN"),
    ("eager", "eager PyTorch MLP (nn.Linear x3 + F.silu)"),
    ("compiled", "torch.compile(eager MLP), inductor"),
]
LABELS = dict(METHODS)
MODES = ("forward", "train")
# Goals: the issue's (time 1.1x, memory 0.7x of eager) and the team's (1.0x, 0.5x).
TIME_GOAL, TIME_ISSUE = 1.0, 1.1
MEM_GOAL, MEM_ISSUE = 0.5, 0.7


# --------------------------------------------------------------------------- set-up


def build(method: str, t: int, d: int, h: int, seed: int = 0):
    """-> (module, x, dy, eager reference module) on the CPU; `module` is the one to run."""
    from accelops.nn import FFN, FusedFFN

    torch.manual_seed(seed)
    ref = FFN(d, h, ACTIVATION, dtype=DTYPE)
    with torch.no_grad():  # a trained layer's scale, so activations are O(1)
        for p in ref.parameters():
            p.normal_(0, p.shape[1] ** -0.5)
    x = torch.randn(t, d, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(t, d, dtype=DTYPE)
    if method == "fused":
        module = FusedFFN.from_module(ref)
    elif method == "compiled":
        module = torch.compile(ref)
    else:
        module = ref
    return module, x, dy, ref


def step_fn(module, ref, x, dy, mode: str):
    params = list(ref.parameters())

    def forward():
        with torch.no_grad():
            return module(x)

    def train():
        y = module(x)
        y.backward(dy)
        x.grad = None
        for p in params:
            p.grad = None
        return y

    return forward if mode == "forward" else train


def check_fused(t: int, d: int, h: int) -> dict:
    """FusedFFN's output and gradients against the eager module on the same weights, as
    error relative to an fp64 computation (both must be at fp32 level)."""
    module, x, dy, ref = build("fused", t, d, h)
    ref64 = copy.deepcopy(ref).double()
    out = {}
    for name, m, xx, dd in (
        ("fused", module, x, dy),
        ("eager", ref, x, dy),
        ("fp64", ref64, x.detach().double().requires_grad_(True), dy.double()),
    ):
        y = m(xx)
        grads = torch.autograd.grad(y, [xx, *(ref64 if name == "fp64" else ref).parameters()], dd)
        out[name] = [y.detach().double(), *(g.double() for g in grads)]

    def rel(a, b):
        return max(((p - q).norm() / q.norm().clamp_min(1e-300)).item() for p, q in zip(a, b))

    fused_err, eager_err = rel(out["fused"], out["fp64"]), rel(out["eager"], out["fp64"])
    ok = fused_err <= 2 * eager_err + 1e-6
    return {
        "ok": ok,
        "max_rel_err_fused": fused_err,
        "max_rel_err_eager": eager_err,
        "against": "fp64 eager MLP (output and every gradient)",
        "rule": "fused <= 2 x eager + 1e-6",
    }


# --------------------------------------------------------------------------- memory (child process)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def memory_child(method: str, mode: str, t: int, d: int, h: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    module, x, dy, ref = build(method, t, d, h)
    fn = step_fn(module, ref, x, dy, mode)
    fn()  # warm-up: compiles, loads BLAS code and its buffers
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        how = "vmhwm_reset"
    except OSError:
        how = "ru_maxrss"
    base_kib = _status_kib("VmRSS")
    y = fn()
    if how == "vmhwm_reset":
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del y
    return {
        "peak_mem_bytes": max(peak_kib - base_kib, 0) * 1024,
        "peak_mem_method": how,
        "rss_before_bytes": base_kib * 1024,
    }


MEMORY_METHODS = {
    "vmhwm_reset": (
        "fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536; after an untimed warm-up step, the "
        "high-water mark is reset (/proc/self/clear_refs 5) and the row is VmHWM minus VmRSS just "
        "before the measured step (weights, inputs and dy already exist; the output is included)"
    ),
    "ru_maxrss": (
        "fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536; ru_maxrss minus VmRSS before the step "
        "(clear_refs not writable here, so the warm-up's peak may be included)"
    ),
}


def measure_memory(method: str, mode: str, shape, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_memory-child",
        method,
        mode,
        *(str(v) for v in shape),
        str(threads),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing


def time_round_robin(fns: dict, cfg: common.Config) -> dict:
    """Interleaved repeats: every round calls each variant once (order rotated each round)."""
    for fn in fns.values():  # first call: compilation, lazy initialization
        fn()
    keys = list(fns)
    t0 = time.perf_counter()
    for k in keys:  # one warm round, which also sizes the run
        fns[k]()
    round_s = time.perf_counter() - t0
    rounds = int(cfg.budget_s * len(keys) / max(round_s, 1e-9))
    rounds = max(3 if cfg.quick else 7, min(cfg.max_repeats, rounds))
    times = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in order:
            s = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - s)
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = {
            "median_us": common.percentile(ts, 0.5) * 1e6,
            "p20_us": common.percentile(ts, 0.2) * 1e6,
            "p80_us": common.percentile(ts, 0.8) * 1e6,
            "min_us": ts[0] * 1e6,
            "repeats": rounds,
        }
    return out


# --------------------------------------------------------------------------- summary


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def _fmt(r):
    return "-" if r is None else f"{r:.2f}x"


def summarize(rows: list[dict], cfg, threads: int, wall_s: float) -> str:
    meta = rows[0]
    mach = meta["machine"]
    t, d, h = meta["T"], meta["D"], meta["H"]
    by = {(r["mode"], r["method"]): r for r in rows}
    out = common.run_header(FAMILY, meta, cfg, threads, wall_s, versions=("torch", "python"))[:-1]
    loads = [r["loadavg_1m"] for r in rows]
    cores = mach["cpu_affinity"] or mach["cpu_count"] or 1
    if max(loads) > cores:
        out.append(
            f"**The machine was busy** (1-minute load average {min(loads):.1f} to {max(loads):.1f} on {cores} "
            "cores): the variants were timed round-robin so the load hits each alike, but absolute times "
            "are inflated and the spread is wide."
        )
    out += [
        "",
        f"Shape: {t} tokens, dim {d}, hidden {h}, {str(DTYPE).replace('torch.', '')}, {ACTIVATION}. "
        "Ratios are accelops / baseline (below 1: accelops faster or smaller).",
        "",
    ]
    table = []
    for mode in MODES:
        for key, label in METHODS:
            r = by.get((mode, key))
            if r is None:
                continue
            if r["status"] != "ok":
                table.append([mode, label, r["status"], r.get("reason", "")[:80], "", "", "", "", ""])
                continue
            f = by.get((mode, "fused"))
            table.append(
                [
                    mode,
                    label,
                    common.fmt_time(r["median_us"]),
                    f"{common.fmt_time(r['p20_us'])} - {common.fmt_time(r['p80_us'])}",
                    r["repeats"],
                    common.fmt_bytes(r.get("peak_mem_bytes")),
                    _fmt(_ratio(f["median_us"], r["median_us"]))
                    if key != "fused" and f and f["status"] == "ok"
                    else "",
                    _fmt(_ratio(f.get("peak_mem_bytes"), r.get("peak_mem_bytes"))) if key != "fused" and f else "",
                    f"{r['loadavg_1m']:.1f}" if "loadavg_1m" in r else "",
                ]
            )
    out += [
        common.md_table(
            [
                "mode",
                "variant",
                "median",
                "p20 - p80",
                "rounds",
                "peak memory",
                "fused time ratio",
                "fused memory ratio",
                "load",
            ],
            table,
        ),
        "",
    ]

    targets = []

    def target(what, ratio, goal):
        mark = "-" if ratio is None else ("✓" if ratio <= goal else "✗")
        targets.append([what, _fmt(ratio), f"<= {goal:g}x", mark])

    f, e, c = by.get(("train", "fused")), by.get(("train", "eager")), by.get(("train", "compiled"))
    ok = lambda r: r is not None and r["status"] == "ok"  # noqa: E731
    t_ratio = _ratio(f["median_us"], e["median_us"]) if ok(f) and ok(e) else None
    m_ratio = _ratio(f.get("peak_mem_bytes"), e.get("peak_mem_bytes")) if ok(f) and ok(e) else None
    target("training step time vs eager (team goal)", t_ratio, TIME_GOAL)
    target("training step time vs eager (issue)", t_ratio, TIME_ISSUE)
    target("training step peak memory vs eager (team goal)", m_ratio, MEM_GOAL)
    target("training step peak memory vs eager (issue)", m_ratio, MEM_ISSUE)
    if ok(f) and ok(c):
        target("training step time vs torch.compile (information)", _ratio(f["median_us"], c["median_us"]), TIME_ISSUE)
    hits = sum(row[-1] == "✓" for row in targets)
    out += [
        f"Targets: {hits} of {len(targets)} met.",
        "",
        common.md_table(["target", "ratio", "goal", ""], targets),
        "",
    ]
    check = f.get("check") if f else None
    if check:
        out += [
            f"Correctness (before timing): fused max relative error {check['max_rel_err_fused']:.2e}, eager "
            f"{check['max_rel_err_eager']:.2e}, against {check['against']}: {'ok' if check['ok'] else 'FAILED'}.",
            "",
        ]
    how = next((r.get("peak_mem_method") for r in rows if r.get("peak_mem_method")), None)
    if how:
        out += [f"Peak memory: {MEMORY_METHODS[how]}.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- entry points


def run(cfg: common.Config) -> common.FamilyResult:
    if cfg.device.type != "cpu":
        # The suite measures the CPU kernels; a GPU run would need CUDA memory stats and events.
        return common.FamilyResult(FAMILY, "## FFN benchmark\n\nskipped: CPU only for now\n", [], [])
    meta = common.run_metadata(cfg)
    shape = QUICK_SHAPE if cfg.quick else SHAPE
    t, d, h = shape
    out_path = cfg.results_file(FAMILY)
    summaries, all_rows = [], []
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        t_start = time.perf_counter()
        torch._dynamo.reset()
        check = check_fused(*shape)
        rows = []
        for mode in MODES:
            fns, errors = {}, {}
            for key, _ in METHODS:
                try:
                    module, x, dy, ref = build(key, *shape)
                    fns[key] = step_fn(module, ref, x, dy, mode)
                except Exception as exc:  # a baseline that cannot run here is a row, not a crash
                    errors[key] = f"{type(exc).__name__}: {exc}"[:500]
            if not check["ok"]:
                errors["fused"] = "output or gradients disagree with the fp64 reference: not timed"
                fns.pop("fused", None)
            try:
                timed = time_round_robin(fns, cfg)
            except Exception as exc:
                timed, errors = {}, {k: f"{type(exc).__name__}: {exc}"[:500] for k in fns}
            for key, label in METHODS:
                row = {
                    **meta,
                    "family": FAMILY,
                    "method": key,
                    "label": label,
                    "accelops": key == "fused",
                    "mode": mode,
                    "threads": threads,
                    "T": t,
                    "D": d,
                    "H": h,
                    "dtype": str(DTYPE).replace("torch.", ""),
                    "activation": ACTIVATION,
                    "status": "ok",
                }
                if key == "fused":
                    row["check"] = check
                if key in errors:
                    row.update(status="wrong" if key == "fused" and not check["ok"] else "error", reason=errors[key])
                else:
                    row.update(timed[key])
                    try:
                        row.update(measure_memory(key, mode, shape, threads))
                    except Exception as exc:
                        row["memory_error"] = str(exc)[:500]
                row["loadavg_1m"] = os.getloadavg()[0]
                common.append_row(out_path, row)
                rows.append(row)
                print(
                    f"ffn {threads}t {mode:7s} {key:8s} {common.fmt_time(row.get('median_us'))} "
                    f"peak {common.fmt_bytes(row.get('peak_mem_bytes'))}",
                    file=sys.stderr,
                )
            del fns
        summaries.append(summarize(rows, cfg, threads, time.perf_counter() - t_start))
        all_rows += rows
    failures = [
        f"{r['label']} {r['mode']} {r['threads']}t: {r['status']}: {r.get('reason')}"
        for r in all_rows
        if r["accelops"] and r["status"] not in ("ok", "skipped")
    ]
    summary = "\n".join(["## FFN benchmark", "", *summaries])
    return common.FamilyResult(FAMILY, summary, all_rows, failures)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_memory-child":
        method, mode, t, d, h, threads = argv[1], argv[2], *map(int, argv[3:7])
        print(json.dumps(memory_child(method, mode, t, d, h, threads)))
        return 0
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
