"""accelops.train.hpo_objective.TrainObjective: the trainer as an accelops.hpo objective. A tiny
transformer on a few hundred characters, Hyperband with two rungs: the promoted
configuration resumes from its checkpoint (fewer steps run than the budgets add up to)
and ends where one uninterrupted run to the top budget ends."""

from __future__ import annotations

import math
import pickle
import random

import pytest

from accelops import hpo
from accelops.train import load_char_corpus
from accelops.train.config import ConfigError
from accelops.train.hpo_objective import TrainObjective, apply_hyperparameters

WORDS = ["the", "king", "and", "queen", "of", "a", "fair", "night", "to", "be", "or", "not", "my", "lord"]


pytestmark = pytest.mark.one_thread


def base_config(tmp_path):
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(200))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return {
        "data": {"path": str(path), "seq_len": 16},
        "model": {"type": "transformer", "dim": 16, "n_layers": 1, "n_heads": 2},
        "optimizer": {"name": "adamw"},
        "scheduler": {"name": "cosine", "warmup_steps": 2},
        "train": {"batch_size": 4, "eval_batches": 2, "log_every": 1},
    }


SPACE = hpo.SearchSpace({"optimizer.lr": hpo.Float(1e-3, 3e-2, log=True), "model.dropout": hpo.Float(0.0, 0.2)})


def test_hyperband_promotion_resumes_from_the_checkpoint(tmp_path):
    objective = TrainObjective(base_config(tmp_path), max_budget=9, threads=1)
    opt = hpo.Hyperband(SPACE, min_budget=3, max_budget=9, eta=3, n_brackets=1, seed=0)
    assert [p.sizes for p in opt.plans[:1]] == [(3, 1)]  # one bracket, rungs of 3 and 1
    study = hpo.Study(opt, journal=tmp_path / "study.jsonl")
    best = study.optimize(objective)
    assert len(study.results) == 4 and not study.failures
    for r in study.results:
        assert math.isfinite(r.loss) and r.info["steps"] == r.budget
    low = [r for r in study.results if r.budget == 3]
    top = [r for r in study.results if r.budget == 9]
    assert len(low) == 3 and len(top) == 1 and best is top[0]
    promoted = top[0]
    assert promoted.trial.config_id == min(low, key=lambda r: r.loss).trial.config_id
    assert promoted.info["resumed_from_step"] == 3 and promoted.info["steps_run"] == 6
    steps_run = sum(r.info["steps_run"] for r in study.results)
    assert steps_run == 15 < sum(r.budget for r in study.results) == 18

    # The resumed run ends exactly where one run of 9 steps from scratch ends: the schedule
    # spans the largest budget at every rung, and the trainer resumes exactly.
    again = objective(promoted.config, 9, str(tmp_path / "fresh"))
    assert again["resumed_from_step"] == 0 and again["steps_run"] == 9
    assert again["loss"] == pytest.approx(promoted.loss, rel=1e-6, abs=1e-7)

    # A trial re-run at a budget its checkpoint already reached (a resumed study re-queues
    # a trial that finished training but not its journal line) trains no further.
    rerun = objective(promoted.config, 9, str(tmp_path / "fresh"))
    assert rerun["steps_run"] == 0 and rerun["loss"] == pytest.approx(again["loss"], rel=1e-6)


def test_objective_pickles_and_epochs_are_whole_passes(tmp_path):
    objective = TrainObjective(base_config(tmp_path), max_budget=2, unit="epochs", threads=1)
    clone = pickle.loads(pickle.dumps(objective))  # what the process executor sends its workers
    windows, _, _ = load_char_corpus(tmp_path / "corpus.txt", 16)
    per_epoch = len(windows) // 4  # whole batches of 4 windows
    assert per_epoch > 5
    out = clone({"optimizer.lr": 0.01}, 1)  # no checkpoint directory: a temporary one
    assert out["steps"] == out["steps_run"] == per_epoch and math.isfinite(out["loss"])
    assert clone({"optimizer.lr": 0.01}, 0.5)["steps"] == round(per_epoch / 2)
    with pytest.raises(ValueError, match="larger than max_budget"):
        clone({"optimizer.lr": 0.01}, 3)


def test_bad_arguments(tmp_path):
    base = base_config(tmp_path)
    assert apply_hyperparameters(base, {"model.dim": 8})["model"]["dim"] == 8
    assert base["model"]["dim"] == 16  # the base is not changed
    with pytest.raises(ConfigError, match="section.key"):
        apply_hyperparameters(base, {"lr": 0.1})
    with pytest.raises(ConfigError, match="section.key"):
        apply_hyperparameters(base, {"optim.lr": 0.1})
    with pytest.raises(ValueError, match="max_steps"):
        TrainObjective({**base, "train": {"max_steps": 5}}, max_budget=9)
    with pytest.raises(ValueError, match="unit"):
        TrainObjective(base, max_budget=9, unit="tokens")
    with pytest.raises(ValueError, match="data"):
        TrainObjective({"model": {}}, max_budget=9)
