"""Hyperband: brackets of successive halving, run asynchronously as HpBandSter does.

Bracket arithmetic (R = max_budget / min_budget, s_max = floor(log_eta R)):

- paper (Li et al. 2018, Algorithm 1): bracket s starts n = ceil((s_max + 1) / (s + 1) * eta^s)
  configurations; rung i keeps floor(n * eta^-i).
- ``hpbandster_compat=True`` (HpBandSter's HyperBand.get_next_iteration): n0 =
  floor((s_max + 1) / (s + 1)) * eta^s; rung i keeps max(int(n0 * eta^-i), 1). For budgets
  1..81 and eta=3 the first rungs are 81, 27, 9, 6, 5 (paper: 81, 34, 15, 8, 5).

Rung i of bracket s runs at max_budget * eta^(i - s); brackets cycle s = s_max, ..., 0.

Asynchronous schedule: ``ask()`` returns the next run of the oldest bracket that has one
(rung-0 configurations are sampled lazily, one per ask, so BOHB's model is always the
latest); a rung whose results are not all back is waiting, and then ``ask()`` opens the
next bracket, as HpBandSter's Master does. When a rung is complete its best
``sizes[i + 1]`` configurations (failures are +inf, ties by start order) are promoted,
best first. ``ask()`` returns None only when ``n_brackets`` brackets were opened and none
has a run ready.
"""

from __future__ import annotations

import dataclasses
import math

from .optimizers import Optimizer, Trial, _check_budget, nice_budget
from .space import SearchSpace

__all__ = ["Hyperband", "BracketPlan", "hyperband_brackets"]

_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class BracketPlan:
    s: int
    sizes: tuple  # configurations per rung
    budgets: tuple  # budget of each rung


def _s_max(min_budget, max_budget, eta) -> int:
    return int(math.floor(math.log(max_budget / min_budget) / math.log(eta) + _EPS))


def hyperband_brackets(min_budget, max_budget, eta=3, hpbandster_compat: bool = False) -> list[BracketPlan]:
    """The brackets of one Hyperband iteration, in the order they run (s = s_max .. 0)."""
    _check_budget("min_budget", min_budget)
    _check_budget("max_budget", max_budget)
    if min_budget > max_budget:
        raise ValueError(f"min_budget={min_budget!r} must be <= max_budget={max_budget!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 1 or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number > 1, got {eta!r}")
    s_max = _s_max(min_budget, max_budget, eta)
    plans = []
    for s in range(s_max, -1, -1):
        if hpbandster_compat:
            n0 = int(math.floor((s_max + 1) / (s + 1)) * eta**s + _EPS)
            sizes = [max(int(n0 * eta ** (-i) + _EPS), 1) for i in range(s + 1)]
        else:
            n = int(math.ceil((s_max + 1) / (s + 1) * eta**s - _EPS))
            sizes = [int(math.floor(n * eta ** (-i) + _EPS)) for i in range(s + 1)]
        budgets = [nice_budget(max_budget * eta ** (i - s)) for i in range(s + 1)]
        plans.append(BracketPlan(s=s, sizes=tuple(sizes), budgets=tuple(budgets)))
    return plans


class _Bracket:
    """Run-time state of one successive-halving bracket."""

    def __init__(self, index: int, plan: BracketPlan):
        self.index, self.plan = index, plan
        self.rung = 0
        self.n_started = 0  # trials started in the current rung
        self.queue: list[int] = []  # promoted config ids waiting for the current rung
        self.running: set[int] = set()  # trial ids of the current rung not yet told
        self.losses: dict[int, float] = {}  # config id -> loss in the current rung
        self.order: list[int] = []  # config ids of the current rung in start order
        self.configs: dict[int, tuple] = {}  # config id -> (config, info)
        self.done = False

    def has_next(self) -> bool:
        if self.done:
            return False
        if self.rung == 0:
            return self.n_started < self.plan.sizes[0]
        return bool(self.queue)

    def record(self, trial: Trial, loss: float) -> None:
        self.running.discard(trial.id)
        self.losses[trial.config_id] = loss
        size = self.plan.sizes[self.rung]
        if self.running or len(self.losses) < size:
            return
        if self.rung == len(self.plan.sizes) - 1:
            self.done = True
            return
        pos = {c: i for i, c in enumerate(self.order)}
        ranked = sorted(self.order, key=lambda c: (self.losses[c], pos[c]))
        self.rung += 1
        self.queue = ranked[: self.plan.sizes[self.rung]]
        self.n_started, self.losses, self.order = 0, {}, []


class Hyperband(Optimizer):
    """Hyperband over ``space`` with budgets in [min_budget, max_budget] (see module doc).

    ``n_brackets`` limits how many brackets are opened (None: cycle forever, the Study's
    ``max_budget_total`` / ``n_trials`` end the run).
    """

    def __init__(
        self,
        space: SearchSpace,
        min_budget,
        max_budget,
        eta=3,
        hpbandster_compat: bool = False,
        n_brackets: int | None = None,
        seed=None,
    ):
        super().__init__(space, seed)
        self.min_budget, self.max_budget, self.eta = min_budget, max_budget, eta
        self.hpbandster_compat = bool(hpbandster_compat)
        if n_brackets is not None and (
            isinstance(n_brackets, bool) or not isinstance(n_brackets, int) or n_brackets < 1
        ):
            raise ValueError(f"n_brackets must be a positive int or None, got {n_brackets!r}")
        self.n_brackets = n_brackets
        self.plans = hyperband_brackets(min_budget, max_budget, eta, hpbandster_compat)
        self.budgets = self.plans[0].budgets  # every rung budget, smallest first
        self.brackets: list[_Bracket] = []
        self._active: list[_Bracket] = []

    def _kwargs(self):
        return {
            "min_budget": self.min_budget,
            "max_budget": self.max_budget,
            "eta": self.eta,
            "hpbandster_compat": self.hpbandster_compat,
            "n_brackets": self.n_brackets,
        }

    # BOHB overrides this with its model-based sampler.
    def _sample_config(self, budget) -> tuple[dict, dict]:
        return self.space.sample(self.rng), {}

    def _ask(self):
        for b in self._active:
            if b.has_next():
                return self._start(b)
        if self.n_brackets is None or len(self.brackets) < self.n_brackets:
            b = _Bracket(len(self.brackets), self.plans[len(self.brackets) % len(self.plans)])
            self.brackets.append(b)
            self._active.append(b)
            return self._start(b)
        return None

    def _start(self, b: _Bracket) -> Trial:
        budget = b.plan.budgets[b.rung]
        if b.rung == 0:
            config, info = self._sample_config(budget)
            trial = self._new_trial(config, budget, bracket=b.index, rung=0, info=dict(info))
            b.configs[trial.config_id] = (config, info)
        else:
            cid = b.queue.pop(0)
            config, _ = b.configs[cid]
            trial = self._new_trial(dict(config), budget, config_id=cid, bracket=b.index, rung=b.rung)
        b.n_started += 1
        b.order.append(trial.config_id)
        b.running.add(trial.id)
        return trial

    def _tell(self, trial: Trial, loss: float) -> None:
        b = self.brackets[trial.bracket]
        b.record(trial, loss)
        if b.done:
            self._active.remove(b)
