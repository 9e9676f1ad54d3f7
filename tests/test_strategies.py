"""Trainer(strategy="fsdp" | "zero1" | "pipeline") on 2 forked gloo ranks (CPU, one thread):
the same losses as single-process training over the same global batches, exact resume from
each strategy's own checkpoints, an FSDP checkpoint resharded 2 ranks -> 1 -> 2, the
combinations that are refused, and a rank SIGKILLed mid-step under each strategy.

Tolerance of the parity checks (strategy vs one process): rel 1e-5 on losses, rtol 1e-5 /
atol 1e-6 on weights, as the DDP test in test_train.py. The two ranks reduce their halves of
the batch separately (and FSDP/DDP average the two gradients) where one process sums the
whole batch: the same numbers added in another order, a few fp32 ulps a step (measured
~1e-7 relative), which SGD with momentum over 3 steps does not amplify. Resumes are compared
with the uninterrupted run of the same strategy bit for bit (float ==): the checkpoints
hold exact fp32 values, RNG states and data positions. The reshard test (2 -> 1 -> 2 ranks)
changes who sums what, so it uses the parity tolerance.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import signal
import tempfile
import time
import traceback
import warnings

import pytest
import torch

from accelops.models import RNNLM, RNNLMConfig, TransformerLM, TransformerLMConfig
from accelops.train import CheckpointError, Trainer, list_checkpoints, load_checkpoint
from accelops.train.checkpoint import list_dir_checkpoints, verify_dir_checkpoint
from accelops.train.parallel import balance_stages, full_model_state_dict

from .helpers import free_port, rank_results, run_forked_ranks
from .test_train import SEQ, TRAIN, VAL, VOCAB, losses, make_trainer

LOSS_REL = 1e-5
W_RTOL, W_ATOL = 1e-5, 1e-6


pytestmark = pytest.mark.one_thread


def _env(rank, world, port):
    torch.set_num_threads(1)  # first: OpenMP pools do not survive the fork
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def gru_trainer(steps, **kw):
    torch.manual_seed(0)
    model = RNNLM(
        RNNLMConfig(vocab_size=len(VOCAB), dim=24, hidden=32, n_layers=3, max_len=SEQ, cell="gru", dropout=0.0)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw.setdefault("batch_size", 4)
    kw.setdefault("eval_every", None)
    kw.setdefault("log_every", 2)
    return Trainer(model, opt, TRAIN, VAL, max_steps=steps, progress=False, **kw)


# Parity runs: (name, strategy kwargs for the 2-rank run, kwargs of the equivalent single
# process). Data-parallel strategies: 2 ranks x batch 4 = one process's batch 8. Pipeline:
# both stages see the whole batch, so the single process has the same batch_size.
PARITY = {
    "fsdp": (
        dict(strategy="fsdp", batch_size=4, accumulate_grad_batches=2),
        dict(batch_size=8, accumulate_grad_batches=2),
    ),
    "zero1": (
        dict(strategy="zero1", batch_size=4, accumulate_grad_batches=2),
        dict(batch_size=8, accumulate_grad_batches=2),
    ),
    # FSDP's low-memory settings: a unit per attention and FFN, no backward prefetch
    "fsdp-submodule": (
        dict(
            strategy="fsdp",
            fsdp_units="submodule",
            fsdp_backward_prefetch=False,
            batch_size=4,
            accumulate_grad_batches=2,
        ),
        dict(batch_size=8, accumulate_grad_batches=2),
    ),
    "pipeline-gpipe": (
        dict(
            strategy="pipeline", pipeline_schedule="gpipe", batch_size=4, accumulate_grad_batches=2, pipeline_split=[1]
        ),
        dict(batch_size=4, accumulate_grad_batches=2),
    ),
    "pipeline-1f1b": (
        dict(strategy="pipeline", pipeline_schedule="1f1b", batch_size=8, n_microbatches=2),
        dict(batch_size=8),
    ),
}
COMMON_PARITY = dict(dropout=0.0, opt="sgd", lr=0.1, grad_clip=0.5, eval_every=3)
RESUME = {  # AdamW, dropout, a schedule: every piece of state the checkpoint must restore
    "fsdp": dict(strategy="fsdp"),
    "zero1": dict(strategy="zero1"),
    "zero1-topk": dict(strategy="zero1", compression={"name": "topk", "ratio": 0.05}),
    "ddp-topk": dict(compression={"name": "topk", "ratio": 0.05}),
    "pipeline": dict(strategy="pipeline", batch_size=4, accumulate_grad_batches=2),
}


def _main_worker(rank, world, port, out_dir):
    _env(rank, world, port)
    res = {}
    try:
        for name, (kw, _) in PARITY.items():
            t = make_trainer(3, **COMMON_PARITY, **kw)
            t.fit()
            res[name] = (losses(t), [e["val_loss"] for e in t.evals], full_model_state_dict(t))
            res[name + "-held"] = _held_numbers(t)
            res[name + "-units"] = getattr(t.parallel, "sharded_units", None)
        t = make_trainer(3, strategy="fsdp", precision="bf16-mixed")
        seen = []
        t.model.blocks[0].attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
        t.fit()
        res["fsdp-bf16"] = (losses(t), seen[0], {p.dtype for g in t.optimizer.param_groups for p in g["params"]})
        for name in ("fsdp", "pipeline"):  # the Trainer's early stopping (main's feature) under a strategy
            t = make_trainer(
                40,
                strategy=name,
                eval_every=2,
                lr=0.5,
                accumulate_grad_batches=2,
                early_stopping=dict(monitor="val_loss", patience=1),
                checkpoint_dir=os.path.join(out_dir, "early-" + name),
            )
            t.fit()
            res["early-" + name] = (t.step, t.stop_reason, [e["val_loss"] for e in t.evals])
        t = gru_trainer(3, strategy="pipeline", pipeline_schedule="1f1b", batch_size=8, n_microbatches=4)
        split = t.parallel.split  # chosen from the measured per-block times (rank 0's, broadcast)
        t.fit()
        res["pipeline-gru"] = (losses(t), split, full_model_state_dict(t))
        t = gru_trainer(3, strategy="fsdp", fsdp_units="submodule", fsdp_backward_prefetch=False, batch_size=4)
        t.fit()
        res["fsdp-submodule-gru"] = (losses(t), t.parallel.sharded_units, full_model_state_dict(t))

        for name, kw in RESUME.items():
            d = os.path.join(out_dir, name)
            kw = dict(kw, eval_every=2, eval_batches=1, checkpoint_every=2)
            full = make_trainer(4, checkpoint_dir=os.path.join(d, "full"), **kw)
            full.fit()
            cut = make_trainer(2, checkpoint_dir=os.path.join(d, "cut"), **kw)
            cut.fit()
            resumed = make_trainer(4, model_seed=7, checkpoint_dir=os.path.join(d, "cut"), **kw)
            step = resumed.step
            resumed.fit()
            res["resume-" + name] = (
                losses(full),
                [e["val_loss"] for e in full.evals],
                full_model_state_dict(full),
                step,
                losses(resumed),
                [e["val_loss"] for e in resumed.evals],
                full_model_state_dict(resumed),
            )

        # FSDP 2 ranks -> 1 rank -> 2 ranks, against 6 uninterrupted steps on 2 ranks.
        fk = dict(strategy="fsdp", dropout=0.0, opt="sgd", lr=0.1, batch_size=4, checkpoint_every=2)
        d = os.path.join(out_dir, "reshard")
        ref = make_trainer(6, **fk)
        ref.fit()
        two = make_trainer(2, checkpoint_dir=d, **fk)
        two.fit()
        torch.distributed.barrier()
        one = None
        if rank == 0:  # one process alone (distributed=False), twice the batch: the same global batch
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                one = make_trainer(4, checkpoint_dir=d, distributed=False, **dict(fk, batch_size=8))
            one_step = one.step
            one.fit()
            res["reshard-warning"] = [str(w.message) for w in caught]
            res["reshard-one"] = (one_step, losses(one))
        torch.distributed.barrier()
        back = make_trainer(6, checkpoint_dir=d, **fk)
        res["reshard"] = (
            losses(ref),
            full_model_state_dict(ref),
            back.step,
            (back.fit(), losses(back))[1],
            full_model_state_dict(back),
        )

        # zero1 / pipeline checkpoints on another world size: a clear error
        if rank == 0:
            for name in ("zero1", "pipeline"):
                try:
                    make_trainer(
                        4, checkpoint_dir=os.path.join(out_dir, name, "cut"), distributed=False, **RESUME[name]
                    )
                except ValueError as exc:
                    res[f"world-{name}"] = str(exc)
        torch.distributed.barrier()
        # bad pipeline settings that need the process group to be checked
        errors = {}
        for label, kw in (
            ("split", dict(pipeline_split=[5], accumulate_grad_batches=2)),
            ("split-len", dict(pipeline_split=[1, 1], accumulate_grad_batches=2)),
            ("1f1b-micro", dict(pipeline_schedule="1f1b", accumulate_grad_batches=1)),
        ):
            try:
                make_trainer(1, strategy="pipeline", **kw)
            except ValueError as exc:
                errors[label] = str(exc)
        try:
            torch.manual_seed(0)
            tied = TransformerLM(
                TransformerLMConfig(
                    vocab_size=len(VOCAB), dim=16, n_layers=2, n_heads=2, max_len=SEQ, tie_embeddings=True
                )
            )
            Trainer(
                tied,
                torch.optim.SGD(tied.parameters(), lr=0.1),
                TRAIN,
                strategy="pipeline",
                batch_size=4,
                accumulate_grad_batches=2,
                progress=False,
            )
        except ValueError as exc:
            errors["tied"] = str(exc)
        res["errors"] = errors
        ref.close()
    except BaseException:
        res["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)


def _held_numbers(t):
    """(parameter numbers this rank holds, optimizer-state numbers it holds, model total)."""
    from torch.distributed.tensor import DTensor

    if t.strategy == "pipeline":
        params = list(t.parallel.stage_module.parameters())
    else:
        params = list(t.model.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    opt = t.optimizer.optim if t.strategy == "zero1" else t.optimizer
    state = sum(
        (v.to_local() if isinstance(v, DTensor) else v).numel()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    return local, state


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as d:
        run_forked_ranks(_main_worker, d, timeout_s=300)
        out = rank_results(d)
        return out


def _assert_weights_close(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=W_RTOL, atol=W_ATOL, msg=lambda m: f"{k}: {m}")


def _assert_weights_equal(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("name", list(PARITY))
def test_strategy_equals_single_process(results, name):
    kw, single_kw = PARITY[name]
    single = make_trainer(3, **COMMON_PARITY, **single_kw)
    single.fit()
    l0, v0, w0 = results[0][name]
    l1, v1, _ = results[1][name]
    assert l0 == l1 and v0 == v1  # every rank logs the same (global) numbers
    assert l0 == pytest.approx(losses(single), rel=LOSS_REL)
    assert v0 == pytest.approx([e["val_loss"] for e in single.evals], rel=LOSS_REL)
    _assert_weights_close(w0, {k: v.detach() for k, v in single.model.state_dict().items()})


def test_what_each_rank_holds(results):
    total = tiny_total()
    for name, part in (
        ("fsdp", "params"),
        ("fsdp-submodule", "params"),
        ("zero1", "state"),
        ("pipeline-1f1b", "params"),
    ):
        held = [results[r][name + "-held"] for r in range(2)]
        params, state = [h[0] for h in held], [h[1] for h in held]
        if part == "params":  # each rank holds a part of the weights (and their SGD momentum)
            assert sum(params) == total and all(0 < p < total for p in params), (name, params, total)
            assert state == params
        else:  # zero1: every weight on every rank, the momentum split between them
            assert params == [total, total] and sum(state) == total and all(0 < x < total for x in state)


def test_fsdp_units(results):
    from .test_train import tiny_model

    n = len(tiny_model().blocks)
    assert results[0]["fsdp-units"] == [f"blocks.{i}" for i in range(n)] + [""]
    # submodule: attention and FFN of each block get their own unit (the norms stay in the
    # block's), then the block, then the root
    assert results[0]["fsdp-submodule-units"] == [
        u for i in range(n) for u in (f"blocks.{i}.attn", f"blocks.{i}.ffn", f"blocks.{i}")
    ] + [""]


def test_fsdp_large_children_rule():
    from accelops.train.parallel.fsdp import large_children

    t_block = TransformerLM(
        TransformerLMConfig(vocab_size=len(VOCAB), dim=16, n_layers=1, n_heads=2, max_len=SEQ)
    ).blocks[0]
    assert [n for n, _ in large_children(t_block)] == ["attn", "ffn"]
    # an RNN block: the recurrent cell and the output projection (its norm stays in the block)
    r_block = RNNLM(RNNLMConfig(vocab_size=len(VOCAB), dim=8, hidden=8, n_layers=1, max_len=SEQ, cell="gru")).blocks[0]
    assert [n for n, _ in large_children(r_block)] == ["rnn", "out_proj"]
    # a child holding all of a block's parameters is the block: no unit of its own
    whole = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.nn.ReLU())
    assert large_children(whole) == []
    # a parameter shared between two children keeps the block one unit
    shared = torch.nn.Module()
    shared.a, shared.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    shared.b.weight = shared.a.weight
    assert large_children(shared) == []


def tiny_total():
    from .test_train import tiny_model

    return sum(p.numel() for p in tiny_model().parameters())


def test_fsdp_bf16_mixed_gathers_bf16_weights_and_keeps_fp32_shards(results):
    got, gathered, sharded = results[0]["fsdp-bf16"]
    assert gathered == torch.bfloat16 and sharded == {torch.float32}  # MixedPrecisionPolicy(param_dtype=bf16)
    assert all(math.isfinite(x) for x in got) and results[1]["fsdp-bf16"][0] == got
    single = make_trainer(3, precision="bf16-mixed", batch_size=8)
    single.fit()
    # bf16 rounding of the weights (FSDP) vs of the activations only (autocast): close, not equal
    assert got == pytest.approx(losses(single), rel=2e-2)


@pytest.mark.parametrize("name", ["fsdp", "pipeline"])
def test_early_stopping_under_a_strategy(results, name):
    step, reason, vals = results[0]["early-" + name]
    assert results[1]["early-" + name] == (step, reason, vals)  # every rank stops at the same step
    assert step < 40 and "early stopping" in reason and vals[-1] >= min(vals[:-1])


def test_pipeline_auto_split_of_a_gru_equals_single_process(results):
    got, split, weights = results[0]["pipeline-gru"]
    assert len(split) == 1 and 0 <= split[0] <= 3 and results[1]["pipeline-gru"][1] == split
    single = gru_trainer(3, batch_size=8)
    single.fit()
    assert got == pytest.approx(losses(single), rel=LOSS_REL)
    _assert_weights_close(weights, {k: v.detach() for k, v in single.model.state_dict().items()})


def test_fsdp_submodule_units_of_a_gru_equal_single_process(results):
    single = gru_trainer(3, batch_size=8)
    single.fit()
    l0, units, w0 = results[0]["fsdp-submodule-gru"]
    assert results[1]["fsdp-submodule-gru"][0] == l0
    assert units == [u for i in range(3) for u in (f"blocks.{i}.rnn", f"blocks.{i}.out_proj", f"blocks.{i}")] + [""]
    assert l0 == pytest.approx(losses(single), rel=LOSS_REL)
    _assert_weights_close(w0, {k: v.detach() for k, v in single.model.state_dict().items()})


def test_balance_stages():
    assert balance_stages([1, 1, 1, 1], 2) == [2]
    assert balance_stages([1, 1, 1, 1], 2, first_cost=2.0) == [1]  # the embeddings weigh on stage 0
    assert balance_stages([1, 1, 1, 1], 2, last_cost=2.0) == [3]  # the head on the last
    costs = [5, 1, 1, 1, 1, 1]
    split = balance_stages(costs, 3)
    bounds = [0, *split, len(costs)]
    assert len(split) == 2 and max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) == 5  # the optimum
    assert balance_stages([1, 1], 3) in ([0, 1], [1, 2], [1, 1])  # more stages than blocks: some empty


@pytest.mark.parametrize("name", list(RESUME))
def test_resume_continues_exactly(results, name):
    full_l, full_v, full_w, step, res_l, res_v, res_w = results[0]["resume-" + name]
    assert step == 2
    assert res_l == full_l[2:]  # bit for bit
    assert res_v == full_v[1:]
    _assert_weights_equal(res_w, full_w)
    assert results[1]["resume-" + name][0] == full_l


def test_zero1_with_compression_equals_ddp_with_compression(results):
    # ZeRO partitions only the optimizer step; DDP's top-k hook (error feedback included)
    # sees the same gradients, so the runs agree (the AdamW step is elementwise: same numbers)
    zero, ddp = results[0]["resume-zero1-topk"], results[0]["resume-ddp-topk"]
    assert zero[0] == pytest.approx(ddp[0], rel=LOSS_REL)
    _assert_weights_close(zero[2], ddp[2])


def test_fsdp_checkpoint_reshards_two_ranks_to_one_and_back(results):
    ref_l, ref_w, back_step, back_l, back_w = results[0]["reshard"]
    one_step, one_l = results[0]["reshard-one"]
    assert one_step == 2 and back_step == 4
    assert any("resharded" in m for m in results[0]["reshard-warning"])
    assert one_l == pytest.approx(ref_l[2:4], rel=LOSS_REL)  # one process continued the 2-rank run
    assert back_l == pytest.approx(ref_l[4:], rel=LOSS_REL)  # and 2 ranks continued that
    _assert_weights_close(back_w, ref_w)


def test_zero1_and_pipeline_refuse_another_world_size(results):
    for name in ("zero1", "pipeline"):
        msg = results[0][f"world-{name}"]
        assert "2 process(es)" in msg and "has 1" in msg, msg


def test_bad_pipeline_settings_on_two_ranks(results):
    errors = results[0]["errors"]
    assert "pipeline_split" in errors["split"] and "[0, 2]" in errors["split"]
    assert "pipeline_split" in errors["split-len"]
    assert "1f1b" in errors["1f1b-micro"] and "micro-batches" in errors["1f1b-micro"]
    assert "tie_embeddings" in errors["tied"]


# --------------------------------------------------------------------------- refused combinations


def test_bad_combinations_name_both_options():
    with pytest.raises(ValueError, match=r"compression=.*topk.*strategy='pipeline'"):
        make_trainer(1, strategy="pipeline", compression="topk")
    with pytest.raises(ValueError, match=r"compression=.*powersgd.*strategy='fsdp'"):
        make_trainer(1, strategy="fsdp", compression="powersgd")
    with pytest.raises(ValueError, match=r"n_microbatches=2 applies to strategy='pipeline', not strategy='ddp'"):
        make_trainer(1, n_microbatches=2)
    with pytest.raises(ValueError, match=r"pipeline_split=\[1\] applies to strategy='pipeline', not strategy='fsdp'"):
        make_trainer(1, strategy="fsdp", pipeline_split=[1])
    with pytest.raises(ValueError, match=r"fsdp_cpu_offload=True applies to strategy='fsdp', not strategy='zero1'"):
        make_trainer(1, strategy="zero1", fsdp_cpu_offload=True)
    with pytest.raises(ValueError, match=r"fsdp_units='submodule' applies to strategy='fsdp', not strategy='ddp'"):
        make_trainer(1, fsdp_units="submodule")
    with pytest.raises(ValueError, match=r"fsdp_backward_prefetch=False applies to strategy='fsdp'"):
        make_trainer(1, strategy="pipeline", fsdp_backward_prefetch=False)
    with pytest.raises(ValueError, match=r"fsdp_units must be one of \('block', 'submodule'\), got 'layer'"):
        make_trainer(1, strategy="fsdp", fsdp_units="layer")
    with pytest.raises(ValueError, match="fsdp_backward_prefetch must be True or False"):
        make_trainer(1, strategy="fsdp", fsdp_backward_prefetch="no")
    with pytest.raises(ValueError, match=r"16-mixed.*strategy='fsdp'"):
        make_trainer(1, strategy="fsdp", precision="16-mixed")
    with pytest.raises(ValueError, match=r"loss_fn.*strategy='pipeline'|strategy='pipeline'.*loss_fn"):
        make_trainer(1, strategy="pipeline", loss_fn=lambda m, b: m(*b)[1])
    with pytest.raises(ValueError, match="strategy must be one of"):
        make_trainer(1, strategy="tp")
    with pytest.raises(ValueError, match="pipeline_schedule must be one of"):
        make_trainer(1, strategy="pipeline", pipeline_schedule="zb")
    with pytest.raises(ValueError, match="dist_timeout"):
        make_trainer(1, dist_timeout=0)


@pytest.mark.parametrize("strategy", ["fsdp", "zero1", "pipeline"])
def test_one_process_trains_as_plain_single_process(tmp_path, strategy):
    kw = dict(dropout=0.0, opt="sgd", lr=0.1, batch_size=8)
    plain = make_trainer(3, **kw)
    plain.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = make_trainer(3, strategy=strategy, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    t.fit()
    assert losses(t) == losses(plain)  # bit for bit: nothing was wrapped
    if strategy == "fsdp":  # DCP directories even alone, so any world size reads them
        assert [s for s, _ in list_dir_checkpoints(tmp_path, "dcp")] == [3, 2]
        resumed = make_trainer(3, strategy=strategy, checkpoint_dir=tmp_path, **kw)
        assert resumed.step == 3
    else:
        assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 2]


def test_fsdp_checkpoint_corrupt_or_incomplete_falls_back(tmp_path):
    kw = dict(dropout=0.0, opt="sgd", lr=0.1, batch_size=8, strategy="fsdp", checkpoint_every=2)
    ref = make_trainer(4, **kw)
    ref.fit()
    make_trainer(4, checkpoint_dir=tmp_path, **kw).fit()
    (step4, newest), (step2, older) = list_dir_checkpoints(tmp_path, "dcp")
    assert (step4, step2) == (4, 2)
    shard = next(
        os.path.join(newest, "dcp", n) for n in os.listdir(os.path.join(newest, "dcp")) if n.endswith(".distcp")
    )
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-00000004\.dcp.*corrupt.*SHA-256"):
        verify_dir_checkpoint(newest)
    with pytest.warns(UserWarning, match=r"step-00000004\.dcp.*corrupt.*resuming from .*step-00000002\.dcp"):
        resumed = make_trainer(4, model_seed=3, checkpoint_dir=tmp_path, **kw)
    assert resumed.step == 2
    resumed.fit()
    assert losses(resumed) == losses(ref)[2:]
    verify_dir_checkpoint(newest)  # rewritten whole by the resumed run
    os.unlink(os.path.join(newest, "manifest.json"))  # a write that did not finish
    with pytest.warns(UserWarning, match="incomplete"):
        assert make_trainer(4, checkpoint_dir=tmp_path, **kw).step == 2
    os.unlink(os.path.join(older, "trainer.ckpt"))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        make_trainer(4, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match="resume=False"):
        make_trainer(4, checkpoint_dir=tmp_path, resume=False, **kw)


def test_cli_strategy_flag(tmp_path, capsys):
    from accelops.cli import main

    from .test_train import _config

    config = _config(tmp_path, max_steps=4, checkpoint_every=2, eval_every=2)
    path = tmp_path / "run.json"
    import json

    path.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", str(path), "--strategy", "fsdp"]) == 0
    assert "step 4" in capsys.readouterr().err
    assert [s for s, _ in list_dir_checkpoints(tmp_path / "ckpt", "dcp")] == [4, 2]
    # a directory of fsdp checkpoints resumed under another strategy: refused, not started afresh over
    with pytest.raises(ValueError, match=r"strategy='fsdp'.*strategy='zero1'"):
        main(["train", str(path), "--strategy", "zero1", "--set", "train.max_steps=6"])


# --------------------------------------------------------------------------- a rank killed mid-step


def _kill_worker(rank, world, port, out_dir, strategy):
    _env(rank, world, port)
    res = {}
    try:
        kw = dict(strategy=strategy, checkpoint_every=2, dist_timeout=30, eval_every=None)
        if strategy == "pipeline":
            kw.update(pipeline_schedule="gpipe")
        t = make_trainer(10, checkpoint_dir=os.path.join(out_dir, "ckpt"), **kw)
        if rank == 1:

            def die(module, args, out):
                if t.step == 4:  # in the forward of step 5, after the checkpoint of step 4
                    os.kill(os.getpid(), signal.SIGKILL)

            t.model.norm.register_forward_hook(die)
        t0 = time.monotonic()
        try:
            t.fit()
            res["finished"] = True
        except RuntimeError as exc:
            res["error_msg"] = str(exc)
            res["seconds"] = time.monotonic() - t0
    except BaseException:
        res["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    os._exit(0)  # the broken process group's teardown must not hang the survivor


def _fork_ranks(worker, *args, nprocs=2, timeout_s=120):
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, nprocs, port, *args)) for r in range(nprocs)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    if alive:
        pytest.fail(f"{len(alive)} rank(s) still running after {timeout_s:g} s: the survivor hung")
    return [p.exitcode for p in procs]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "pipeline"])
def test_killed_rank_fails_the_survivor_clearly_and_keeps_the_checkpoint(tmp_path, strategy):
    codes = _fork_ranks(_kill_worker, str(tmp_path), strategy, timeout_s=120)
    assert codes[1] == -signal.SIGKILL
    with open(tmp_path / "rank0.pkl", "rb") as f:
        res = pickle.load(f)
    assert "error" not in res, res.get("error")
    msg = res.get("error_msg", "")
    print(f"{strategy}: survivor failed after {res.get('seconds', 0):.1f} s: {msg}")
    assert f"under strategy={strategy!r}" in msg and "during step 5" in msg, res
    assert "last checkpoint (step 4)" in msg and "intact" in msg
    ckpt = tmp_path / "ckpt"
    if strategy in ("fsdp", "pipeline"):
        kind = "dcp" if strategy == "fsdp" else "pp"
        (step, path), *_ = list_dir_checkpoints(ckpt, kind)
        assert step == 4
        manifest = verify_dir_checkpoint(path)  # every file whole, as its manifest says
        assert manifest["world_size"] == 2
    else:
        (step, path), *_ = list_checkpoints(ckpt)
        assert step == 4 and load_checkpoint(path)["step"] == 4


def test_cli_torchrun_two_ranks_fsdp(tmp_path):
    """`accelops train CONFIG --nproc-per-node 2 --strategy fsdp`: torchrun's agent starts the
    ranks, the flag reaches them, they write sharded DCP checkpoints of a 2-rank run."""
    import json
    import subprocess
    import sys

    from .test_train import ROOT, _config, _csv_losses

    config = _config(tmp_path, max_steps=4, checkpoint_every=2, eval_every=2)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "accelops.cli", "train", str(path), "--nproc-per-node", "2", "--strategy", "fsdp"],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, got = _csv_losses(tmp_path / "log")
    assert steps == [1, 2, 3, 4] and all(math.isfinite(x) for x in got)
    (step, newest), _ = list_dir_checkpoints(tmp_path / "ckpt", "dcp")
    manifest = verify_dir_checkpoint(newest)
    assert step == 4 and manifest["world_size"] == 2
    assert sum(n.endswith(".distcp") for n in manifest["files"]) == 2  # one shard file a rank
