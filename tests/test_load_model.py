"""accelops.train.load_model: a model trained by the real Trainer (accelops.train.config.build),
back from its checkpoint file, its run's checkpoint_dir, or the sharded directories of the
fsdp (DCP) and pipeline strategies, with its vocabulary; greedy next-token text through that
vocabulary; safe loading (weights_only, DCP metadata) and clear refusals of bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from accelops.models import TransformerLM, TransformerLMConfig
from accelops.train import (
    CharVocab,
    CheckpointError,
    CheckpointWarning,
    TokenWindows,
    Trainer,
    list_checkpoints,
    load_checkpoint,
    load_model,
)
from accelops.train.checkpoint import list_dir_checkpoints, save_checkpoint
from accelops.train.config import build
from accelops.train.parallel import full_model_state_dict

from .helpers import rank_results, run_forked_ranks

# Every character has one successor, so a few steps learn the cycle and greedy decoding
# must continue it exactly.
CYCLE = "quant bf16\n"
SEQ = 16


pytestmark = pytest.mark.one_thread


def _config(tmp_path, **train):
    tmp_path = Path(tmp_path)
    text = tmp_path / "cycle.txt"
    text.write_text(CYCLE * 120, encoding="utf-8")
    t = dict(
        max_steps=20,
        batch_size=8,
        eval_every=10,
        eval_batches=1,
        checkpoint_dir=str(tmp_path / "ckpt"),
        log_dir=str(tmp_path / "log"),
        progress=False,
    )
    t.update(train)
    return {
        "data": {"path": str(text), "seq_len": SEQ},
        "model": {"type": "transformer", "dim": 32, "n_layers": 2, "n_heads": 2},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "train": t,
    }


def _train(config):
    trainer, vocab = build(config)
    try:
        trainer.fit()
        weights = full_model_state_dict(trainer)
    finally:
        trainer.close()
    return trainer, vocab, weights


def greedy(model, vocab, prompt: str, n: int) -> str:
    """The n characters greedy decoding appends to prompt."""
    ids = vocab.encode(prompt)[None]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids[:, -model.config.max_len :])[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return vocab.decode(ids[0, len(prompt) :])


def _same_weights(model, weights):
    got = model.state_dict()
    assert sorted(got) == sorted(weights)
    for k, v in weights.items():
        assert torch.equal(got[k], v.to(got[k].device)), k


def test_round_trip_from_a_run_directory_and_greedy_text(tmp_path):
    trainer, vocab, weights = _train(_config(tmp_path))
    model, loaded_vocab = load_model(tmp_path / "ckpt")  # the run's checkpoint_dir: the newest
    assert isinstance(model, TransformerLM) and not model.training
    assert next(model.parameters()).device == torch.device("cpu")
    assert isinstance(loaded_vocab, CharVocab) and loaded_vocab.chars == vocab.chars
    _same_weights(model, weights)
    # the text the trained model writes, through the vocabulary that came back with it
    assert greedy(model, loaded_vocab, "qua", 2 * len(CYCLE)) == (CYCLE * 3)[3 : 3 + 2 * len(CYCLE)]
    assert loaded_vocab.decode(loaded_vocab.encode(CYCLE)) == CYCLE
    trainer.model.eval()
    ids = vocab.encode(CYCLE)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), trainer.model(ids))
    # one file, and device=
    path = list_checkpoints(tmp_path / "ckpt")[0][1]
    again, _ = load_model(path, device="cpu")
    _same_weights(again, weights)


def test_directory_skips_a_corrupt_newest_checkpoint(tmp_path):
    _train(_config(tmp_path))
    (newest, path), (older, older_path) = list_checkpoints(tmp_path / "ckpt")[:2]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # inside the archive: the trailer still reads, the SHA-256 does not match
    open(path, "wb").write(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"step-00000020\.ckpt.*SHA-256.*step-00000010\.ckpt"):
        model, _ = load_model(tmp_path / "ckpt")
    _same_weights(model, load_checkpoint(older_path)["model"])
    with pytest.raises(CheckpointError, match=r"step-00000020\.ckpt.*corrupt: its SHA-256"):
        load_model(path)
    open(older_path, "ab").write(b"x")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in '.*ckpt': .*step-00000020.*step-00000010"):
        load_model(tmp_path / "ckpt")


class _Marker:
    """Unpickling it would create a file: the proof that a loader ran pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def _touch(path):
    open(path, "w").close()
    return {}


def test_refuses_missing_foreign_corrupt_and_non_accelops_train_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nowhere\.ckpt' does not exist"):
        load_model(tmp_path / "nowhere.ckpt")
    foreign = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)  # a plain torch file
    with pytest.raises(CheckpointError, match=r"model\.pt' is not an accelops checkpoint"):
        load_model(foreign)
    short = tmp_path / "short.ckpt"
    short.write_bytes(b"ACCKPT01")
    with pytest.raises(CheckpointError, match=r"short\.ckpt' is truncated"):
        load_model(short)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty' holds no checkpoints"):
        load_model(tmp_path / "empty")
    # a checksummed file whose payload would run code when unpickled: weights_only refuses it
    marker = tmp_path / "ran"
    evil = save_checkpoint(tmp_path / "evil.ckpt", {"format": 1, "model": _Marker(str(marker))})
    with pytest.raises(CheckpointError, match=r"evil\.ckpt' passed its checksum but torch\.load failed"):
        load_model(evil)
    assert not marker.exists()
    # a Trainer checkpoint written outside `accelops train`: no config or vocabulary to rebuild from
    vocab = CharVocab.from_text(CYCLE)
    ids = vocab.encode(CYCLE * 10)
    model = TransformerLM(TransformerLMConfig(vocab_size=len(vocab), dim=16, n_layers=1, n_heads=2, max_len=SEQ))
    t = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        TokenWindows(ids, SEQ),
        max_steps=1,
        batch_size=2,
        eval_every=None,
        checkpoint_dir=tmp_path / "plain",
        progress=False,
    )
    t.fit()
    with pytest.raises(CheckpointError, match=r"step-00000001\.ckpt' has no config and vocabulary.*load_checkpoint"):
        load_model(tmp_path / "plain")


def test_fsdp_dcp_directory_in_one_process(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, vocab, weights = _train(_config(tmp_path, strategy="fsdp", max_steps=4, eval_every=2))
    dirs = list_dir_checkpoints(tmp_path / "ckpt", "dcp")
    assert [s for s, _ in dirs] == [4, 2]
    renamed = tmp_path / "final"  # known by its manifest, not its name
    for where in (tmp_path / "ckpt", dirs[0][1], renamed):  # the run's directory, or the checkpoint
        if where == renamed:
            os.rename(dirs[0][1], renamed)
        model, loaded_vocab = load_model(where)
        _same_weights(model, weights)
        assert loaded_vocab.chars == vocab.chars


def test_dcp_metadata_is_not_unpickled_blindly(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(_config(tmp_path, strategy="fsdp", max_steps=2, eval_every=2))
    ((_, ckpt),) = list_dir_checkpoints(tmp_path / "ckpt", "dcp")
    marker = tmp_path / "ran"
    meta = os.path.join(ckpt, "dcp", ".metadata")
    with open(meta, "wb") as f:
        pickle.dump(_Marker(str(marker)), f)
    # ... and the manifest rewritten to match, so the checksums cannot be what stops it
    manifest_path = os.path.join(ckpt, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["files"][os.path.join("dcp", ".metadata")] = [
        os.path.getsize(meta),
        hashlib.sha256(open(meta, "rb").read()).hexdigest(),
    ]
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(CheckpointError, match=r"DCP metadata .*\.metadata' is refused: .*_touch is not part of"):
        load_model(ckpt)
    assert not marker.exists()


def _sharded_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)  # first: OpenMP pools do not survive the fork
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    res = {}
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        for name, kw in (
            ("fsdp", dict(strategy="fsdp")),
            ("pipeline", dict(strategy="pipeline", pipeline_split=[1], accumulate_grad_batches=2)),
        ):
            d = os.path.join(out_dir, name)
            os.makedirs(d, exist_ok=True)
            config = _config(d, max_steps=2, eval_every=2, batch_size=4, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer, _ = build(config)
                trainer.fit()
                res[name] = full_model_state_dict(trainer)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        res["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)


def test_sharded_checkpoints_of_two_ranks_load_in_one_process(tmp_path):
    run_forked_ranks(_sharded_worker, str(tmp_path), timeout_s=180)
    res = rank_results(tmp_path)[0]
    for name, kind in (("fsdp", "dcp"), ("pipeline", "pp")):
        dirs = list_dir_checkpoints(tmp_path / name / "ckpt", kind)
        assert [s for s, _ in dirs] == [2], name
        model, vocab = load_model(tmp_path / name / "ckpt")
        _same_weights(model, res[name])
        assert vocab.chars == sorted(set(CYCLE))
    with pytest.raises(CheckpointError, match=r"stage-0\.ckpt' is one stage of a pipeline checkpoint"):
        load_model(os.path.join(list_dir_checkpoints(tmp_path / "pipeline" / "ckpt", "pp")[0][1], "stage-0.ckpt"))
