"""Optim family: 8-bit optimizer states (accelops.optim.AdamW8bit / SGD8bit) against
torch.optim, in the same run and thread count.

1. State memory: bytes of optimizer state after one step, AdamW8bit vs torch.optim.AdamW
   (target <= 0.27x), on the step-time model and on the LM below.
2. Step time on a 100M-parameter model (25 fp32 tensors of 4M elements with fixed random
   grads; quick: 4 x 64K): AdamW8bit vs torch.optim.AdamW(foreach=True, fused=False)
   (target <= 1.0x, i.e. at least as fast), and vs AdamW(fused=True) where it runs on the
   CPU; SGD8bit vs torch.optim.SGD(momentum=0.9, foreach=True). Median (p20 - p80) of
   repeats of optimizer.step() after warm-up. Before timing, accelops' kernel is checked
   bit-exact against accelops/reference/optim.py on one 1M-element tensor (WRONG rows are
   not timed).
3. A 6-layer TransformerLM (accelops.models, character level, tinyshakespeare; the
   bench_lm set-up at dim 128, context 64) trained the same steps, same seed and data order
   with torch AdamW and with AdamW8bit: validation loss within 1% of fp32 AdamW's (target).

AdamW8bit runs with both state maps: "dynamic" (rows adamw8bit, lm_adamw8bit) and "fp8"
(m E4M3 / v E5M3 with arithmetic encode and decode: rows adamw8bit_fp8, lm_adamw8bit_fp8).

    python bench/bench_optim.py [--quick] [--threads 2] [--results-dir DIR]
    ACCELOPS_BENCH_OPTIM_LM_STEPS=N overrides the LM's step count (default 800; 0 skips the LM)
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time

import common
import torch

FAMILY = "optim"
STATE_TARGET = 0.27
TIME_TARGET = 1.0
LM_TARGET = 1.01


def _params(quick: bool, seed: int = 0):
    count, size = (4, 1 << 16) if quick else (25, 4_000_000)
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(size, generator=gen) * 0.02)
        p.grad = torch.randn(size, generator=gen) * 1e-3
        ps.append(p)
    return ps


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def _check_kernel(state_map: str = "dynamic") -> dict:
    """accelops' native step vs the reference on one tensor, bit for bit."""
    from accelops import ops
    from accelops.ops import optim as O
    from accelops.reference import optim as R

    gen = torch.Generator().manual_seed(1)
    n = 1 << 20
    out = {}
    for impl in ("kernel", "reference"):
        p = torch.randn(n, generator=torch.Generator().manual_seed(2))
        mc, ma = O.new_state(p)
        vc, va = O.new_state(p)
        gen = torch.Generator().manual_seed(3)
        for t in (1, 2):
            g = torch.randn(n, generator=gen) * 1e-2
            if impl == "kernel":
                ops.adamw8bit_step_(
                    p,
                    g,
                    mc,
                    ma,
                    vc,
                    va,
                    lr=1e-3,
                    beta1=0.9,
                    beta2=0.999,
                    eps=1e-8,
                    weight_decay=0.01,
                    step=t,
                    state_map=state_map,
                )
            elif state_map == "fp8":
                s = R.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, t)
                R.adamw8bit_fp8_step_(p, g, mc, ma, vc, va, s, 256)
            else:
                R.adamw8bit_step_(
                    p,
                    g,
                    mc,
                    ma,
                    vc,
                    va,
                    R.signed_map(),
                    R.unsigned_map(),
                    R.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, t),
                    256,
                )
        out[impl] = (p, mc, ma, vc, va)
    ok = all(torch.equal(a, b) for a, b in zip(out["kernel"], out["reference"]))
    return {
        "ok": ok,
        "state_map": state_map,
        "against": "accelops.reference, bit-exact (param, codes, absmax), 2 steps, 1M elements",
    }


def _optimizers():
    from accelops.optim import AdamW8bit, SGD8bit

    return [
        ("adamw8bit", "accelops AdamW8bit", True, "adamw", lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=0.01)),
        (
            "adamw8bit_fp8",
            'accelops AdamW8bit(state_map="fp8")',
            True,
            "adamw",
            lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=0.01, state_map="fp8"),
        ),
        (
            "torch_adamw_foreach",
            "torch AdamW(foreach=True)",
            False,
            "adamw",
            lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True, fused=False),
        ),
        (
            "torch_adamw_fused",
            "torch AdamW(fused=True)",
            False,
            "adamw",
            lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
        ),
        ("sgd8bit", "accelops SGD8bit", True, "sgd", lambda ps: SGD8bit(ps, lr=1e-2, momentum=0.9)),
        (
            "torch_sgd_foreach",
            "torch SGD(momentum=0.9, foreach=True)",
            False,
            "sgd",
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
        ),
    ]


def run_step_times(cfg, timer, meta, threads, out_path) -> list[dict]:
    rows = []
    checks = {"adamw8bit": _check_kernel("dynamic"), "adamw8bit_fp8": _check_kernel("fp8")}
    params = _params(cfg.quick)
    n_params = sum(p.numel() for p in params)
    case = f"{len(params)} fp32 tensors x {params[0].numel():,} = {n_params / 1e6:.1f}M params"
    for method, label, is_accelops, kind, make in _optimizers():
        row = {
            **meta,
            "family": FAMILY,
            "kind": "step_time",
            "method": method,
            "label": label,
            "accelops": is_accelops,
            "optimizer": kind,
            "case": case,
            "params": n_params,
            "threads": threads,
            "budget_s": cfg.budget_s,
            "status": "ok",
        }
        check = checks.get(method, {"ok": True})
        if method in checks:
            row["check"] = check
        try:
            opt = make(params)
            if is_accelops and not check["ok"]:
                row.update(status="wrong", reason="kernel disagrees with the reference: not timed")
            else:
                row.update(common.time_call(opt.step, timer))
                row["state_bytes"] = _state_bytes(opt)
        except Exception as exc:  # e.g. fused=True without a CPU kernel: a row, not a crash
            row.update(status="skipped" if "fused" in method else "error", reason=f"{type(exc).__name__}: {exc}"[:300])
        opt = None
        gc.collect()
        row["loadavg_1m"] = os.getloadavg()[0]
        rows.append(row)
    by = {r["method"]: r for r in rows}
    for mine, base in (
        ("adamw8bit", "torch_adamw_foreach"),
        ("adamw8bit", "torch_adamw_fused"),
        ("adamw8bit_fp8", "torch_adamw_foreach"),
        ("adamw8bit_fp8", "torch_adamw_fused"),
        ("sgd8bit", "torch_sgd_foreach"),
    ):
        a, b = by[mine], by[base]
        if a["status"] == "ok" and b["status"] == "ok":
            a[f"time_vs_{base}"] = a["median_us"] / b["median_us"]
            a[f"state_bytes_vs_{base}"] = a["state_bytes"] / b["state_bytes"]
    for row in rows:
        common.append_row(out_path, row)
    return rows


# --------------------------------------------------------------------------- LM


def _lm_setup(quick: bool):
    import bench_lm

    if quick:
        return bench_lm.Setup(
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden=64,
            seq_len=32,
            batch_size=8,
            steps=4,
            lr=3e-3,
            warmup_steps=1,
            log_every=2,
            val_windows=16,
        )
    steps = int(os.environ.get("ACCELOPS_BENCH_OPTIM_LM_STEPS", "800"))
    return bench_lm.Setup(
        dim=128,
        n_layers=6,
        n_heads=4,
        hidden=352,
        seq_len=64,
        batch_size=32,
        steps=steps,
        lr=3e-3,
        warmup_steps=50,
        log_every=50,
        val_windows=None,
    )


def _train_lm(model, opt, setup, train_data, seed):
    import bench_lm

    stats = bench_lm.train(model, setup, train_data, seed, optimizer=opt)
    return {"train_loss": stats["train_loss"], "train_s": stats["train_s"]}


def run_lm(cfg, meta, threads, out_path) -> list[dict]:
    import bench_lm

    from accelops.optim import AdamW8bit
    from accelops.train import load_char_corpus

    data_path = bench_lm._data_path(None)
    setup = _lm_setup(cfg.quick)
    if setup.steps == 0:
        return []
    base = {
        **meta,
        "family": FAMILY,
        "kind": "lm",
        "threads": threads,
        "setup": dataclasses.asdict(setup),
        "data": str(data_path),
    }
    if not data_path.is_file():
        row = {**base, "method": "lm", "status": "skipped", "reason": f"no corpus at {data_path}"}
        common.append_row(out_path, row)
        return [row]
    train_data, val_data, vocab = load_char_corpus(data_path, setup.seq_len, 0.1)
    val = val_data if setup.val_windows is None else bench_lm._Subset(val_data, setup.val_windows)
    rows = []
    for method, label, make in (
        (
            "lm_torch_adamw",
            "torch AdamW",
            lambda ps: torch.optim.AdamW(ps, lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1),
        ),
        (
            "lm_adamw8bit",
            "accelops AdamW8bit",
            lambda ps: AdamW8bit(ps, lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1),
        ),
        (
            "lm_adamw8bit_fp8",
            'accelops AdamW8bit(state_map="fp8")',
            lambda ps: AdamW8bit(ps, lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1, state_map="fp8"),
        ),
    ):
        row = {**base, "method": method, "label": label, "accelops": method != "lm_torch_adamw", "status": "ok"}
        try:
            model = bench_lm.build_model(setup, len(vocab), None, None, seed=0)
            opt = make(model.parameters())
            row.update(_train_lm(model, opt, setup, train_data, seed=0))
            row["state_bytes"] = _state_bytes(opt)
            row["parameters"] = sum(p.numel() for p in model.parameters())
            loss, eval_tps = bench_lm.evaluate(model, val, setup.batch_size)
            row.update(val_loss=loss, eval_tokens_per_s=eval_tps, val_tokens=len(val) * setup.seq_len)
            print(f"optim: LM with {label}: val loss {loss:.4f}", file=sys.stderr)
        except Exception as exc:
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        rows.append(row)
    b = rows[0]
    for a in rows[1:]:
        if a["status"] == "ok" and b["status"] == "ok":
            a["val_loss_vs_torch_adamw"] = a["val_loss"] / b["val_loss"]
            a["state_bytes_vs_torch_adamw"] = a["state_bytes"] / b["state_bytes"]
            a["target_val_loss_vs_torch_adamw"] = LM_TARGET
            a["target_met"] = a["val_loss_vs_torch_adamw"] <= LM_TARGET
    for row in rows:
        row["loadavg_1m"] = os.getloadavg()[0]
        common.append_row(out_path, row)
    return rows


# --------------------------------------------------------------------------- summary


def _cell(row):
    if row["status"] == "ok":
        return (
            f"{common.fmt_time(row['median_us'])} ({common.fmt_time(row['p20_us'])} - {common.fmt_time(row['p80_us'])})"
        )
    return {"wrong": "**WRONG**", "error": "error", "skipped": "n/a"}[row["status"]] + (
        f" ({row.get('reason', '')[:80]})" if row["status"] != "wrong" else ""
    )


def summarize(step_rows, lm_rows, cfg, threads, wall_s, meta) -> str:
    out = common.run_header(FAMILY, meta, cfg, threads, wall_s, versions=("torch", "python")) + [
        "Timings are noisy: this 2-core machine is shared with other engineers' jobs (load average in each row's "
        f"`loadavg_1m`; {step_rows[0]['loadavg_1m']:.1f} at the first row).",
        "",
    ]
    by = {r["method"]: r for r in step_rows}
    table = []
    for r in step_rows:
        ratio = ""
        if r["method"] in ("adamw8bit", "adamw8bit_fp8"):
            ratio = ", ".join(f"{r[k]:.3f}x vs {k[len('time_vs_torch_') :]}" for k in r if k.startswith("time_vs_"))
        if r["method"] == "sgd8bit" and "time_vs_torch_sgd_foreach" in r:
            ratio = f"{r['time_vs_torch_sgd_foreach']:.3f}x vs sgd_foreach"
        table.append(
            [
                r["label"],
                _cell(r),
                ratio or "-",
                common.fmt_bytes(r.get("state_bytes")),
                common.fmt_bytes(r.get("peak_mem_bytes")),
            ]
        )
    out += [
        f"Step time, {step_rows[0]['case']}, {threads} threads:",
        "",
        common.md_table(
            ["optimizer", "step median (p20 - p80)", "time ratio", "state bytes", "peak mem of a step"], table
        ),
        "",
    ]
    mine, ref = by["adamw8bit"], by["torch_adamw_foreach"]
    lines = []
    if mine["status"] == "ok" and ref["status"] == "ok":
        s, t = mine["state_bytes_vs_torch_adamw_foreach"], mine["time_vs_torch_adamw_foreach"]
        lines.append(
            f"state bytes {s:.3f}x torch AdamW (<= {STATE_TARGET}x: {'met' if s <= STATE_TARGET else 'MISSED'})"
        )
        lines.append(
            f"step time {t:.3f}x torch AdamW foreach (<= {TIME_TARGET}x: {'met' if t <= TIME_TARGET else 'MISSED'})"
        )
    fp8 = by.get("adamw8bit_fp8", {})
    if fp8.get("time_vs_torch_adamw_fused") is not None:
        t = fp8["time_vs_torch_adamw_fused"]
        lines.append(
            f"fp8 map step time {t:.3f}x torch AdamW fused (<= {TIME_TARGET}x: {'met' if t <= TIME_TARGET else 'MISSED'})"
        )
    if len(lm_rows) > 1 and lm_rows[1].get("val_loss_vs_torch_adamw") is not None:
        a, b = lm_rows[1], lm_rows[0]
        st = a["setup"]
        out += [
            f"TransformerLM on {os.path.basename(a['data'])}: dim {st['dim']}, {st['n_layers']} layers, "
            f"{st['n_heads']} heads, FFN {st['hidden']}, context {st['seq_len']}, {st['steps']} steps of "
            f"{st['batch_size']} x {st['seq_len']} characters, lr {st['lr']:g} cosine (warm-up "
            f"{st['warmup_steps']}), betas (0.9, 0.95), weight decay 0.1, clip 1, seed 0 for every optimizer; validation "
            f"over {a['val_tokens']:,} characters.",
            "",
            common.md_table(
                ["optimizer", "val loss", "vs torch AdamW", "state bytes", "train time"],
                [
                    [
                        r["label"],
                        f"{r['val_loss']:.4f}",
                        f"{r['val_loss'] / b['val_loss']:.4f}x",
                        common.fmt_bytes(r["state_bytes"]),
                        f"{r['train_s']:.0f} s",
                    ]
                    for r in lm_rows
                    if r["status"] == "ok"
                ],
            ),
            "",
        ]
        for r in lm_rows[1:]:
            if r.get("val_loss_vs_torch_adamw") is None:
                continue
            v = r["val_loss_vs_torch_adamw"]
            lines.append(
                f"LM val loss of {r['label']} {v:.4f}x torch AdamW's (<= {LM_TARGET}x: "
                f"{'met' if v <= LM_TARGET else 'MISSED'}), LM state bytes {r['state_bytes_vs_torch_adamw']:.3f}x "
                "(norms and small tensors keep fp32 states)"
            )
    elif lm_rows:
        out += [f"LM: {lm_rows[0]['status']}: {lm_rows[0].get('reason') or lm_rows[-1].get('reason')}", ""]
    out += ["Targets: " + "; ".join(lines) + ".", ""]
    out += common.memory_note(step_rows)
    return "\n".join(out)


def run(cfg: common.Config) -> common.FamilyResult:
    meta = common.run_metadata(cfg)
    timer = common.Timer(cfg)
    out_path = cfg.results_file(FAMILY)
    threads = cfg.threads[-1]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    step_rows = run_step_times(cfg, timer, meta, threads, out_path)
    gc.collect()
    lm_rows = run_lm(cfg, meta, threads, out_path)
    summary = "## 8-bit optimizers benchmark\n\n" + summarize(
        step_rows, lm_rows, cfg, threads, time.perf_counter() - t0, meta
    )
    rows = step_rows + lm_rows
    failures = [
        f"{r['method']}: {r['status']}: {r.get('reason')}"
        for r in rows
        if r.get("accelops") and r["status"] not in ("ok", "skipped")
    ]
    return common.FamilyResult(FAMILY, summary, rows, failures)


def main(argv=None) -> int:
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
