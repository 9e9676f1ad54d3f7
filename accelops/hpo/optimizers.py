"""Trial, the ask/tell base class, RandomSearch and GridSearch.

Ask/tell contract (shared by every optimiser, Hyperband and BOHB included):

- ``ask()`` returns a ``Trial`` to evaluate, or ``None`` when nothing can be started until
  results of running trials come back (or the optimiser is exhausted: a finished grid,
  Hyperband's ``n_brackets`` used up). ``ask()`` may be called while earlier trials are
  still running.
- ``tell(trial, loss)`` reports a result once. A loss that is NaN, +-inf or None is a
  failure and counts as the worst result (+inf), as in HpBandSter.
- Given the same seed and the same sequence of ask/tell calls, an optimiser makes the same
  choices: the Study's crash-safe resume replays a journal through these two calls.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .space import SearchSpace, as_rng

__all__ = ["Trial", "Optimizer", "RandomSearch", "GridSearch", "nice_budget"]


@dataclasses.dataclass
class Trial:
    """One evaluation to run: ``objective(config, budget)``.

    ``config_id`` names the configuration across rungs (a promoted configuration keeps it,
    so its checkpoint directory can be found again); ``bracket``/``rung`` place the trial in
    Hyperband's schedule (None for random and grid search); ``info`` holds notes such as
    ``model_based`` for BOHB.
    """

    id: int
    config: dict
    budget: float
    config_id: int
    bracket: int | None = None
    rung: int | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def nice_budget(b: float):
    """An int when the budget is integral (epochs, steps), else the float."""
    r = round(b)
    if abs(b - r) <= 1e-9 * max(1.0, abs(b)):
        return int(r)
    return float(b)


def as_loss(loss) -> float:
    """The loss the optimiser sees: failures (None, NaN, +-inf) are +inf."""
    if loss is None:
        return math.inf
    if isinstance(loss, bool) or not isinstance(loss, (int, float, np.integer, np.floating)):
        raise TypeError(f"loss must be a number or None, got {loss!r}")
    loss = float(loss)
    return loss if math.isfinite(loss) else math.inf


def _check_budget(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class Optimizer:
    """Base of the optimisers: trial bookkeeping for ask/tell."""

    def __init__(self, space: SearchSpace, seed=None):
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a hpo.SearchSpace, got {type(space).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.space = space
        self.seed = None if seed is None else int(seed)
        self.rng = as_rng(self.seed)
        self.trials: dict[int, Trial] = {}
        self.running: dict[int, Trial] = {}
        self.results: dict[int, float] = {}
        self._next_trial = 0
        self._next_config = 0

    # -- subclasses ------------------------------------------------------------------------
    def _ask(self) -> Trial | None:
        raise NotImplementedError

    def _tell(self, trial: Trial, loss: float) -> None:
        pass

    def _kwargs(self) -> dict:
        """Constructor arguments (besides space and seed), JSON-able, for the journal."""
        return {}

    # -- public ----------------------------------------------------------------------------
    def ask(self) -> Trial | None:
        trial = self._ask()
        if trial is not None:
            self.trials[trial.id] = trial
            self.running[trial.id] = trial
        return trial

    def tell(self, trial: Trial | int, loss) -> None:
        tid = trial if isinstance(trial, (int, np.integer)) else getattr(trial, "id", None)
        if tid not in self.trials:
            raise ValueError(f"tell: unknown trial {trial!r} (not returned by this optimiser's ask())")
        if tid not in self.running:
            raise ValueError(f"tell: trial {tid} was already told")
        loss = as_loss(loss)
        t = self.running.pop(tid)
        self.results[tid] = loss
        self._tell(t, loss)

    def spec(self) -> dict:
        """What the journal records to rebuild this optimiser on resume."""
        return {"class": type(self).__name__, "seed": self.seed, "kwargs": self._kwargs(), "space": self.space.spec()}

    @classmethod
    def from_spec(cls, spec: dict) -> "Optimizer":
        from . import _OPTIMIZERS

        kind = _OPTIMIZERS.get(spec["class"])
        if kind is None:
            raise ValueError(f"unknown optimiser class {spec['class']!r} in the journal")
        kwargs = dict(spec["kwargs"])
        if spec["class"] == "BOHB":
            # a journal from before an option existed ran without it (HpBandSter's behaviour);
            # the defaults now differ, so an old study resumes as it ran
            kwargs.setdefault("bandwidth_floor", 0.0)
            kwargs.setdefault("kde", "multivariate")
            kwargs.setdefault("random_placement", "every")
            kwargs.setdefault("bandwidth", "fixed")
        return kind(SearchSpace.from_spec(spec["space"]), seed=spec["seed"], **kwargs)

    def _new_trial(self, config: dict, budget, config_id=None, **fields) -> Trial:
        if config_id is None:
            config_id = self._next_config
            self._next_config += 1
        t = Trial(id=self._next_trial, config=config, budget=nice_budget(budget), config_id=config_id, **fields)
        self._next_trial += 1
        return t

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())
        return f"{type(self).__name__}(<space of {len(self.space)}>, {args}, seed={self.seed})"


class RandomSearch(Optimizer):
    """Configurations drawn from the prior, each evaluated once at ``budget``; never exhausted."""

    def __init__(self, space: SearchSpace, budget=1, seed=None):
        super().__init__(space, seed)
        _check_budget("budget", budget)
        self.budget = budget

    def _ask(self):
        return self._new_trial(self.space.sample(self.rng), self.budget)

    def _kwargs(self):
        return {"budget": self.budget}


class GridSearch(Optimizer):
    """Every point of ``space.grid(resolution)`` once at ``budget``, in grid order
    (``shuffle=True``: a seeded random order); ``ask()`` returns None when the grid is done."""

    def __init__(self, space: SearchSpace, budget=1, resolution: int | dict = 5, shuffle: bool = False, seed=None):
        super().__init__(space, seed)
        _check_budget("budget", budget)
        self.budget = budget
        self.resolution = dict(resolution) if isinstance(resolution, dict) else resolution
        self.shuffle = bool(shuffle)
        self._grid = list(space.grid(resolution))
        if self.shuffle:
            self.rng.shuffle(self._grid)
        self._pos = 0

    def __len__(self):
        return len(self._grid)

    def _ask(self):
        if self._pos >= len(self._grid):
            return None
        config = self._grid[self._pos]
        self._pos += 1
        return self._new_trial(dict(config), self.budget)

    def _kwargs(self):
        return {"budget": self.budget, "resolution": self.resolution, "shuffle": self.shuffle}
