"""Parallelism strategies of accelops.train.Trainer on 2 gloo ranks (CPU, one thread a rank):
"ddp", "fsdp" (default units; fsdp-submodule: a unit per attention and FFN;
fsdp-submodule-noprefetch: also no backward prefetch), "zero1" and "pipeline" training the same TransformerLM (dim 512, 6 blocks,
25.5M parameters; --quick: a tiny one) on the same global batch of 8 x 128 tokens (data
parallel: 4 a rank; pipeline: 8, in 4 micro-batches, 1F1B), with the same optimizer.

Per strategy and rank it records:
- tokens_per_s: global tokens of the timed steps / their wall time (rank 0; barriers
  around them), after warm-up steps that allocate the optimizer state;
- peak_rss_delta_bytes: how far resident memory grew above what the process held before
  the model was built (VmHWM - VmRSS after clear_refs 5 and malloc_trim; every allocator
  counts: weights, gradients, DDP's buckets, optimizer state, activations, gloo buffers),
  with glibc's mmap threshold fixed at 1 MiB in every rank (see _fix_mmap_threshold);
- state_bytes: computed parameter + gradient + optimizer-state bytes the rank holds
  (local shards under FSDP, its stage under the pipeline, its optimizer partition under
  ZeRO-1); DDP's gradient buckets are a second copy of the gradients and are counted;
- payload_bytes_per_step: bytes this rank handed to collectives per step: DDP's buckets
  (through torch's allreduce_hook, DDP's own all-reduce in Python), and every call FSDP,
  ZeRO and the pipeline make from Python (all_gather_single, reduce_scatter_single,
  all_reduce, broadcast, the pipeline's isends) counted by wrapping them. Payload, not
  wire bytes: a ring all-reduce puts about twice its payload on the wire.

The optimizer is a parameter: OPTIMIZERS below (torch AdamW, or accelops AdamW8bit), chosen with the
environment variable ACCELOPS_BENCH_SCALEOUT_OPTIMIZER. The machine's 2 cores are shared
with other jobs: timings are noisy (the load average is recorded in every row).
Target: fsdp peak memory per rank <= 0.6 x ddp's.

    python bench/bench_scaleout.py [--quick]      # or: python bench/run.py --only scaleout
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
import common  # noqa: E402

FAMILY = "scaleout"
STRATEGIES = ("ddp", "fsdp", "fsdp-submodule", "fsdp-submodule-noprefetch", "zero1", "pipeline")
# Bench rows -> Trainer arguments: the fsdp variants are the Trainer's FSDP memory settings
# (one unit per attention / FFN; no backward prefetch), measured beside the default.
TRAINER_KW = {
    "fsdp-submodule": dict(strategy="fsdp", fsdp_units="submodule"),
    "fsdp-submodule-noprefetch": dict(strategy="fsdp", fsdp_units="submodule", fsdp_backward_prefetch=False),
}
FSDP_ROWS = tuple(s for s in STRATEGIES if s.startswith("fsdp"))
WORLD = 2
TARGET_FSDP_MEMORY = 0.6
MODEL = dict(dim=512, n_layers=6, n_heads=8, vocab_size=256, seq_len=128, batch=8, micro=4, warmup=2, steps=5)
QUICK = dict(dim=32, n_layers=2, n_heads=2, vocab_size=64, seq_len=16, batch=8, micro=2, warmup=1, steps=2)
OPTIMIZERS = {  # name -> (parameters -> optimizer)
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
    "adamw8bit": lambda params: __import__("accelops.optim", fromlist=["AdamW8bit"]).AdamW8bit(
        params, lr=1e-3, weight_decay=0.1
    ),
}
TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter:
    """Bytes handed to torch.distributed's Python collectives while installed."""

    NAMES = (
        "all_gather_single",
        "reduce_scatter_single",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "all_reduce",
        "broadcast",
    )

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.bytes, self.calls, self.saved, self.by_call = dist, 0, 0, {}, {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self.saved[name] = fn
                setattr(dist, name, self._wrap(fn))
        # the pipeline's sends go through schedules._batch_p2p (P2POps of dist.isend, which
        # P2POp checks by identity: wrapped here, not dist.isend itself)
        from torch.distributed.pipelining import schedules

        batch = schedules._batch_p2p
        self.saved["_batch_p2p"] = batch

        def batch_counted(p2p_ops, *args, **kwargs):
            for op in p2p_ops:
                if op.op is dist.isend:
                    self.add(op.tensor, "isend")
            return batch(p2p_ops, *args, **kwargs)

        schedules._batch_p2p = batch_counted

    def add(self, tensor, name="ddp_bucket_allreduce"):
        if isinstance(tensor, torch.Tensor):
            n = tensor.numel() * tensor.element_size()
            self.bytes += n
            self.calls += 1
            self.by_call[name] = self.by_call.get(name, 0) + n

    def _wrap(self, fn):
        single = fn.__name__ in ("all_gather_single", "reduce_scatter_single")

        def counted(*args, **kwargs):
            # the payload is the input: all_gather_single(output_tensor, input_tensor) and
            # reduce_scatter_single(output, input) take it second; the others first (or tensor=)
            if single:
                t = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
            else:
                t = args[0] if args else kwargs.get("tensor")
            self.add(t, fn.__name__)
            return fn(*args, **kwargs)

        counted.__name__ = fn.__name__
        return counted

    def reset(self):
        self.bytes = self.calls = 0
        self.by_call = {}


def _ddp_python_allreduce_hook():
    # DDP's own all-reduce runs in C++; torch's allreduce_hook does the same through
    # dist.all_reduce, where the counter sees each bucket
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    return allreduce_hook


MMAP_THRESHOLD = 1 << 20


def _fix_mmap_threshold() -> bool:
    """mallopt(M_MMAP_THRESHOLD, 1 MiB) in this rank: blocks above it are mmapped and given
    back when freed. glibc's default threshold grows to the size of the largest block freed
    (up to 32 MiB), after which FSDP's per-block all-gather and reduce-scatter buffers
    (~17 MB each here) come from the heap and fragment it: measured here, fsdp's peak growth
    was 819 / 790 MiB (rank 0 / 1) with the default and 351 / 349 MiB with the threshold
    fixed (ddp: 640 / 658 -> 543 / 542). The same setting is used for every strategy."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    libc = ctypes.CDLL(name)
    return bool(getattr(libc, "mallopt", None) and libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD = -3


def _state_bytes(trainer) -> dict:
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    if trainer.strategy == "pipeline":
        params = list(trainer.parallel.stage_module.parameters())
    elif trainer.strategy == "fsdp":
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    else:
        params = list(trainer.model.parameters())
    pbytes = sum(local(p).numel() * local(p).element_size() for p in params)
    grads = pbytes * (2 if trainer.ddp is not None else 1)  # DDP's buckets: a second copy of the gradients
    opt = trainer.optimizer.optim if trainer.strategy == "zero1" else trainer.optimizer
    obytes = sum(
        local(v).numel() * local(v).element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )
    return {
        "param_bytes": pbytes,
        "grad_bytes": grads,
        "optimizer_state_bytes": obytes,
        "state_bytes": pbytes + grads + obytes,
    }


def _worker(rank, port, strategy, spec, optimizer_name, out_dir):
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    res = {"rank": rank}
    try:
        import torch.distributed as dist

        from accelops.models import TransformerLM, TransformerLMConfig
        from accelops.train import TokenWindows, Trainer

        gen = torch.Generator().manual_seed(0)
        n_tokens = spec["seq_len"] * spec["batch"] * (spec["warmup"] + spec["steps"] + 2)
        data = TokenWindows(torch.randint(0, spec["vocab_size"], (n_tokens + 1,), generator=gen), spec["seq_len"])
        mmap_fixed = _fix_mmap_threshold()
        measured = common._can_reset_hwm()
        common._malloc_trim()
        if measured:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        base = common._proc_status_kib("VmRSS")
        torch.manual_seed(0)
        model = TransformerLM(
            TransformerLMConfig(
                vocab_size=spec["vocab_size"],
                dim=spec["dim"],
                n_layers=spec["n_layers"],
                n_heads=spec["n_heads"],
                max_len=spec["seq_len"],
                dropout=0.0,
                quant=spec.get("quant"),
            )
        )
        n_params = sum(p.numel() for p in model.parameters())
        opt = OPTIMIZERS[optimizer_name](model.parameters())
        kw = dict(batch_size=spec["batch"] // WORLD)
        if strategy == "pipeline":
            kw = dict(batch_size=spec["batch"], n_microbatches=spec["micro"], pipeline_schedule="1f1b")
        kw.update(TRAINER_KW.get(strategy, dict(strategy=strategy)))
        trainer = Trainer(
            model,
            opt,
            data,
            max_steps=spec["warmup"],
            eval_every=None,
            log_every=1000,
            progress=False,
            dist_timeout=TIMEOUT_S,
            **kw,
        )
        counter = _Counter()
        if trainer.ddp is not None:
            trainer.ddp.register_comm_hook(None, _ddp_python_allreduce_hook())
        trainer.fit()
        counter.reset()
        dist.barrier()
        t0 = time.perf_counter()
        trainer.max_steps += spec["steps"]
        trainer.fit()
        dist.barrier()
        seconds = time.perf_counter() - t0
        barrier_bytes = 0  # the barrier is an all_reduce of one element, not counted (dist.barrier is C++)
        res.update(
            seconds=seconds,
            payload_bytes_per_step=(counter.bytes - barrier_bytes) / spec["steps"],
            collective_calls_per_step=counter.calls / spec["steps"],
            n_params=n_params,
            payload_bytes_per_step_by_call={k: v / spec["steps"] for k, v in counter.by_call.items()},
            tokens_per_s=spec["steps"] * spec["batch"] * spec["seq_len"] / seconds,
            peak_rss_delta_bytes=(common._proc_status_kib("VmHWM") - base) * 1024 if measured else None,
            memory_method="rss_hwm_delta" if measured else "unavailable",
            malloc_mmap_threshold=MMAP_THRESHOLD if mmap_fixed else "glibc default (dynamic)",
            loss=trainer.history[-1]["loss"],
            split=getattr(trainer.parallel, "split", None),
            **_state_bytes(trainer),
        )
        trainer.close()
    except BaseException:  # noqa: BLE001 - reported in the row
        import traceback

        res["error"] = traceback.format_exc()[-3000:]
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    os._exit(0)


def _launch(strategy, spec, optimizer_name) -> list[dict]:
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as d:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, port, strategy, spec, optimizer_name, d)) for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out = []
        for r in range(WORLD):
            path = os.path.join(d, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    out.append(pickle.load(f))
            else:
                out.append({"rank": r, "error": f"rank {r} wrote no result (exit code {procs[r].exitcode})"})
        return out


def _mb(x):
    return "-" if x is None else f"{x / 2**20:,.0f}" if x >= 10 * 2**20 else f"{x / 2**20:.2f}"


def summarize(rows, spec, optimizer_name, wall_s) -> str:
    by = {(r["method"], r["rank"]): r for r in rows}
    lines = [
        f"## Parallelism strategies, {WORLD} gloo ranks, 1 thread a rank",
        "",
        f"TransformerLM dim {spec['dim']}, {spec['n_layers']} blocks, "
        f"{rows[0].get('n_params', 0) / 1e6:.1f}M parameters, optimizer {optimizer_name}; global batch "
        f"{spec['batch']} x {spec['seq_len']} tokens a step ({spec['steps']} timed steps after "
        f"{spec['warmup']} warm-up); pipeline: 1F1B, {spec['micro']} micro-batches. Timings are noisy: the "
        f"2 cores are shared with other jobs (load average in the rows). Wall {wall_s:.0f} s.",
        "",
        "| strategy | tokens/s | peak RSS growth / rank (MiB) r0, r1 | params+grads+optim / rank (MiB) r0, r1 "
        "| collective payload / rank / step (MiB) r0, r1 | vs ddp peak memory |",
        "|---|---|---|---|---|---|",
    ]
    ddp_peak = [by.get(("ddp", r), {}).get("peak_rss_delta_bytes") for r in range(WORLD)]
    for s in STRATEGIES:
        r0, r1 = by.get((s, 0), {}), by.get((s, 1), {})
        if r0.get("status") != "ok" or r1.get("status") != "ok":
            lines.append(f"| {s} | failed: {(r0.get('reason') or r1.get('reason') or '')[:200]} | | | | |")
            continue
        peaks = [r0["peak_rss_delta_bytes"], r1["peak_rss_delta_bytes"]]
        ratio = "-" if None in peaks or None in ddp_peak else f"{max(peaks) / max(ddp_peak):.2f}x"
        lines.append(
            f"| {s} | {r0['tokens_per_s']:,.0f} | {_mb(peaks[0])}, {_mb(peaks[1])} | "
            f"{_mb(r0['state_bytes'])}, {_mb(r1['state_bytes'])} | "
            f"{_mb(r0['payload_bytes_per_step'])}, {_mb(r1['payload_bytes_per_step'])} | {ratio} |"
        )
    lines.append("")
    quick_note = " (--quick: a tiny model, where the runtime, not the state, fills memory)" if spec is QUICK else ""
    for name in FSDP_ROWS:
        f0 = [by.get((name, r), {}).get("peak_rss_delta_bytes") for r in range(WORLD)]
        if None not in f0 and None not in ddp_peak and f0 and ddp_peak:
            ratio = max(f0) / max(ddp_peak)
            lines.append(
                f"Targets: {name} peak memory per rank {ratio:.2f}x ddp's (target <= "
                f"{TARGET_FSDP_MEMORY}x): {'met' if ratio <= TARGET_FSDP_MEMORY else 'MISSED'}{quick_note}."
            )
        else:
            lines.append(f"Targets: {name} peak memory vs ddp: not measured (a run failed or memory is unavailable).")
    lines.append(
        'fsdp-submodule: `fsdp_units="submodule"` (a unit per attention and FFN); '
        "fsdp-submodule-noprefetch: also `fsdp_backward_prefetch=False`."
    )
    pp = by.get(("pipeline", 0), {})
    if pp.get("split") is not None:
        lines.append(f"Pipeline split (measured per-block time): stage 1 starts at block {pp['split']}.")
    return "\n".join(lines)


def run(cfg: common.Config, optimizer_name: str | None = None) -> common.FamilyResult:
    optimizer_name = optimizer_name or os.environ.get("ACCELOPS_BENCH_SCALEOUT_OPTIMIZER", "adamw")
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer_name!r} is not one of {sorted(OPTIMIZERS)}")
    spec = QUICK if cfg.quick else MODEL
    meta = common.run_metadata(cfg)
    out_path = cfg.results_file(FAMILY)
    rows, failures = [], []
    t0 = time.perf_counter()
    for strategy in STRATEGIES:
        print(f"scaleout: {strategy} on {WORLD} gloo ranks", file=sys.stderr)
        for res in _launch(strategy, spec, optimizer_name):
            row = {
                **meta,
                "family": FAMILY,
                "method": strategy,
                "case": f"TransformerLM {spec['dim']}x{spec['n_layers']}, {WORLD} ranks",
                "accelops": True,
                "threads": 1,
                "world_size": WORLD,
                "optimizer": optimizer_name,
                "model": {k: spec[k] for k in ("dim", "n_layers", "n_heads", "vocab_size", "seq_len")},
                "global_batch": spec["batch"],
                "timed_steps": spec["steps"],
                "loadavg_1m": os.getloadavg()[0],
                "trainer_kw": TRAINER_KW.get(strategy, {"strategy": strategy}),
            }
            err = res.pop("error", None)
            row.update(res)
            row["status"] = "ok" if err is None else "failed"
            if err is not None:
                row["reason"] = err
                failures.append(f"{strategy} rank {res['rank']}: {err.strip().splitlines()[-1][:300]}")
            common.append_row(out_path, row)
            rows.append(row)
    summary = summarize(rows, spec, optimizer_name, time.perf_counter() - t0)
    return common.FamilyResult(FAMILY, summary, rows, failures)


def main(argv=None) -> int:
    return common.family_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
