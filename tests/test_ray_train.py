"""`accelops train --launcher ray` / accelops.train.ray_fit: the Trainer in Ray Train workers,
checkpoints through Ray, exact resume. Ray is an optional extra: without it the launcher
says which extra to install (tested always); the 2-worker runs need ray[train]."""

import argparse
import json
import sys
from pathlib import Path

import pytest

from accelops.train import ray_fit
from accelops.train.config import ConfigError
from accelops.train.ray_train import require_ray
from accelops.train.run import add_arguments, run_args


def config_for(tmp_path, steps):
    (tmp_path / "text.txt").write_text("First Citizen: before we proceed any further, hear me speak. " * 60)
    return {
        "data": {"path": str(tmp_path / "text.txt"), "seq_len": 16},
        "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
        "optimizer": {"lr": 1e-2},
        "train": {"max_steps": steps, "batch_size": 4, "eval_every": 2, "seed": 0},
    }


def test_missing_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"accelops\[ray\]"):
        require_ray()
    with pytest.raises(ImportError, match=r"accelops\[ray\]"):
        ray_fit(config_for(tmp_path, 2), 2)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config_for(tmp_path, 2)))
    args = add_arguments(argparse.ArgumentParser()).parse_args([str(path), "--launcher", "ray"])
    with pytest.raises(ImportError, match=r"accelops\[ray\]"):
        run_args(args, [str(path), "--launcher", "ray"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_workers"):
        ray_fit(config_for(tmp_path, 2), 0)
    cfg = config_for(tmp_path, 2)
    cfg["train"]["checkpoint_dir"] = str(tmp_path / "ck")
    with pytest.raises(ValueError, match="train.checkpoint_dir is managed by the Ray launcher"):
        ray_fit(cfg, 2)
    with pytest.raises(ValueError, match=r"\[data\] section"):
        ray_fit({"model": {}}, 2)
    args = add_arguments(argparse.ArgumentParser()).parse_args(["c.json", "--launcher", "ray", "--nnodes", "2"])
    with pytest.raises(ConfigError, match="--num-workers, not --nnodes"):
        run_args(args, [])


def test_two_ray_workers_report_checkpoints_and_resume_exactly(tmp_path, monkeypatch):
    pytest.importorskip("ray.train", reason="ray[train] is not installed (pip install 'accelops[ray]')")
    import ray

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    storage = tmp_path / "ray"
    try:
        whole = ray_fit(config_for(tmp_path, 6), 2, storage_path=storage, name="whole")
        first = ray_fit(config_for(tmp_path, 4), 2, storage_path=storage, name="first")
        assert first.metrics["step"] == 4 and first.checkpoint is not None
        with first.checkpoint.as_directory() as d:  # the accelops checkpoint, kept by Ray
            assert sorted(p.name for p in Path(d).iterdir()) == ["step-00000004.ckpt"]
        second = ray_fit(config_for(tmp_path, 6), 2, storage_path=storage, name="second", resume_from=first.checkpoint)
    finally:
        ray.shutdown()
    assert whole.metrics["step"] == second.metrics["step"] == 6
    assert second.metrics["resumed_from"].endswith("step-00000004.ckpt")
    # DDP over 2 gloo workers, resumed at step 4: the same losses as the run that never stopped
    assert second.metrics["loss"] == whole.metrics["loss"]
    assert second.metrics["val_loss"] == whole.metrics["val_loss"]
