"""The trainer as an accelops.hpo objective: budget = optimizer steps (or epochs), the
Study's per-configuration checkpoint directory resumes a promoted configuration where its
lower rung stopped, and the result is the validation loss.

    from accelops import hpo
    from accelops.train.hpo_objective import TrainObjective

    base = {"data": {"path": "corpus.txt", "seq_len": 128},
            "model": {"type": "transformer", "dim": 128, "n_layers": 4, "n_heads": 4},
            "optimizer": {"name": "adamw"}, "scheduler": {"name": "cosine", "warmup_steps": 50},
            "train": {"batch_size": 32, "eval_batches": 20}}
    space = hpo.SearchSpace({"optimizer.lr": hpo.Float(1e-4, 1e-2, log=True),
                             "optimizer.weight_decay": hpo.Float(1e-3, 0.3, log=True),
                             "model.dropout": hpo.Float(0.0, 0.3)})
    objective = TrainObjective(base, max_budget=2700)          # budgets are optimizer steps
    opt = hpo.BOHB(space, min_budget=100, max_budget=2700, eta=3, seed=0)
    best = hpo.Study(opt, journal="runs/hpo.jsonl").optimize(objective, n_workers=2, max_budget_total=100_000)

``base`` is an ``accelops train`` configuration (see accelops/train/config.py); a
hyperparameter named ``"section.key"`` sets that key of that section (the names
``--set section.key=value`` takes), so the search space can reach every model, optimizer,
scheduler and trainer setting. ``objective(config, budget, checkpoint_dir)``:

- builds the run with ``accelops.train.config.build`` from ``base`` with the configuration
  applied, ``checkpoint_dir`` as the trainer's checkpoint directory and ``resume=True``;
- trains up to ``budget`` optimizer steps (``unit="epochs"``: ``budget`` epochs of the
  training data, rounded to whole steps, at least one). A configuration promoted to a
  higher rung gets the same directory again, so the trainer resumes from the checkpoint
  of the lower rung and only runs the missing steps;
- returns ``{"loss": validation loss, "steps": steps reached, "steps_run": steps run by
  this call, "resumed_from_step": where it started, "train_loss": the last training
  loss}``; the Study keeps everything but "loss" as the trial's info.

The learning-rate schedule is laid out over ``max_budget`` (the study's largest budget)
for every rung, not over the rung's own budget: a run continued from a checkpoint then
follows exactly the schedule of a run trained to the higher budget in one go, and the
rungs compare configurations on the same schedule (a rung-0 loss is the loss part-way
through the full run). Without a scheduler section nothing changes with it.

The object holds plain data only, so it pickles to the Study's process workers.
``threads`` sets torch's thread count in the process that runs the trial (the workers of
``n_workers=2`` on a 2-core machine want 1 each). Without a checkpoint directory (called
as ``objective(config, budget)``), each call trains from scratch in a temporary directory.
"""

from __future__ import annotations

import copy
import os
import tempfile

__all__ = ["TrainObjective", "apply_hyperparameters"]

UNITS = ("steps", "epochs")


def apply_hyperparameters(base: dict, config: dict) -> dict:
    """A copy of ``base`` with each ``"section.key": value`` of ``config`` set."""
    from .config import SECTIONS, ConfigError

    out = copy.deepcopy(base)
    for name, value in config.items():
        section, sep, key = str(name).partition(".")
        if not sep or not key or section not in SECTIONS:
            raise ConfigError(f"hyperparameter {name!r} must be named 'section.key' with a section of {SECTIONS}")
        if hasattr(value, "item"):  # numpy scalars from a search space
            value = value.item()
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"[{section}] must be a table of settings to set {name!r}")
        out[section][key] = value
    return out


def _steps_per_epoch(cfg: dict) -> int:
    """Optimizer steps in one pass over the training windows (one process, as the trainer
    runs a trial): whole batches of batch_size, accumulate_grad_batches a step."""
    from .data import load_char_corpus

    data, train = cfg["data"], cfg.get("train", {})
    windows, _, _ = load_char_corpus(
        data["path"], data.get("seq_len", 128), data.get("val_fraction", 0.1), data.get("stride")
    )
    return max(1, len(windows) // train.get("batch_size", 32) // train.get("accumulate_grad_batches", 1))


class TrainObjective:
    """An accelops.hpo objective that trains with accelops.train (see the module doc).

    ``base``: an ``accelops train`` config dict. ``max_budget``: the study's largest
    budget (the schedule's horizon; also a cap: a larger budget is an error).
    ``unit``: "steps" or "epochs". ``threads``: torch threads for the trial (None: leave).
    ``keep_last``: checkpoints kept per configuration (the last one is all a promotion needs).
    """

    def __init__(self, base: dict, max_budget, unit: str = "steps", threads: int | None = None, keep_last: int = 1):
        if not isinstance(base, dict) or not isinstance(base.get("data"), dict) or "path" not in base["data"]:
            raise ValueError("base must be an accelops train config dict with [data] path = the text file")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if isinstance(max_budget, bool) or not isinstance(max_budget, (int, float)) or not max_budget > 0:
            raise ValueError(f"max_budget must be a positive number, got {max_budget!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        for key in ("max_steps", "checkpoint_dir", "resume"):
            if key in base.get("train", {}):
                raise ValueError(
                    f"base [train] must not set {key}: the objective sets it from the budget and the "
                    "Study's checkpoint directory"
                )
        self.base, self.max_budget, self.unit = copy.deepcopy(base), max_budget, unit
        self.threads, self.keep_last = threads, keep_last

    def steps_for(self, budget, steps_per_epoch: int = 1) -> int:
        per = 1 if self.unit == "steps" else steps_per_epoch
        return max(1, int(round(budget * per)))

    def __call__(self, config: dict, budget, checkpoint_dir=None) -> dict:
        if budget > self.max_budget * (1 + 1e-9):
            raise ValueError(f"budget {budget} is larger than max_budget={self.max_budget} (the schedule's horizon)")
        if checkpoint_dir is None:
            with tempfile.TemporaryDirectory(prefix="accelops-trial-") as tmp:
                return self._run(config, budget, tmp)
        return self._run(config, budget, os.fspath(checkpoint_dir))

    def _run(self, config, budget, checkpoint_dir) -> dict:
        import torch

        from .config import build

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        cfg = apply_hyperparameters(self.base, config)
        train = cfg.setdefault("train", {})
        train.setdefault("progress", False)
        train.setdefault("eval_every", None)  # one evaluation, at the end of the rung
        train.setdefault("keep_last", self.keep_last)
        train["checkpoint_dir"], train["resume"] = checkpoint_dir, True
        steps_per_epoch = _steps_per_epoch(cfg) if self.unit == "epochs" else 1
        # The schedule is laid out over the largest budget (see the module doc); the trainer
        # then stops at this rung's budget.
        train["max_steps"] = self.steps_for(self.max_budget, steps_per_epoch)
        trainer, _ = build(cfg)
        try:
            target = self.steps_for(budget, steps_per_epoch)
            start = trainer.step
            trainer.max_steps = max(target, start)
            result = trainer.fit()
            val = result["val_loss"]
            if val is None:  # the checkpoint was already at the target (a re-run trial): evaluate it
                val = trainer.evaluate()
            if val is None:
                raise ValueError("the objective needs validation data: the config's data gave none")
        finally:
            trainer.close()
        return {
            "loss": float(val),
            "steps": trainer.step,
            "steps_run": trainer.step - start,
            "resumed_from_step": start,
            "train_loss": result["loss"],
        }

    def __repr__(self):
        return f"TrainObjective(max_budget={self.max_budget}, unit={self.unit!r})"
