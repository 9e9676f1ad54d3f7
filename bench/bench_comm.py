"""Communication family: the per-rank kernels of a (compressed) gradient all-reduce,
accelops (torch.ops.accelops, C++ on the CPU) against the pure-PyTorch reference
(accelops/reference/comm.py, which is also what a user would write in eager PyTorch), on
one gradient bucket of ~16.8M fp32 elements in 64 tensors (a transformer's worth of
weight matrices and vectors): packing (flatten + divide + cast to bf16, unflatten, cast),
top-k (exact and sampled, 1%), 1-bit sign and int8 stochastic compression with error
feedback and their decompression of 2 stacked ranks, and PowerSGD's orthogonalization.

Each kernel's output is checked against the reference before it is timed (bit-exact;
top-k: same magnitudes sent, values exact); a wrong kernel is reported as WRONG and not
timed. Speed-up = reference time / kernel time, same run, same thread count.

Then the training step over 2 gloo ranks (bench/comm_ddp.py, whose docstring tells how):
DDP's default all-reduce, torch's fp16 and PowerSGD hooks, accelops' BucketedAllReducer
and every accelops compression hook on a 16.8M-parameter MLP, on loopback and (as root) a
shaped 1 Gbit veth link: step time and bytes per step. The ranks run 1 thread each (two
ranks on this 2-core machine); `--no-ddp` skips this part.

    python bench/bench_comm.py [--quick] [--threads 1,2] [--results-dir DIR] [--no-ddp]
"""

from __future__ import annotations

import math
import os
import sys
import time

import comm_ddp
import common
import torch
from tqdm import tqdm

from accelops import ops
from accelops.reference import comm as R

FAMILY = "comm"
TARGET = 3.0  # each compression kernel at least 3x its reference
# Bucket packing is a pure copy (with a cast): bandwidth-bound on both sides, so its speed
# is judged against this run's memory ceiling as well as against the reference.
PACKING = {"bucket_flatten", "bucket_unflatten_"}
CHUNK = 2048
WORLD = 2


def bucket_shapes(quick: bool) -> list[tuple[int, ...]]:
    """Per layer: two weight matrices and two vectors (norm weight, bias)."""
    layers, d = (4, 64) if quick else (16, 1024)
    shapes = []
    for _ in range(layers):
        shapes += [(3 * d // 4, d), (d // 4, d), (d,), (d,)]
    return shapes


def bucket_elements(quick: bool) -> int:
    return sum(math.prod(s) for s in bucket_shapes(quick))


def orth_shapes(quick: bool) -> list[tuple[int, ...]]:
    return [(256, 4), (8, 128, 4)] if quick else [(4096, 4), (64, 1024, 4)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical except NaN payloads (as tests/test_comm.py judges)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype, torch.int16)
    return bool(torch.equal(a.view(view)[~nan], b.view(view)[~nan]))


def _check_all(mine, theirs) -> dict:
    mine = mine if isinstance(mine, (list, tuple)) else [mine]
    theirs = theirs if isinstance(theirs, (list, tuple)) else [theirs]
    ok = len(mine) == len(theirs) and all(_same(a, b) for a, b in zip(mine, theirs))
    return {"ok": ok, "against": "accelops.reference, bit-exact"}


def _sent(indices: torch.Tensor) -> int:
    """Slots before top-k's padding (indices ascend strictly; padding repeats indices[0])."""
    steps = (indices[1:] <= indices[:-1]).nonzero()
    return indices.numel() if steps.numel() == 0 else int(steps[0]) + 1


def _check_topk(acc, mine, theirs) -> dict:
    (v, i), (rv, ri) = mine, theirs
    count = _sent(i)
    sent, rsent = i[:count].long(), ri[: _sent(ri)].long()
    mag = acc.abs().nan_to_num(nan=float("inf"))
    ok = (
        v.shape == rv.shape
        and count == rsent.numel()
        and bool(torch.equal(mag[sent].sort().values, mag[rsent].sort().values))
        and _same(v[:count], acc[sent])
        and bool((v[count:] == 0).all())
    )
    return {"ok": ok, "sent": count, "against": "accelops.reference (same magnitudes sent, values exact)"}


def _orth_check(m, mine) -> dict:
    gold = R.orthogonalize_(m.double().clone())
    err = float((mine.double() - gold).abs().max())
    ref_err = float((R.orthogonalize_(m.clone()).double() - gold).abs().max())
    return {
        "ok": err <= 2 * ref_err + 2 * torch.finfo(torch.float32).eps,
        "err_vs_fp64": err,
        "reference_err_vs_fp64": ref_err,
        "against": "fp64 reference: error within 2x the reference's own",
    }


class Case:
    """One op: a kernel call and a reference call on separate copies of the same state."""

    def __init__(self, op, label, kernel, reference, check, nbytes):
        self.op, self.label, self.kernel, self.reference, self.check, self.nbytes = (
            op,
            label,
            kernel,
            reference,
            check,
            nbytes,
        )


def make_cases(cfg, gen) -> list[Case]:
    dev = cfg.device
    shapes = bucket_shapes(cfg.quick)
    grads = [torch.randn(s, generator=gen).to(dev) * 1e-3 for s in shapes]
    n = sum(g.numel() for g in grads)
    k = max(1, n // 100)
    flat = R.bucket_flatten(grads, torch.float32)
    wire = R.bucket_flatten(grads, torch.bfloat16)
    fp32 = 4 * n
    cases = []

    cases.append(
        Case(
            "bucket_flatten",
            f"{len(grads)} fp32 tensors -> bf16, / {WORLD}",
            lambda: ops.bucket_flatten(grads, torch.bfloat16, WORLD),
            lambda: R.bucket_flatten(grads, torch.bfloat16, WORLD),
            None,
            fp32 + fp32 // 2,
        )
    )
    outs_k = [torch.empty_like(g) for g in grads]
    outs_r = [torch.empty_like(g) for g in grads]

    def unflatten_check():
        ops.bucket_unflatten_(wire, outs_k, WORLD)
        R.bucket_unflatten_(wire, outs_r, WORLD)
        return _check_all(outs_k, outs_r)

    cases.append(
        Case(
            "bucket_unflatten_",
            f"bf16 -> {len(grads)} fp32 tensors, / {WORLD}",
            lambda: ops.bucket_unflatten_(wire, outs_k, WORLD),
            lambda: R.bucket_unflatten_(wire, outs_r, WORLD),
            unflatten_check,
            fp32 + fp32 // 2,
        )
    )

    def unflatten_plain_check():
        ops.bucket_unflatten_(wire, outs_k)
        R.bucket_unflatten_(wire, outs_r)
        return _check_all(outs_k, outs_r)

    cases.append(
        Case(
            "bucket_unflatten_",
            f"bf16 -> {len(grads)} fp32 tensors, no divisor",
            lambda: ops.bucket_unflatten_(wire, outs_k),
            lambda: R.bucket_unflatten_(wire, outs_r),
            unflatten_plain_check,
            fp32 + fp32 // 2,
        )
    )
    cases.append(
        Case(
            "cast_div",
            f"fp32 [{n}] -> bf16, / {WORLD}",
            lambda: ops.cast_div(flat, WORLD, torch.bfloat16),
            lambda: R.cast_div(flat, WORLD, torch.bfloat16),
            None,
            fp32 + fp32 // 2,
        )
    )

    res0 = torch.randn(n, generator=gen).to(dev) * 1e-4
    for method in ("exact", "sampled"):
        res_k, res_r = res0.clone(), res0.clone()

        def topk_check(method=method):
            a, b = res0.clone(), res0.clone()
            acc = flat + res0
            mine = ops.topk_compress_(flat, a, k, method, 4096, 0)
            theirs = R.topk_compress_(flat, b, k, method, 4096, 0)
            out = _check_topk(acc, mine, theirs)
            out["ok"] = out["ok"] and bool(torch.equal(a.sort().values, b.sort().values))
            return out

        cases.append(
            Case(
                "topk_compress_",
                f"{method}, k = 1% of {n}, error feedback",
                lambda method=method, r=res_k: ops.topk_compress_(flat, r, k, method, 4096, 0),
                lambda method=method, r=res_r: R.topk_compress_(flat, r, k, method, 4096, 0),
                topk_check,
                3 * fp32,
            )
        )
    payload = [ops.topk_compress_(flat * (r + 1), None, k) for r in range(WORLD)]
    tv, ti = torch.stack([p[0] for p in payload]), torch.stack([p[1] for p in payload])
    cases.append(
        Case(
            "topk_decompress",
            f"{WORLD} stacked ranks of k = 1%",
            lambda: ops.topk_decompress(tv, ti, n),
            lambda: R.topk_decompress(tv, ti, n),
            None,
            fp32,
        )
    )

    res_k, res_r = res0.clone(), res0.clone()

    def sign_check():
        a, b = res0.clone(), res0.clone()
        return _check_all([*ops.sign_compress_(flat, a, CHUNK), a], [*R.sign_compress_(flat, b, CHUNK), b])

    cases.append(
        Case(
            "sign_compress_",
            f"[{n}] chunk {CHUNK}, error feedback",
            lambda: ops.sign_compress_(flat, res_k, CHUNK),
            lambda: R.sign_compress_(flat, res_r, CHUNK),
            sign_check,
            3 * fp32,
        )
    )
    payload = [ops.sign_compress_(flat * (r + 1), None, CHUNK) for r in range(WORLD)]
    sb, ss = torch.stack([p[0] for p in payload]), torch.stack([p[1] for p in payload])
    cases.append(
        Case(
            "sign_decompress",
            f"{WORLD} stacked ranks",
            lambda: ops.sign_decompress(sb, ss, n, CHUNK),
            lambda: R.sign_decompress(sb, ss, n, CHUNK),
            None,
            fp32 + WORLD * n // 8,
        )
    )

    res_k2, res_r2 = res0.clone(), res0.clone()

    def int8_check():
        a, b = res0.clone(), res0.clone()
        return _check_all([*ops.int8_compress_(flat, a, CHUNK, 1), a], [*R.int8_compress_(flat, b, CHUNK, 1), b])

    cases.append(
        Case(
            "int8_compress_",
            f"[{n}] chunk {CHUNK}, error feedback",
            lambda: ops.int8_compress_(flat, res_k2, CHUNK, 1),
            lambda: R.int8_compress_(flat, res_r2, CHUNK, 1),
            int8_check,
            3 * fp32 + n,
        )
    )
    payload = [ops.int8_compress_(flat * (r + 1), None, CHUNK, r) for r in range(WORLD)]
    qb, qs = torch.stack([p[0] for p in payload]), torch.stack([p[1] for p in payload])
    cases.append(
        Case(
            "int8_decompress",
            f"{WORLD} stacked ranks",
            lambda: ops.int8_decompress(qb, qs, CHUNK),
            lambda: R.int8_decompress(qb, qs, CHUNK),
            None,
            fp32 + WORLD * n,
        )
    )

    for shape in orth_shapes(cfg.quick):
        m0 = torch.randn(shape, generator=gen).to(dev)
        mk, mr = m0.clone(), m0.clone()

        def orth_check(m0=m0):
            return _orth_check(m0, ops.orthogonalize_(m0.clone()))

        cases.append(
            Case(
                "orthogonalize_",
                "x".join(map(str, shape)) + " fp32",
                lambda mk=mk: ops.orthogonalize_(mk),
                lambda mr=mr: R.orthogonalize_(mr),
                orth_check,
                m0.numel() * 4,
            )
        )
    return cases


def run_case(cfg, timer, meta, case: Case, threads, out_path) -> list[dict]:
    check = case.check() if case.check is not None else _check_all(case.kernel(), case.reference())
    rows = []
    for is_kernel in (True, False):
        row = {
            **meta,
            "family": FAMILY,
            "method": f"{'kernel' if is_kernel else 'reference'}:{case.op}",
            "label": "accelops" if is_kernel else "pure-PyTorch reference",
            "accelops": is_kernel,
            "op": case.op,
            "case": case.label,
            "threads": threads,
            "bytes": case.nbytes,
            "budget_s": cfg.budget_s,
            "status": "ok",
        }
        if is_kernel:
            row["check"] = check
        if is_kernel and not check["ok"]:
            row.update(status="wrong", reason="output disagrees with the reference: not timed")
        else:
            try:
                row.update(common.time_call(case.kernel if is_kernel else case.reference, timer))
            except Exception as exc:  # a row, not a crash
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        rows.append(row)
    kernel, reference = rows
    if kernel["status"] == "ok" and reference["status"] == "ok":
        kernel["speedup_vs_reference"] = reference["median_us"] / kernel["median_us"]
    for row in rows:
        row["loadavg_1m"] = os.getloadavg()[0]
        common.append_row(out_path, row)
    return rows


def _cell(row):
    if row["status"] == "ok":
        return (
            f"{common.fmt_time(row['median_us'])} ({common.fmt_time(row['p20_us'])} - {common.fmt_time(row['p80_us'])})"
        )
    return {"wrong": "**WRONG**", "error": "error", "skipped": "n/a"}[row["status"]]


def _gbps(row) -> str:
    if row["status"] != "ok" or not row.get("bytes"):
        return "-"
    return f"{row['bytes'] / (row['median_us'] * 1e3):.1f}"


def summarize(rows, cfg, threads, wall_s, ceiling) -> str:
    meta = rows[0]
    out = common.run_header(FAMILY, meta, cfg, threads, wall_s, versions=("torch", "python")) + [
        "Median (p20 - p80) of adaptive repeats after warm-up; speed-up = reference / kernel. The in-place ops "
        "(residuals, unflatten, orthogonalize) run on their own copies of the state for each side. GB/s: the "
        "bytes an op must read and write at least, over the accelops median. accelops asks "
        "for transparent huge pages for its large outputs; torch does so only with THP_MEM_ALLOC_ENABLE=1, which "
        f"was {common.thp_note(meta)} in this run.",
        "",
    ]
    table = []
    hits = {True: 0, False: 0}
    counts = {True: 0, False: 0}
    pairs = [(rows[j], rows[j + 1]) for j in range(0, len(rows), 2)]
    for kernel, reference in pairs:
        ratio = kernel.get("speedup_vs_reference")
        mark = "-" if ratio is None else ("✓" if ratio >= TARGET else "✗")
        packing = kernel["op"] in PACKING
        counts[packing] += 1
        hits[packing] += mark == "✓"
        table.append(
            [
                kernel["op"],
                kernel["case"],
                _cell(kernel),
                _cell(reference),
                "-" if ratio is None else f"{ratio:.2f}x",
                mark,
                _gbps(kernel),
                common.fmt_bytes(kernel.get("peak_mem_bytes")),
                common.fmt_bytes(reference.get("peak_mem_bytes")),
            ]
        )
    out += [
        common.md_table(
            [
                "op",
                "case",
                "accelops",
                "reference",
                "speed-up",
                f">= {TARGET:g}x",
                "GB/s",
                "peak mem (accelops)",
                "peak mem (reference)",
            ],
            table,
        ),
        "",
        f"Targets: {hits[False]} of {counts[False]} compression kernels at least {TARGET:g}x their reference; "
        f"bucket packing (pure copies with a cast): {hits[True]} of {counts[True]}.",
        "",
    ]
    if ceiling is not None and ceiling["status"] == "ok":
        out += [
            f"Memory ceiling in this run: torch's fill_ of a {common.fmt_bytes(ceiling['bytes'])} fp32 buffer "
            f"(writing only, no read) takes {common.fmt_time(ceiling['median_us'])} "
            f"({_gbps(ceiling)} GB/s). bucket_unflatten_ reads the bf16 wire buffer and writes that many fp32 "
            "bytes; where it takes about as long as the fill it runs at the memory's speed, and the "
            "reference (a torch copy_ per tensor, itself a streaming loop) cannot be beaten by more than "
            "the bytes it wastes.",
            "",
        ]
    out += common.memory_note(rows)
    return "\n".join(out)


def measure_ceiling(cfg, timer, meta, n, threads, out_path) -> dict:
    """torch fill_ of an existing fp32 buffer of n elements: the time to write the bytes an
    fp32 unflatten writes, with no reading at all."""
    buf = torch.zeros(n, device=cfg.device)
    row = {
        **meta,
        "family": FAMILY,
        "method": "ceiling:fill_",
        "label": "torch fill_ (memory ceiling)",
        "accelops": False,
        "op": "fill_",
        "case": f"fp32 [{n}]",
        "threads": threads,
        "bytes": 4 * n,
        "budget_s": cfg.budget_s,
        "status": "ok",
    }
    try:
        row.update(common.time_call(lambda: buf.fill_(1.0), timer))
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
    row["loadavg_1m"] = os.getloadavg()[0]
    common.append_row(out_path, row)
    return row


def run(cfg: common.Config) -> common.FamilyResult:
    meta = common.run_metadata(cfg)
    timer = common.Timer(cfg)
    out_path = cfg.results_file(FAMILY)
    summaries, all_rows = [], []
    cases = make_cases(cfg, torch.Generator().manual_seed(0))
    with tqdm(total=len(cfg.threads) * len(cases), desc=FAMILY, file=sys.stderr, dynamic_ncols=True) as progress:
        for threads in cfg.threads:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            rows = []
            for case in cases:
                progress.set_postfix_str(f"{threads}t {case.op}")
                rows += run_case(cfg, timer, meta, case, threads, out_path)
                progress.update(1)
            ceiling = measure_ceiling(cfg, timer, meta, bucket_elements(cfg.quick), threads, out_path)
            summaries.append(summarize(rows, cfg, threads, time.perf_counter() - t0, ceiling))
            all_rows += rows + [ceiling]
    failures = [
        f"{r['method']} {r['case']} {r['threads']}t: {r['status']}: {r.get('reason')}"
        for r in all_rows
        if r["accelops"] and r["status"] not in ("ok", "skipped")
    ]
    sections = ["## Communication kernels benchmark", "", *summaries]
    if os.environ.get("ACCELOPS_BENCH_NO_DDP") != "1":
        ddp_rows = _run_ddp(cfg, meta, out_path)
        sections += ["", "## Data-parallel training step, 2 gloo ranks", "", comm_ddp.summary(ddp_rows)]
        all_rows += ddp_rows
        failures += [
            f"ddp {r['link']} {r['method']}: {r['status']}: {r.get('reason')}"[:300]
            for r in ddp_rows
            if r.get("accelops") and r["status"] not in ("ok", "skipped")
        ]
    return common.FamilyResult(FAMILY, "\n".join(sections), all_rows, failures)


def _run_ddp(cfg, meta, out_path) -> list[dict]:
    """comm_ddp's rows with the run's metadata, appended like the kernel rows."""
    print("comm: data-parallel step over 2 gloo ranks (bench/comm_ddp.py)", file=sys.stderr)
    rows = comm_ddp.run(cfg.quick, threads=1)
    for row in rows:
        stored = {
            **meta,
            "family": FAMILY,
            **row,
            "case": f"ddp step, {row['link']}",
            "method": f"ddp:{row['method'] or 'link'}",
            "accelops": bool(row.get("accelops")),
            "loadavg_1m": os.getloadavg()[0],
        }
        common.append_row(out_path, stored)
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--no-ddp" in argv:
        argv.remove("--no-ddp")
        os.environ["ACCELOPS_BENCH_NO_DDP"] = "1"
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
