"""accelops.train: exact resume, accumulation, autocast, DDP on 2 gloo ranks (with and
without compression), a SIGKILLed run resuming, corrupt checkpoints, the CLI.

Models and data are tiny (a 2-block transformer of width 32 on a few hundred characters)
so the whole file runs in well under a minute on 2 cores."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch

from accelops.models import RNNLM, RNNLMConfig, TransformerLM, TransformerLMConfig
from accelops.sharing import share_parameters
from accelops.train import (
    CharVocab,
    CheckpointError,
    CheckpointWarning,
    TokenWindows,
    Trainer,
    list_checkpoints,
    load_char_corpus,
    load_checkpoint,
)
from accelops.train.checkpoint import prune_checkpoints, save_checkpoint

from .helpers import rank_results, run_forked_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "king", "and", "queen", "of", "a", "fair", "night", "to", "be", "or", "not", "my", "lord"]


def make_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


TEXT = make_text(600)
VOCAB = CharVocab.from_text(TEXT)
IDS = VOCAB.encode(TEXT)
SEQ = 16
# 540 training characters: 33 windows, 8 batches of 4 an epoch, so a few steps cross epochs.
TRAIN = TokenWindows(IDS[:540], SEQ)
VAL = TokenWindows(IDS[540:], SEQ, stride=4)


pytestmark = pytest.mark.one_thread


@pytest.fixture(scope="module")
def threads_at_module_setup():
    return torch.get_num_threads()


def test_one_thread_marker_covers_module_fixtures(threads_at_module_setup):
    # conftest's module-scoped autouse fixture runs before the module's own fixtures
    assert threads_at_module_setup == 1
    assert torch.get_num_threads() == 1


def tiny_model(seed=0, dropout=0.1, kind="transformer"):
    torch.manual_seed(seed)
    if kind == "gru":
        return RNNLM(
            RNNLMConfig(vocab_size=len(VOCAB), dim=24, hidden=32, n_layers=2, max_len=SEQ, cell="gru", dropout=dropout)
        )
    if kind == "bitlinear-shared":  # ternary training with the blocks shared ("alternate")
        model = TransformerLM(
            TransformerLMConfig(
                vocab_size=len(VOCAB), dim=32, n_layers=4, n_heads=2, max_len=SEQ, dropout=dropout, quant="bitlinear"
            )
        )
        share_parameters(model, "alternate", tie_embeddings=True)
        return model
    return TransformerLM(
        TransformerLMConfig(vocab_size=len(VOCAB), dim=32, n_layers=2, n_heads=2, max_len=SEQ, dropout=dropout)
    )


def make_trainer(steps, *, model_seed=0, dropout=0.1, kind="transformer", opt="adamw", lr=1e-2, schedule=True, **kw):
    model = tiny_model(model_seed, dropout, kind)
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3)) if schedule else None
    kw.setdefault("batch_size", 4)
    kw.setdefault("eval_every", None)
    kw.setdefault("log_every", 2)
    return Trainer(model, optimizer, TRAIN, VAL, max_steps=steps, scheduler=scheduler, progress=False, **kw)


def losses(trainer):
    return [row["loss"] for row in trainer.history]


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- data


def test_char_corpus_split_and_windows(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    train, val, vocab = load_char_corpus(path, seq_len=SEQ)
    assert vocab.chars == sorted(set(TEXT)) and vocab.decode(vocab.encode(TEXT)) == TEXT
    n_train = int(len(TEXT) * 0.9)
    assert train.tokens.numel() == n_train and val.tokens.numel() == len(TEXT) - n_train
    x, y = train[3]
    assert torch.equal(x[1:], y[:-1]) and vocab.decode(x) == TEXT[3 * SEQ : 4 * SEQ]
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_char_corpus(path, seq_len=200)
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_char_corpus(tmp_path / "missing.txt", seq_len=SEQ)


# --------------------------------------------------------------------------- resume parity


@pytest.mark.parametrize(
    "setting",
    [
        dict(kind="transformer", precision="32", accumulate_grad_batches=2, grad_clip=0.5),
        dict(kind="gru", precision="16-mixed"),
        dict(kind="bitlinear-shared", precision="32"),
    ],
    ids=["transformer-accumulate-clip", "gru-fp16", "bitlinear-shared"],
)
def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, setting):
    kw = dict(setting, eval_every=3, eval_batches=2, checkpoint_every=3)
    full = make_trainer(7, checkpoint_dir=tmp_path / "full", **kw)
    full.fit()
    first = make_trainer(3, checkpoint_dir=tmp_path / "cut", **kw)
    first.fit()
    assert losses(first) == losses(full)[:3]
    torch.manual_seed(123)  # the resumed process starts from other RNG states and other weights
    resumed = make_trainer(7, model_seed=1, checkpoint_dir=tmp_path / "cut", **kw)
    assert resumed.step == 3 and resumed.resumed_from.endswith("step-00000003.ckpt")
    resumed.fit()
    assert losses(resumed) == losses(full)[3:]  # bit for bit, float == float
    assert [e["val_loss"] for e in resumed.evals] == [e["val_loss"] for e in full.evals][1:]
    for k, v in params(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    if setting["precision"] == "16-mixed":
        assert resumed.scaler.get_scale() == full.scaler.get_scale()


# --------------------------------------------------------------------------- accumulation, precision


def test_accumulation_equals_large_batch():
    small = make_trainer(3, dropout=0.0, opt="sgd", lr=0.1, batch_size=4, accumulate_grad_batches=2)
    large = make_trainer(3, dropout=0.0, opt="sgd", lr=0.1, batch_size=8)
    small.fit()
    large.fit()
    assert losses(small) == pytest.approx(losses(large), rel=1e-5)
    for k, v in params(large.model).items():
        torch.testing.assert_close(small.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs():
    trainer = make_trainer(3, precision="bf16-mixed", eval_every=3, eval_batches=1)
    seen = []
    trainer.model.register_forward_hook(lambda m, args, out: seen.append(out[0].dtype))
    out = trainer.fit()
    assert torch.bfloat16 in seen  # the logits came out of bf16 autocast
    assert all(math.isfinite(x) for x in losses(trainer)) and math.isfinite(out["val_loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32
    assert trainer.scaler is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="precision"):
        make_trainer(1, precision="fp8")
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        make_trainer(1, accumulate_grad_batches=0)
    other = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not one of model.parameters"):
        Trainer(tiny_model(), other, TRAIN)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_trainer(1, batch_size=64)
    with pytest.warns(UserWarning, match="single process"):
        make_trainer(1, compression="topk")


# --------------------------------------------------------------------------- checkpoints


def test_corrupt_checkpoint_is_refused_and_previous_used(tmp_path):
    ref = make_trainer(4, checkpoint_dir=tmp_path / "ref", checkpoint_every=2)
    ref.fit()
    d = tmp_path / "run"
    make_trainer(4, checkpoint_dir=d, checkpoint_every=2).fit()
    assert [s for s, _ in list_checkpoints(d)] == [4, 2]
    newest = d / "step-00000004.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the payload
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-00000004\.ckpt.*corrupt.*SHA-256"):
        load_checkpoint(newest)
    with pytest.warns(CheckpointWarning, match=r"step-00000004\.ckpt.*corrupt.*resuming from .*step-00000002"):
        resumed = make_trainer(4, model_seed=5, checkpoint_dir=d, checkpoint_every=2)
    assert resumed.step == 2
    resumed.fit()
    assert losses(resumed) == losses(ref)[2:]
    load_checkpoint(newest)  # rewritten whole by the resumed run

    # a truncated file (a copy cut short, a full disk) is named as such
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"truncated: 1000 bytes with no b'ACCKPT02' trailer"):
        load_checkpoint(newest)
    # every checkpoint bad: refuse rather than silently start over
    (d / "step-00000002.ckpt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        make_trainer(4, checkpoint_dir=d)
    # a directory with checkpoints and resume=False: refused, not overwritten
    with pytest.raises(ValueError, match="resume=False"):
        make_trainer(4, checkpoint_dir=tmp_path / "ref", resume=False)


def test_checkpoint_files_are_atomic_and_pruned(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path / f"step-{step:08d}.ckpt", {"step": step})
    (tmp_path / "step-00000009.ckpt.tmp-999999").write_bytes(b"half a checkpoint")  # a crash mid-write
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 4, 3, 2, 1]  # the temp file is no checkpoint
    prune_checkpoints(tmp_path, keep=2)
    # checkpoints only: a temporary file may be another run's save in progress (the Trainer's
    # directory lock removes a dead run's, see test_train_faults.py)
    assert sorted(os.listdir(tmp_path)) == ["step-00000004.ckpt", "step-00000005.ckpt", "step-00000009.ckpt.tmp-999999"]
    assert load_checkpoint(tmp_path / "step-00000005.ckpt") == {"step": 5}
    (tmp_path / "other.bin").write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match="not an accelops checkpoint"):
        load_checkpoint(tmp_path / "other.bin")


# --------------------------------------------------------------------------- SIGKILL and the CLI


def _config(tmp_path, **train):
    text = tmp_path / "corpus.txt"
    text.write_text(make_text(3000, seed=1), encoding="utf-8")
    t = dict(
        max_steps=120,
        batch_size=4,
        eval_every=40,
        eval_batches=2,
        checkpoint_every=5,
        log_every=5,
        checkpoint_dir=str(tmp_path / "ckpt"),
        log_dir=str(tmp_path / "log"),
        progress=False,
    )
    t.update(train)
    return {
        "data": {"path": str(text), "seq_len": SEQ},
        "model": {"type": "transformer", "dim": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "scheduler": {"name": "cosine", "warmup_steps": 5},
        "train": t,
    }


def _csv_losses(log_dir):
    import csv

    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def test_sigkilled_run_resumes_from_last_checkpoint_and_finishes(tmp_path):
    from accelops.train.run import run

    config = _config(tmp_path)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelops.train", str(path)],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpt = tmp_path / "ckpt"
    deadline = time.monotonic() + 60
    try:
        while not list_checkpoints(ckpt):
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(ckpt)[0][0]
    assert killed_at < 120

    result = run(config)  # the same command again: resumes and finishes
    assert result["step"] == 120 and result["resumed_from"].endswith(f"step-{killed_at:08d}.ckpt")
    steps, got = _csv_losses(tmp_path / "log")
    assert steps == list(range(1, 121))  # rows past the checkpoint were dropped, then redone

    clean = _config(tmp_path, checkpoint_dir=str(tmp_path / "ckpt2"), log_dir=str(tmp_path / "log2"))
    run(clean)
    assert _csv_losses(tmp_path / "log2")[1] == got  # and exactly as if it had never been killed


def test_cli_trains_a_tiny_config_end_to_end(tmp_path, capsys):
    from accelops.cli import main

    config = _config(tmp_path, max_steps=6, checkpoint_every=3, eval_every=3)
    config["model"] = {"type": "rnn", "dim": 16, "hidden": 24, "n_layers": 2, "cell": "gru", "quant": "none"}
    t = config.pop("train")
    lines = [
        f'[data]\npath = "{config["data"]["path"]}"\nseq_len = {SEQ}\n',
        "[model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config["model"].items()),
        '[optimizer]\nname = "adamw"\nlr = 0.003\n',
        "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items()),
    ]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines))
    assert main(["train", str(path)]) == 0
    assert "step 6" in capsys.readouterr().err
    state = load_checkpoint(list_checkpoints(tmp_path / "ckpt")[0][1])
    assert state["step"] == 6 and state["metadata"]["vocab"] == "".join(sorted(set(make_text(3000, seed=1))))
    assert main(["train", str(path), "--set", "train.max_steps=8"]) == 0  # resumes to the new end
    steps, _ = _csv_losses(tmp_path / "log")
    assert steps == list(range(1, 9))
    with pytest.raises(ValueError, match="unknown key"):
        main(["train", str(path), "--set", "model.width=3"])


# --------------------------------------------------------------------------- DDP, 2 gloo ranks


def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)  # first: OpenMP pools do not survive the fork
    # torchrun's environment: the first Trainer initialises the process group from it
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    res = {}
    try:
        plain = make_trainer(3, dropout=0.0, opt="sgd", lr=0.1, batch_size=4)
        assert plain.distributed and plain.world_size == world and plain.rank == rank
        plain.fit()
        res["plain"] = (losses(plain), params(plain.model))
        ck = os.path.join(out_dir, "ckpt")
        comp = dict(compression={"name": "topk", "ratio": 0.05}, dropout=0.1, eval_every=2, eval_batches=1)
        full = make_trainer(4, **comp)
        full.fit()
        cut = make_trainer(2, checkpoint_dir=ck, **comp)
        cut.fit()
        resumed = make_trainer(4, model_seed=3, checkpoint_dir=ck, **comp)
        resumed_step = resumed.step
        resumed.fit()
        res["topk"] = (
            losses(full),
            params(full.model),
            full.hook_state.step,
            full.hook_state.bytes_total,
            resumed_step,
            losses(resumed),
            params(resumed.model),
            resumed.hook_state.step,
        )
        plain.close()
    except BaseException:
        res["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)


@pytest.fixture(scope="module")
def ddp_results():
    with tempfile.TemporaryDirectory() as d:
        run_forked_ranks(_ddp_worker, d)
        out = rank_results(d)
        return out


def test_ddp_two_ranks_equals_one_process_with_twice_the_batch(ddp_results):
    # DistributedSampler gives rank r every other sample of the same permutation, so the two
    # ranks' batches of 4 together are the single process's batch of 8, and DDP's averaged
    # gradient its gradient.
    single = make_trainer(3, dropout=0.0, opt="sgd", lr=0.1, batch_size=8)
    single.fit()
    (l0, p0), (l1, p1) = ddp_results[0]["plain"], ddp_results[1]["plain"]
    assert l0 == l1  # logged loss: the mean over ranks
    assert l0 == pytest.approx(losses(single), rel=1e-5)
    for k, v in params(single.model).items():
        assert torch.equal(p0[k], p1[k]), k
        torch.testing.assert_close(p0[k], v, rtol=1e-5, atol=1e-6)


def test_ddp_with_compression_stays_in_sync_and_resumes_exactly(ddp_results):
    r0, r1 = ddp_results[0]["topk"], ddp_results[1]["topk"]
    full_losses, full_params, hook_steps, hook_bytes, resumed_step, res_losses, res_params, res_hook = r0
    assert hook_steps == 4 and hook_bytes > 0  # the top-k hook did the all-reduces
    assert all(math.isfinite(x) for x in full_losses)
    for k in full_params:
        assert torch.equal(full_params[k], r1[1][k]), k  # ranks hold the same weights
    # resumed at step 2 with the hook's error-feedback residuals, RNG and data position:
    assert resumed_step == 2 and res_hook == 4
    assert res_losses == full_losses[2:]
    for k in full_params:
        assert torch.equal(res_params[k], full_params[k]), k


def test_torchrun_two_ranks_with_compression(tmp_path):
    config = _config(tmp_path, max_steps=6, checkpoint_every=3, eval_every=3, compression={"name": "powersgd"})
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "accelops.train",
            str(path),
        ],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, got = _csv_losses(tmp_path / "log")
    assert steps == list(range(1, 7)) and all(math.isfinite(x) for x in got)
    state = load_checkpoint(list_checkpoints(tmp_path / "ckpt")[0][1])
    assert state["step"] == 6 and state["world_size"] == 2
    hooks = [r["hook"] for r in state["rank_states"]]
    assert [h["hook"] for h in hooks] == ["powersgd", "powersgd"] and [h["rank"] for h in hooks] == [0, 1]
    assert all(h["step"] == 6 for h in hooks)


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_events_hold_the_csv_metrics(tmp_path):
    """With tensorboard installed (requirements-dev), the same scalars reach an event file
    as reach metrics.csv: train loss per logged step, val loss per evaluation."""
    pytest.importorskip("tensorboard", reason="tensorboard is optional; requirements-dev installs it")
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(4, log_dir=str(tmp_path), eval_every=2, eval_batches=1, log_every=1)
    trainer.fit()
    trainer.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    train_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    val_loss = {e.step: e.value for e in events.Scalars("val/val_loss")}
    csv_train = {int(r["step"]): float(r["loss"]) for r in rows if r["loss"]}
    csv_val = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    assert sorted(train_loss) == sorted(csv_train) == [1, 2, 3, 4]
    assert sorted(val_loss) == sorted(csv_val) == [2, 4]
    for step, value in csv_train.items():  # event files store float32
        assert train_loss[step] == pytest.approx(value, rel=1e-6)
    for step, value in csv_val.items():
        assert val_loss[step] == pytest.approx(value, rel=1e-6)
