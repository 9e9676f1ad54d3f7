"""accelops.distributed on 2 gloo ranks (CPU processes on loopback).

Each rank group is an expensive launch (process start, torch import, DDP's first
construction), so the checks are batched: a launch runs a list of named checks on every
rank and returns their results; the tests below read them from module-scoped fixtures.
Launches: correctness (reducer vs DDP, hooks vs references, error feedback, no_sync,
checkpoint/resume, world size 1, bad input), convergence (sklearn digits), repeated runs
(50 per hook) and faults (a peer that stalls, a peer that dies).
"""

from __future__ import annotations

import copy
import datetime
import io
import math
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from accelops.reference import comm as ref

HOOK_NAMES = ("bf16", "fp16", "int8", "topk", "sign", "powersgd")
CONVERGENCE = ("topk", "sign", "powersgd")
REPEATS = 50
STALL_TIMEOUT_S = 2.0


# =========================================================================== launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(checks: list, rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    for name in checks:
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            results[name] = ("ok", globals()["check_" + name](rank, world), time.perf_counter() - t0)
        except BaseException:
            results[name] = ("error", traceback.format_exc(), time.perf_counter() - t0)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: after the fault checks a peer is gone


def launch(checks: list, world: int = 2, timeout_s: float = 300) -> list[dict]:
    """Runs check_<name> for each name in `checks`, in order, on `world` ranks -> per rank
    {name: (status, value or traceback, seconds)}, with '_exitcode' and '_hung'."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(list(checks), r, world, port, tmp)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pkl")
            res = {}
            if os.path.exists(path):
                with open(path, "rb") as f:
                    res = pickle.load(f)
            res["_exitcode"] = procs[r].exitcode
            res["_hung"] = r in hung
            out.append(res)
        return out


def result(runs: list[dict], check: str, ranks=None) -> list:
    """The check's value on each rank; fails the test with the rank's traceback."""
    values = []
    for r, res in enumerate(runs):
        if ranks is not None and r not in ranks:
            continue
        if check not in res:
            pytest.fail(
                f"rank {r} never finished check {check!r} (exit code {res['_exitcode']}, "
                f"{'hung and killed' if res['_hung'] else 'exited'}); finished: "
                f"{[k for k in res if not k.startswith('_')]}"
            )
        status, value, _ = res[check]
        if status != "ok":
            pytest.fail(f"rank {r}, check {check!r}:\n{value}")
        values.append(value)
    return values


# =========================================================================== models and helpers


def mlp(sizes=(24, 32, 32, 8), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Awkward(nn.Module):
    """Tied weight (enc used twice), a parameter never used, a branch only rank 0 uses, and
    a bf16 layer beside the fp32 ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.enc = nn.Linear(12, 16)
        self.mid = nn.Linear(16, 16).to(torch.bfloat16)
        self.only_rank0 = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, 12)

    def forward(self, x, rank):
        h = torch.tanh(self.enc(x))
        h = h + self.mid(h.bfloat16()).float()
        if rank == 0:
            h = h + self.only_rank0(h)
        return self.head(h) + F.linear(h, self.enc.weight.t())  # enc.weight a second time


def grads(model) -> list:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def assert_same_grads(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"{what}: parameter {i}: grad None on one side only"
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), (
                f"{what}: parameter {i} differs, max {(x.float() - y.float()).abs().max().item():.3g}"
            )


def gather_objects(obj, world):
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def params_in_sync(model, world) -> bool:
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat)
    return all(torch.equal(rows[0], r) for r in rows[1:])


def ddp(module, **kw):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, **kw)


# =========================================================================== correctness checks


def check_reducer_matches_ddp(rank, world):
    """BucketedAllReducer without compression == DDP, bit for bit, over 3 SGD steps."""
    from accelops.distributed import BucketedAllReducer

    buckets = {}
    # 1. a plain MLP, default buckets (and several small ones)
    for caps in ({}, {"bucket_cap_mb": 0.002, "first_bucket_mb": 0.001}):
        a, b = mlp(), mlp()
        model_ddp = ddp(a, **({"bucket_cap_mb": caps["bucket_cap_mb"]} if caps else {}))
        reducer = BucketedAllReducer(b, **caps)
        buckets[str(caps)] = reducer.bucket_sizes
        opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
        for step in range(3):
            x = torch.randn(16, 24) + rank
            model_ddp(x).square().mean().backward()
            b(x).square().mean().backward()
            reducer.finish()
            assert_same_grads(grads(a), grads(b), f"mlp {caps} step {step}")
            opt_a.step(), opt_b.step()
            opt_a.zero_grad(), opt_b.zero_grad()
        reducer.remove()
    # 2. tied, unused, rank-dependent and bf16 parameters, small buckets
    a, b = Awkward(), Awkward()
    model_ddp = ddp(a, find_unused_parameters=True, bucket_cap_mb=0.001)
    reducer = BucketedAllReducer(b, bucket_cap_mb=0.001, first_bucket_mb=0.0005, find_unused_parameters=True)
    buckets["awkward"] = reducer.bucket_sizes
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(8, 12) + rank
        model_ddp(x, rank).square().mean().backward()
        b(x, rank).square().mean().backward()
        reducer.finish()
        ga, gb = grads(a), grads(b)
        assert_same_grads(ga, gb, f"awkward step {step}")
        names = [n for n, _ in a.named_parameters()]
        assert ga[names.index("unused.weight")] is None
        assert ga[names.index("only_rank0.weight")] is not None  # used on rank 0 only: averaged
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    # 3. without find_unused_parameters: the same values; a parameter no rank used gets zeros
    a, b = Awkward(), Awkward()
    model_ddp = ddp(a, find_unused_parameters=True)
    reducer = BucketedAllReducer(b)
    x = torch.randn(8, 12) + rank
    model_ddp(x, rank).sum().backward()
    b(x, rank).sum().backward()
    reducer.finish()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert name.startswith("unused") and torch.count_nonzero(pb.grad) == 0
        else:
            assert torch.equal(pa.grad, pb.grad), name
    assert len({p.dtype for p in b.parameters()}) == 2
    return buckets


def check_reducer_overlaps_backward(rank, world):
    """Every bucket's all-reduce starts during backward (from the gradient hooks), the end of
    backward completes them without finish(), and finish() afterwards changes nothing. With
    a compressor the reducer averages as DDP with the same hook does (bf16: element-wise, so
    bucket layouts do not matter) and PowerSGD keeps the replicas identical."""
    from accelops.distributed import BucketedAllReducer, register_compression

    caps = {"bucket_cap_mb": 0.002, "first_bucket_mb": 0.001}
    a, b = mlp(), mlp()
    model_ddp = ddp(a)
    reducer = BucketedAllReducer(b, **caps)
    x = torch.randn(16, 24) + rank
    model_ddp(x).square().mean().backward()
    b(x).square().mean().backward()
    assert reducer.step == 1 and reducer.buckets_launched_in_backward == len(reducer.bucket_sizes) >= 3
    assert_same_grads(grads(a), grads(b), "without finish()")
    reducer.finish()
    assert reducer.step == 1
    assert_same_grads(grads(a), grads(b), "finish() after the end of backward")
    assert reducer.bytes_last_step == sum(reducer.bucket_sizes) * 4
    reducer.remove()

    a, b = mlp(), mlp()
    model_ddp = ddp(a)
    register_compression(model_ddp, "bf16")
    reducer = BucketedAllReducer(b, compression="bf16", **caps)
    model_ddp(x).square().mean().backward()
    b(x).square().mean().backward()
    reducer.finish()
    assert_same_grads(grads(a), grads(b), "bf16 reducer vs bf16 DDP hook")
    assert reducer.bytes_last_step == sum(reducer.bucket_sizes) * 2
    reducer.remove()

    model = mlp()
    reducer = BucketedAllReducer(model, compression="powersgd", **caps)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(16, 24) + rank).square().mean().backward()
        reducer.finish()
        opt.step()
    assert reducer.compression.step == 3 and params_in_sync(model, world)

    model = mlp(seed=rank)  # different weights on each rank
    BucketedAllReducer(model).broadcast_parameters()
    assert params_in_sync(model, world)
    return True


def check_no_sync(rank, world):
    """Two micro-batches (the first under no_sync) == DDP doing the same (exactly) == one
    large batch of every rank's data on one process (to rounding)."""
    from accelops.distributed import BucketedAllReducer

    torch.manual_seed(5)
    data = [torch.randn(2, 8, 24) for _ in range(world)]  # [micro, batch, features] per rank
    a, b, c = mlp(), mlp(), mlp()
    model_ddp = ddp(a)
    reducer = BucketedAllReducer(b, bucket_cap_mb=0.004, first_bucket_mb=0.002)
    mine = data[rank]
    with model_ddp.no_sync():
        (model_ddp(mine[0]).square().mean() / 2).backward()
    (model_ddp(mine[1]).square().mean() / 2).backward()
    with reducer.no_sync():
        (b(mine[0]).square().mean() / 2).backward()
        reducer.finish()  # a no-op under no_sync
    (b(mine[1]).square().mean() / 2).backward()
    reducer.finish()
    assert_same_grads(grads(a), grads(b), "no_sync vs DDP")
    c(torch.cat([d.reshape(-1, 24) for d in data])).square().mean().backward()
    for pb, pc in zip(b.parameters(), c.parameters()):
        torch.testing.assert_close(pb.grad, pc.grad, rtol=1e-5, atol=1e-6)
    return True


# ---- hooks at the level of one bucket, against the references


def _fake_params():
    """Two buckets' worth of parameters: a matrix, a vector, a 3-D tensor, a vector."""
    torch.manual_seed(2)
    return [
        [nn.Parameter(torch.zeros(40, 24)), nn.Parameter(torch.zeros(40))],
        [nn.Parameter(torch.zeros(16, 4, 10)), nn.Parameter(torch.zeros(16))],
    ]


def _bucket_grads(rank, step, index, numel):
    """Rank `rank`'s buffer for bucket `index` at `step`: every rank can rebuild every other's.
    Parameters get gradients of very different scales, as layers do."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + index)
    x = torch.randn(numel, generator=g)
    x[: numel // 3] *= 30.0
    return x


def _run_state(state, buckets, steps, rank):
    """-> per step, per bucket: (input buffer, output buffer)."""
    from accelops.distributed._common import Bucket

    out = []
    for step in range(steps):
        futs, ins = [], []
        for index, params in enumerate(buckets):
            n = sum(p.numel() for p in params)
            buf = _bucket_grads(rank, step, index, n)
            ins.append(buf.clone())
            futs.append(
                state(
                    Bucket(
                        index,
                        buf,
                        params,
                        tuple(f"b{index}p{i}" for i in range(len(params))),
                        index == len(buckets) - 1,
                    )
                )
            )
        out.append([(i, f.wait().clone()) for i, f in zip(ins, futs)])
    return out


def _segments(params):
    offset = 0
    for p in params:
        yield offset, p.numel()
        offset += p.numel()


def _expected_chunked(name, state, buckets, steps, world):
    """What the int8 / sign hook must return, from the reference, per parameter segment."""
    residuals = {(r, i): torch.zeros(sum(p.numel() for p in ps)) for r in range(world) for i, ps in enumerate(buckets)}
    expected = []
    for step in range(steps):
        per_bucket = []
        for index, params in enumerate(buckets):
            n = sum(p.numel() for p in params)
            bufs = [_bucket_grads(r, step, index, n) for r in range(world)]
            out = torch.empty(n)
            for i, (offset, size) in enumerate(_segments(params)):
                codes, scales = [], []
                for r in range(world):
                    res = residuals[(r, index)][offset : offset + size] if state.error_feedback else None
                    seg = bufs[r][offset : offset + size].clone()
                    if name == "int8":
                        seed = state.param_seed(f"b{index}p{i}", step, r)
                        c, s = ref.int8_compress_(seg, res, state.chunk_size, seed)
                    else:
                        c, s = ref.sign_compress_(seg, res, state.chunk_size)
                    codes.append(c)
                    scales.append(s)
                if name == "int8":
                    out[offset : offset + size] = ref.int8_decompress(
                        torch.stack(codes), torch.stack(scales), state.chunk_size
                    )
                else:
                    out[offset : offset + size] = ref.sign_decompress(
                        torch.stack(codes), torch.stack(scales), size, state.chunk_size
                    )
            per_bucket.append(out)
        expected.append(per_bucket)
    return expected, residuals


def _expected_topk(state, buckets, steps, world):
    residuals = {(r, i): torch.zeros(sum(p.numel() for p in ps)) for r in range(world) for i, ps in enumerate(buckets)}
    expected = []
    for step in range(steps):
        per_bucket = []
        for index, params in enumerate(buckets):
            n = sum(p.numel() for p in params)
            k = max(1, math.ceil(state.ratio * n))
            vals, idxs = [], []
            for r in range(world):
                v, i = ref.topk_compress_(
                    _bucket_grads(r, step, index, n),
                    residuals[(r, index)],
                    k,
                    state.method,
                    state.sample_size,
                    state.bucket_seed(index, step, r),
                )
                vals.append(v)
                idxs.append(i)
            per_bucket.append(ref.topk_decompress(torch.stack(vals), torch.stack(idxs), n))
        expected.append(per_bucket)
    return expected, residuals


def _expected_powersgd(rank_r, q0, buckets, steps, world):
    """PowerSGD written out: P = sum_r M_r Q, orthogonalized; Q = sum_r M_r^T P / W;
    approximation P Q^T; vectors averaged exactly; residual = acc - result (0 on vectors)."""
    residuals = {(r, i): torch.zeros(sum(p.numel() for p in ps)) for r in range(world) for i, ps in enumerate(buckets)}
    qs = {k: v.clone() for k, v in q0.items()}
    expected = []
    for step in range(steps):
        per_bucket = []
        for index, params in enumerate(buckets):
            n = sum(p.numel() for p in params)
            accs = [_bucket_grads(r, step, index, n) + residuals[(r, index)] for r in range(world)]
            out = torch.empty(n)
            for i, (p, (offset, size)) in enumerate(zip(params, _segments(params))):
                if p.dim() >= 2:
                    key = f"b{index}p{i}"
                    rows, cols = p.shape[0], size // p.shape[0]
                    q = ref.orthogonalize_(qs[key].clone(), 1e-8)
                    ms = [a[offset : offset + size].view(rows, cols) for a in accs]
                    pm = ref.orthogonalize_(sum(m @ q for m in ms), 1e-8)
                    qn = sum(m.t() @ pm for m in ms) / world
                    out[offset : offset + size] = (pm @ qn.t()).reshape(-1)
                    qs[key] = qn
                else:
                    out[offset : offset + size] = sum(a[offset : offset + size] for a in accs) / world
            for r in range(world):
                residuals[(r, index)] = accs[r] - out
                for p, (offset, size) in zip(params, _segments(params)):
                    if p.dim() < 2:
                        residuals[(r, index)][offset : offset + size] = 0
            per_bucket.append(out)
        expected.append(per_bucket)
    return expected, residuals


def _state_residuals(state, buckets):
    """The state's residual per bucket (from state_dict), in bucket order."""
    pieces = state.state_dict()["residuals"]
    return [torch.cat([pieces[f"b{i}p{j}"] for j in range(len(ps))]) for i, ps in enumerate(buckets)]


def check_hooks_match_reference(rank, world):
    """Each hook's averaged bucket equals the same computation done with the references
    (exactly; PowerSGD's float path to rounding) and its residuals equal the reference's."""
    from accelops.distributed import make_state

    steps = 3
    buckets = _fake_params()
    report = {}
    for name, opts in [
        ("bf16", {}),
        ("fp16", {}),
        ("int8", {}),
        ("int8", {"error_feedback": True}),
        ("topk", {"ratio": 0.05}),
        ("topk", {"ratio": 0.05, "method": "sampled", "sample_size": 64}),
        ("sign", {}),
        ("sign", {"chunk_size": 64}),
        ("powersgd", {"rank": 3}),
    ]:
        state = make_state(name, **opts)
        q0 = {}
        if name == "powersgd":  # start from known Q matrices, loaded as a checkpoint would be
            g = torch.Generator().manual_seed(9)
            q0 = {"b0p0": torch.randn(24, 3, generator=g), "b1p0": torch.randn(40, 3, generator=g)}
            sd = state.state_dict()
            sd["q"] = q0
            state.load_state_dict(sd)
        got = _run_state(state, buckets, steps, rank)
        if name in ("bf16", "fp16"):
            dtype = torch.bfloat16 if name == "bf16" else torch.float16
            for step in range(steps):
                for index, params in enumerate(buckets):
                    n = sum(p.numel() for p in params)
                    wire = [ref.cast_div(_bucket_grads(r, step, index, n), world, dtype) for r in range(world)]
                    want = wire[0]
                    for w in wire[1:]:
                        want = want + w
                    assert torch.equal(got[step][index][1], want.float()), (name, step, index)
            report[name] = state.bytes_last_step
            continue
        if name in ("int8", "sign"):
            expected, residuals = _expected_chunked(name, state, buckets, steps, world)
        elif name == "topk":
            expected, residuals = _expected_topk(state, buckets, steps, world)
        else:
            expected, residuals = _expected_powersgd(rank, q0, buckets, steps, world)
        for step in range(steps):
            for index in range(len(buckets)):
                have, want = got[step][index][1], expected[step][index]
                if name == "powersgd":
                    torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4, msg=f"powersgd {step} {index}")
                else:
                    assert torch.equal(have, want), (name, opts, step, index, (have - want).abs().max().item())
        if getattr(state, "error_feedback", False):
            for index, res in enumerate(_state_residuals(state, buckets)):
                if name == "powersgd":
                    torch.testing.assert_close(res, residuals[(rank, index)], rtol=1e-4, atol=1e-3)
                else:
                    assert torch.equal(res, residuals[(rank, index)]), (name, opts, index)
        report[f"{name} {opts}"] = state.bytes_last_step
    return report


def check_error_feedback_invariant(rank, world):
    """With error feedback nothing is lost: after T steps, W * sum of the averaged outputs +
    the ranks' residuals == the sum of every rank's gradients (to fp32 rounding)."""
    from accelops.distributed import make_state

    steps = 4
    buckets = _fake_params()
    worst = {}
    for name, opts in [
        ("topk", {"ratio": 0.02}),
        ("sign", {}),
        ("int8", {"error_feedback": True}),
        ("powersgd", {"rank": 2}),
    ]:
        state = make_state(name, **opts)
        got = _run_state(state, buckets, steps, rank)
        residuals = gather_objects(_state_residuals(state, buckets), world)
        for index, params in enumerate(buckets):
            n = sum(p.numel() for p in params)
            sent = sum(got[s][index][1] for s in range(steps)) * world
            kept = sum(residuals[r][index] for r in range(world))
            total = sum(_bucket_grads(r, s, index, n) for r in range(world) for s in range(steps))
            err = ((sent + kept - total).norm() / total.norm()).item()
            worst[name] = max(worst.get(name, 0.0), err)
            assert err < 1e-5, (name, index, err)
            if name == "topk":  # each rank sent k elements a step; the others wait in its residual
                mine = state.state_dict()["residuals"]
                assert all(torch.isfinite(v).all() for v in mine.values())
    return worst


def _train_resumable(hook, opts, rank, steps=6, resume_at=None):
    """SGD with momentum through DDP + hook; at step resume_at everything is saved (the hook
    state through torch.save) and training goes on with a new model object, a new DDP, a new
    hook and a new optimizer loaded from it. -> final parameters."""
    from accelops.distributed import register_compression

    def build(seed):
        model = mlp(seed=seed)
        wrapped = ddp(model)
        state = register_compression(wrapped, hook, **opts)
        return model, wrapped, state, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, wrapped, state, opt = build(0)
    for step in range(steps):
        if step == resume_at:
            buf = io.BytesIO()
            torch.save(state.state_dict(), buf)
            saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
            model, wrapped, state, opt = build(123)
            model.load_state_dict(saved_model)
            opt.load_state_dict(saved_opt)
            state.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        g = torch.Generator().manual_seed(100 * step + rank)
        opt.zero_grad()
        wrapped(torch.randn(16, 24, generator=g)).square().mean().backward()
        opt.step()
    assert state.step == steps  # the loaded step counter carries on
    return [p.detach().clone() for p in model.parameters()]


def check_checkpoint_resume(rank, world):
    """Save (model, optimizer, hook state) mid-training, resume in a fresh DDP + hook: the
    resumed run continues bit for bit as the uninterrupted one (same bucket layout)."""
    from accelops.distributed import BucketedAllReducer

    opts = {"topk": {"ratio": 0.05}, "powersgd": {"rank": 2}, "int8": {"error_feedback": True}}
    for hook in HOOK_NAMES:
        straight = _train_resumable(hook, opts.get(hook, {}), rank)
        resumed = _train_resumable(hook, opts.get(hook, {}), rank, resume_at=3)
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), f"{hook}: resumed run differs"
    # the reducer with a compressor resumes the same way
    finals = []
    for resume in (False, True):
        model = mlp()
        reducer = BucketedAllReducer(model, compression="topk")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(6):
            if resume and step == 3:
                sd, osd, msd = reducer.compression.state_dict(), opt.state_dict(), model.state_dict()
                reducer.remove()
                model = mlp(seed=7)
                model.load_state_dict(msd)
                reducer = BucketedAllReducer(model, compression="topk")
                reducer.compression.load_state_dict(sd)
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                opt.load_state_dict(osd)
            g = torch.Generator().manual_seed(100 * step + rank)
            opt.zero_grad()
            model(torch.randn(16, 24, generator=g)).square().mean().backward()
            reducer.finish()
            opt.step()
        reducer.remove()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals)), "reducer + topk: resumed run differs"
    return True


def check_world_size_one(rank, world):
    """A process group of one rank: every hook and the reducer work and change nothing; a
    state saved there cannot be loaded on 2 ranks."""
    from accelops.distributed import BucketedAllReducer, make_state, register_compression

    singles = [dist.new_group(ranks=[r]) for r in range(world)]  # every rank creates every group
    mine = singles[rank]
    x = torch.randn(16, 24)
    plain = mlp()
    plain(x).square().mean().backward()
    want = grads(plain)
    saved = None
    for hook in HOOK_NAMES:
        model = mlp()
        wrapped = ddp(model, process_group=mine)
        state = register_compression(wrapped, hook)
        assert state.world_size == 1
        wrapped(x).square().mean().backward()
        assert_same_grads(want, grads(model), f"{hook} on one rank")
        assert state.bytes_last_step == 0
        if hook == "topk":
            saved = state.state_dict()
    model = mlp()
    reducer = BucketedAllReducer(model, process_group=mine)
    model(x).square().mean().backward()
    reducer.finish()
    assert_same_grads(want, grads(model), "reducer on one rank")
    two = make_state("topk")
    with pytest.raises(ValueError, match="world size 1.*2 ranks"):
        two.load_state_dict(saved)
    return True


def check_bad_input(rank, world):
    """Clear errors for misuse that needs a process group."""
    from accelops.distributed import BucketedAllReducer, make_state, register_compression
    from accelops.distributed.hooks import ddp_comm_hook

    wrapped = ddp(mlp())
    register_compression(wrapped, "topk", ratio=0.1)
    with pytest.raises(RuntimeError, match="already registered"):
        register_compression(wrapped, "sign")
    with pytest.raises(RuntimeError, match="already registered"):
        register_compression(wrapped, "topk", ratio=0.1)
    other = ddp(mlp())
    other.register_comm_hook(make_state("bf16"), ddp_comm_hook)
    with pytest.raises(RuntimeError, match="already has a DDP communication hook"):
        register_compression(other, "fp16")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_compression(mlp(), "topk")
    # a state from another hook, another rank, another PowerSGD rank
    topk = make_state("topk")
    with pytest.raises(ValueError, match="'sign' hook"):
        topk.load_state_dict(make_state("sign").state_dict())
    sd = topk.state_dict()
    sd["rank"] = 1 - rank
    with pytest.raises(ValueError, match="saved by rank"):
        topk.load_state_dict(sd)
    with pytest.raises(ValueError, match="PowerSGD rank 2"):
        make_state("powersgd", rank=4).load_state_dict(make_state("powersgd", rank=2).state_dict())
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        BucketedAllReducer([torch.zeros(3)])
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        BucketedAllReducer(mlp(), bucket_cap_mb=0)
    single = [dist.new_group(ranks=[r]) for r in range(world)][rank]
    with pytest.raises(ValueError, match="compression state is for 1 ranks"):
        BucketedAllReducer(mlp(), compression=make_state("sign", process_group=single))
    return True


# =========================================================================== convergence (sklearn digits)


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def _train_digits(hook, opts, rank, world, epochs=30, batch=64, lr=0.4):
    """MLP 64-128-128-10, plain SGD, each rank a disjoint half of every global batch; the
    same initial weights and batch order for every method -> test accuracy in percent."""
    from accelops.distributed import register_compression

    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    wrapped = ddp(model)
    if hook:
        register_compression(wrapped, hook, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    n = len(xtr)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - world * batch + 1, world * batch):
            idx = perm[i + rank * batch : i + (rank + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(wrapped(xtr[idx]), ytr[idx]).backward()
            opt.step()
    assert params_in_sync(model, world)
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item() * 100


def check_convergence(rank, world):
    return {
        name: _train_digits(name, opts, rank, world)
        for name, opts in [(None, {}), ("topk", {"ratio": 0.01}), ("sign", {}), ("powersgd", {"rank": 4})]
    }


# =========================================================================== repeated runs


class ThreeDtypes(nn.Module):
    """fp32, bf16 and fp64 layers: DDP buckets by dtype, so even its default caps give 3
    buckets (in flight at once) for a model this small."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 64).to(torch.bfloat16)
        self.c = nn.Linear(64, 10).to(torch.float64)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h.bfloat16())).double()
        return self.c(h)


def check_repeated_runs(rank, world):
    """REPEATS fresh DDP + hook runs per hook, default buckets (3 here, one per dtype), 2
    steps each (the first with DDP's initial buckets, the second after it rebuilds them): no
    collective mismatch, and the replicas stay identical."""
    from accelops.distributed import register_compression

    counts = {}
    for hook in HOOK_NAMES:
        for run in range(REPEATS):
            model = ThreeDtypes(seed=run)
            wrapped = ddp(model)
            state = register_compression(wrapped, hook, **({"rank": 2} if hook == "powersgd" else {}))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for step in range(2):
                opt.zero_grad()
                wrapped(torch.randn(8, 32) + rank).square().mean().backward()
                opt.step()
            assert state.step == 2
            assert params_in_sync(model, world), (hook, run)
        counts[hook] = REPEATS
    return counts


# =========================================================================== faults


def timed_outcome(step, catch=Exception):
    """-> (what step() raised as "Type: message", or "no error"; the seconds it took)."""
    t0 = time.monotonic()
    try:
        step()
        return ("no error", time.monotonic() - t0)
    except catch as exc:
        return (f"{type(exc).__name__}: {exc}", time.monotonic() - t0)


def check_stalled_peer_hook(rank, world):
    """Rank 1 skips a step: rank 0's backward raises CommunicationError after the hook's
    timeout instead of hanging."""
    from accelops.distributed import register_compression

    model = mlp()
    wrapped = ddp(model)
    register_compression(wrapped, "topk", ratio=0.1, timeout=STALL_TIMEOUT_S)
    out = None
    if rank == 0:
        out = timed_outcome(lambda: wrapped(torch.randn(8, 24)).sum().backward())
    dist.barrier()
    return out


def check_stalled_peer_reducer(rank, world):
    """The same for the reducer, whose timeout bounds its wait for each bucket."""
    from accelops.distributed import BucketedAllReducer, CommunicationError

    group = dist.new_group(timeout=datetime.timedelta(seconds=60))
    model = mlp()
    reducer = BucketedAllReducer(model, process_group=group, timeout=STALL_TIMEOUT_S)
    out = None
    if rank == 0:

        def step():
            model(torch.randn(8, 24)).sum().backward()
            reducer.finish()

        out = timed_outcome(step, catch=CommunicationError)
    dist.barrier()
    return out


def check_peer_dies(rank, world):
    """Rank 1 exits in the middle of its backward (PowerSGD, several buckets in flight):
    rank 0 raises CommunicationError promptly."""
    from accelops.distributed import register_compression

    model = mlp((24, 256, 256, 8))
    wrapped = ddp(model, bucket_cap_mb=0.1)
    register_compression(wrapped, "powersgd", rank=2, timeout=30)
    x = torch.randn(8, 24)
    wrapped(x).sum().backward()  # one good step
    if rank == 1:  # dies once the later layers' buckets are launched

        def die_in_backward(module, args, out):
            out.register_hook(lambda grad: os._exit(3))

        model[0].register_forward_hook(die_in_backward)
    return timed_outcome(lambda: wrapped(x).sum().backward())


# One launch runs them all, in this order: its start-up (processes, imports, DDP's first
# construction) costs several seconds on a 2-core machine. The peer that dies goes last.
CHECKS = [
    "reducer_matches_ddp",
    "reducer_overlaps_backward",
    "no_sync",
    "hooks_match_reference",
    "error_feedback_invariant",
    "checkpoint_resume",
    "world_size_one",
    "bad_input",
    "convergence",
    "repeated_runs",
    "stalled_peer_hook",
    "stalled_peer_reducer",
    "peer_dies",
]


# =========================================================================== tests


@pytest.fixture(scope="module")
def runs():
    return launch(CHECKS)


def test_reducer_matches_ddp(runs):
    sizes = result(runs, "reducer_matches_ddp")[0]
    assert len(sizes["{'bucket_cap_mb': 0.002, 'first_bucket_mb': 0.001}"]) > 2  # several buckets in flight
    assert len(sizes["awkward"]) > 2


def test_reducer_overlaps_backward(runs):
    result(runs, "reducer_overlaps_backward")


def test_no_sync_accumulation(runs):
    result(runs, "no_sync")


def test_hooks_match_reference(runs):
    bytes_sent = result(runs, "hooks_match_reference")[0]
    assert bytes_sent["bf16"] < bytes_sent["int8 {}"] * 2.1


def test_error_feedback_invariant(runs):
    result(runs, "error_feedback_invariant")


def test_checkpoint_resume(runs):
    result(runs, "checkpoint_resume")


def test_world_size_one(runs):
    result(runs, "world_size_one")


def test_bad_input_distributed(runs):
    result(runs, "bad_input")


def test_convergence_digits(runs):
    acc = result(runs, "convergence")
    assert acc[0] == acc[1]  # both ranks hold the same model
    acc = acc[0]
    assert acc[None] > 90, acc
    for name in CONVERGENCE:
        assert acc[name] >= acc[None] - 1.0, f"{name}: {acc[name]:.2f}% vs uncompressed {acc[None]:.2f}%"


def test_repeated_runs_no_collective_mismatch(runs):
    counts = result(runs, "repeated_runs")[0]
    assert counts == {h: REPEATS for h in HOOK_NAMES}


def test_faults_raise_clear_errors(runs):
    for check in ("stalled_peer_hook", "stalled_peer_reducer"):
        message, seconds = result(runs, check, ranks=[0])[0]
        assert "CommunicationError" in message or "accelops.distributed" in message, message
        assert "peer process died or did not take part" in message, message
        assert STALL_TIMEOUT_S * 0.9 <= seconds < STALL_TIMEOUT_S + 15, seconds
    message, seconds = result(runs, "peer_dies", ranks=[0])[0]
    assert "peer process died" in message, message
    assert seconds < 15, seconds  # well within the 30 s timeout
    assert runs[1]["_exitcode"] == 3


# =========================================================================== without a process group


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, float("nan"), float("inf")])
def test_topk_ratio_outside_0_1(ratio):
    from accelops.distributed import make_state

    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        make_state("topk", ratio=ratio)


@pytest.mark.parametrize("rank, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_powersgd_rank_below_1(rank, error):
    from accelops.distributed import make_state

    with pytest.raises(error, match="rank"):
        make_state("powersgd", rank=rank)


def test_unknown_hook_and_option():
    from accelops.distributed import make_state

    with pytest.raises(ValueError, match="name must be one of"):
        make_state("gzip")
    with pytest.raises(TypeError, match="no option 'ratio'"):
        make_state("sign", ratio=0.1)
    with pytest.raises(ValueError, match="timeout"):
        make_state("sign", timeout=-1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_state("sign")
