"""`accelops train CONFIG` and `torchrun -m accelops.train CONFIG`: the command line that
trains a character-level TransformerLM or RNNLM on a text file, everything set by a JSON or
TOML file. The file's format, its checks and what it builds are accelops/train/config.py;
here are the command's flags (add_arguments), what it runs (run, run_lr_find, the Ray
launcher) and its entry points (run_args, main).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys

from .config import ConfigError, apply_overrides, build, load_config, lr_find_options, resolve_data_paths

__all__ = ["run", "run_lr_find", "main", "run_args", "add_arguments"]


def run(config: dict) -> dict:
    """Trains what `config` (the dict of a config file) describes and prints the result line
    -> Trainer.fit()'s result."""
    trainer, vocab = build(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    # Every rank reports (the losses are means over ranks, so the lines agree): a multi-node
    # run shows on each node that it trained the same model as the others.
    val = result["val_loss"]
    extra = "" if val is None else f", val loss {val:.4f} ({val / math.log(2):.4f} bits/char)"
    where = f" [rank {trainer.rank}/{trainer.world_size}]" if trainer.world_size > 1 else ""
    stop = "" if not result.get("stop_reason") else f"; {result['stop_reason']}"
    print(f"accelops train{where}: step {result['step']}, train loss {result['loss']}{extra}{stop}", file=sys.stderr)
    return result


def run_lr_find(config: dict):
    """`accelops train CONFIG --lr-find`: the learning-rate range test on the config's model,
    optimizer and training data, in this one process -> (LRFindResult, plot path or None).
    Prints the suggestion and writes lr_find.png and lr_find.json into [train] log_dir (the
    working directory without one). Nothing is trained or checkpointed."""
    from .lr_find import lr_find

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--lr-find runs on one process: run `accelops train CONFIG --lr-find` without torchrun")
    config = copy.deepcopy(config)
    options = lr_find_options(config)
    train_cfg = config.setdefault("train", {})
    log_dir = train_cfg.get("log_dir") or "."
    for key in ("checkpoint_dir", "mlflow", "early_stopping", "resume"):  # nothing is trained or saved
        train_cfg.pop(key, None)
    train_cfg["distributed"] = False
    trainer, _ = build(config)
    result = lr_find(
        trainer.model,
        trainer.optimizer,
        trainer.train_data,
        loss_fn=trainer.loss_fn,
        batch_size=trainer.batch_size,
        precision=trainer.precision,
        grad_clip=trainer.grad_clip,
        device=trainer.device,
        seed=trainer.seed,
        **options,
    )
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "lr_find.json"), "w") as f:
        json.dump(
            {
                "lrs": result.lrs,
                "losses": result.losses,
                "raw_losses": result.raw_losses,
                "suggestion": result.suggestion,
                "reason": result.reason,
                "stopped_early": result.stopped_early,
                "settings": result.settings,
            },
            f,
            indent=1,
        )
    plot = None
    try:
        plot = result.plot(os.path.join(log_dir, "lr_find.png"))
    except ImportError as exc:
        print(f"accelops train --lr-find: no plot: {exc}", file=sys.stderr)
    if result.suggestion is not None:
        print(
            f"accelops train --lr-find: suggested lr {result.suggestion:.3g} (steepest descent of the smoothed "
            f"loss over {len(result.lrs)} steps; set optimizer.lr); plot {plot}",
            file=sys.stderr,
        )
    else:
        print(f"accelops train --lr-find: no suggestion: {result.reason}; plot {plot}", file=sys.stderr)
    return result, plot


def _run_ray(args) -> int:
    from .ray_train import ray_fit, require_ray

    if args.nnodes is not None or args.nproc_per_node is not None:
        raise ConfigError(
            "--launcher ray places its workers itself: use --num-workers, not --nnodes / --nproc-per-node"
        )
    if args.num_workers < 1:
        raise ConfigError(f"--num-workers must be >= 1, got {args.num_workers}")
    require_ray()  # the message naming the extra, before the config is read
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = resolve_data_paths(apply_overrides(load_config(args.config), args.overrides), args.config)
    if getattr(args, "strategy", None) is not None:
        config.setdefault("train", {})["strategy"] = args.strategy
    if getattr(args, "mlflow", False) and not config.setdefault("train", {}).get("mlflow"):
        config["train"]["mlflow"] = True
    result = ray_fit(config, args.num_workers)
    m = result.metrics or {}
    print(
        f"accelops train [ray, {args.num_workers} workers]: step {m.get('step')}, train loss {m.get('loss')}, "
        f"val loss {m.get('val_loss')}; checkpoint {result.checkpoint}",
        file=sys.stderr,
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="a JSON or TOML file (see accelops/train/config.py)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.max_steps=100 (repeatable)",
    )
    parser.add_argument(
        "--strategy",
        default=None,
        choices=("ddp", "fsdp", "zero1", "pipeline"),
        help="parallelism strategy (sets train.strategy; see docs/training.md, 'Parallelism strategies')",
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="do not resume from checkpoint_dir (it must then hold no checkpoints)"
    )
    parser.add_argument(
        "--lr-find",
        action="store_true",
        help="run the learning-rate range test instead of training (one process): print the "
        "suggested lr, write lr_find.png / lr_find.json into log_dir ([lr_find] settings)",
    )
    parser.add_argument(
        "--mlflow",
        action="store_true",
        help="log params, metrics and the final checkpoint to MLflow (train.mlflow = true; needs "
        "pip install 'accelops[mlflow]')",
    )
    from .launch import add_arguments as add_launch_arguments

    add_launch_arguments(parser)
    return parser


def run_args(args, argv=None) -> int:
    """argv: the command line args were parsed from (needed to start workers when launch
    flags ask for several processes)."""
    from . import launch

    try:
        relaunch = launch.wanted(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if getattr(args, "lr_find", False) and (relaunch or getattr(args, "launcher", "torchrun") == "ray"):
        raise ConfigError(
            "--lr-find runs on one process: drop the launch flags (--nproc-per-node, --nnodes, --launcher ray)"
        )
    if getattr(args, "launcher", "torchrun") == "ray":
        return _run_ray(args)
    if relaunch:
        if argv is None:
            raise ConfigError(
                "launch flags (--nnodes / --nproc-per-node) need the command line: call run_args(args, argv)"
            )
        return launch.relaunch(args, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = resolve_data_paths(apply_overrides(load_config(args.config), args.overrides), args.config)
    if args.no_resume:
        config.setdefault("train", {})["resume"] = False
    if getattr(args, "strategy", None) is not None:
        config.setdefault("train", {})["strategy"] = args.strategy
    if getattr(args, "mlflow", False) and not config.setdefault("train", {}).get("mlflow"):
        config["train"]["mlflow"] = True
    if getattr(args, "lr_find", False):
        result, _ = run_lr_find(config)
        return 0 if result.suggestion is not None else 1
    run(config)
    return 0


def main(argv=None) -> int:
    """`python -m accelops.train` (what torchrun runs on every rank). Without argv (a program
    reading sys.argv) a user error prints one line on stderr and returns 2, as `accelops`
    does (see accelops.cli.run_reporting); with argv (Python callers, tests) it raises."""
    parser = add_arguments(
        argparse.ArgumentParser(prog="accelops train", description="train a character-level language model")
    )
    if argv is None:
        from ..cli import run_reporting

        argv = sys.argv[1:]
        return run_reporting("accelops train", "train", lambda: run_args(parser.parse_args(argv), argv))
    argv = list(argv)
    return run_args(parser.parse_args(argv), argv)
