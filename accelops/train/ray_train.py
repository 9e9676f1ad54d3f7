"""`accelops train CONFIG --launcher ray --num-workers N` and `ray_fit(config)`: the same
Trainer, run by Ray Train's TorchTrainer in N workers (Ray sets up the gloo / NCCL process
group; the Trainer sees it and wraps the model in DDP). Metrics and checkpoints go through
Ray: every `checkpoint_every` steps the workers evaluate, rank 0 writes the accelops
checkpoint and hands it to `ray.train.report`, so Ray keeps it in the run's storage; a run
started with `resume_from=` (a Ray checkpoint or its directory) continues from it exactly.

Ray is an optional extra: `pip install accelops[ray]` (ray[train]).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

__all__ = ["ray_fit", "require_ray"]

_CKPT_SUFFIX = ".ckpt"


def require_ray():
    """-> the ray module, or an ImportError that names the extra to install."""
    try:
        import ray
        import ray.train  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the Ray launcher needs Ray Train: pip install 'accelops[ray]' (or 'ray[train]'); import failed: {exc}"
        ) from None
    return ray


def _copy_checkpoints(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        if name.endswith(_CKPT_SUFFIX):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _worker_loop(loop_config: dict) -> None:
    """Runs in each Ray worker: the accelops Trainer in segments of checkpoint_every steps,
    each ending with an evaluation, a checkpoint and a report to Ray."""
    import ray.train

    from .checkpoint import list_checkpoints
    from .config import build

    config = copy.deepcopy(loop_config["config"])
    shared_dir = loop_config["checkpoint_dir"]  # one directory all workers see
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    resume = ray.train.get_checkpoint()  # set when Ray restarts this run (same name and storage)
    if resume is None and loop_config.get("resume_from"):
        resume = ray.train.Checkpoint.from_directory(loop_config["resume_from"])
    if resume is not None and rank == 0:
        # The accelops checkpoint Ray kept becomes the newest in the trainer's directory;
        # the Trainer picks it on rank 0 and tells the others (who read it after that).
        with resume.as_directory() as d:
            _copy_checkpoints(d, shared_dir)
    train_cfg = config.setdefault("train", {})
    train_cfg["checkpoint_dir"] = shared_dir
    train_cfg["resume"] = True
    trainer, _ = build(config)
    try:
        final = trainer.max_steps
        every = trainer.checkpoint_every or trainer.eval_every or final
        while trainer.step < final:
            trainer.max_steps = min(final, (trainer.step // every + 1) * every)
            result = trainer.fit()  # ends with an evaluation and a checkpoint
            stopped = trainer.stop_reason is not None  # early stopping: the run ends before `final`
            metrics = {
                "step": trainer.step,
                "loss": result["loss"],
                "val_loss": result["val_loss"],
                "resumed_from": trainer.resumed_from or "",
            }
            if trainer.is_main:
                newest = list_checkpoints(shared_dir)[0][1]
                with tempfile.TemporaryDirectory() as staging:
                    shutil.copy2(newest, os.path.join(staging, os.path.basename(newest)))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))
            else:
                ray.train.report(metrics)
            if stopped:
                break
    finally:
        trainer.close()


def ray_fit(
    config: dict,
    num_workers: int = 2,
    *,
    use_gpu: bool = False,
    storage_path=None,
    name=None,
    resume_from=None,
    cpus_per_worker: float = 1.0,
):
    """Trains `config` (the dict of an `accelops train` config file) in num_workers Ray Train
    workers -> ray.train.Result (metrics of the last report: step, loss, val_loss; its
    checkpoint holds the accelops checkpoint file). Starts a local Ray instance unless one is
    running or RAY_ADDRESS points at a cluster. resume_from: a ray.train.Checkpoint or the
    directory of one, e.g. an earlier result's `.checkpoint`."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if not isinstance(config, dict) or "data" not in config:
        raise ValueError("config must be the dict of an accelops train config (with a [data] section)")
    config = copy.deepcopy(config)
    train_cfg = config.setdefault("train", {})
    for key in ("checkpoint_dir", "resume"):
        if key in train_cfg:
            raise ValueError(
                f"train.{key} is managed by the Ray launcher (checkpoints live in Ray's storage; pass "
                "resume_from= to continue a run): remove it from the config"
            )
    data = config["data"]
    if "path" in data:  # workers may start in another directory
        data["path"] = os.path.abspath(data["path"])
    if train_cfg.get("log_dir"):
        train_cfg["log_dir"] = os.path.abspath(train_cfg["log_dir"])
    train_cfg.setdefault("progress", False)  # one bar per worker in Ray's log would be noise
    ray = require_ray()
    from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if isinstance(resume_from, Checkpoint):
        resume_from = resume_from.path  # Ray Train v2 resumes through the loop, not the trainer
    elif resume_from is not None:
        resume_from = os.path.abspath(os.fspath(resume_from))
        if not os.path.isdir(resume_from):
            raise FileNotFoundError(f"resume_from {resume_from!r} is not a checkpoint directory")

    storage_path = os.path.abspath(storage_path or os.path.join(os.getcwd(), "ray_results"))
    name = name or "accelops"
    checkpoint_dir = os.path.join(storage_path, name, "accelops_checkpoints")
    os.makedirs(checkpoint_dir, exist_ok=True)
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "checkpoint_dir": checkpoint_dir, "resume_from": resume_from},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.get("keep_last", 3)),
        ),
    )
    return trainer.fit()
