"""Benchmark problems of bench_hpo.py: multi-fidelity Branin and Hartmann-6 (known optima)
and a small MLP on scikit-learn's digits with epochs as the budget.

A problem's parameters are described once (``PARAMS``) and turned into an accelops
SearchSpace, a ConfigSpace space (HpBandSter) or Optuna ``suggest_*`` calls, so every
optimiser searches the same space with the same scales.

Multi-fidelity synthetic functions. The fidelity of a budget b in [b_min, b_max] is its
position on a log scale, z = log(b / b_min) / log(b_max / b_min) in [0, 1] (the rungs of
Hyperband with eta = 3 and budgets 1..27 are z = 0, 1/3, 2/3, 1). An observation at
budget b is

    f(x, z) + noise,   noise ~ N(0, (sigma0 * sqrt(b_min / b))^2),

a biased version of the function whose bias vanishes at z = 1 (the multi-fidelity
Branin and Hartmann-6 of Kandasamy et al., "Multi-fidelity Bayesian optimisation with
continuous approximations", ICML 2017, with their parameters moved by (1 - z)), plus noise
whose standard deviation shrinks like that of a mean over b samples (BOHB paper style: a
small budget is a cheap, biased, noisy look at the full-budget objective). Regret is
measured on the noise-free full-fidelity function f(x, 1) against its known minimum.

- Branin, x1 in [-5, 10], x2 in [0, 15]: a (x2 - b(z) x1^2 + c(z) x1 - r)^2
  + s (1 - t(z)) cos(x1) + s with a = 1, r = 6, s = 10, b(z) = 5.1 / (4 pi^2) - 0.01 (1 - z),
  c(z) = 5 / pi - 0.1 (1 - z), t(z) = 1 / (8 pi) + 0.05 (1 - z); minimum 0.397887 (three
  minimisers). sigma0 = 1.0 (0.19 at b_max = 27).
- Hartmann-6, x in [0, 1]^6: -sum_i alpha_i(z) exp(-sum_j A_ij (x_j - P_ij)^2) with the
  usual A, P, alpha = (1.0, 1.2, 3.0, 3.2) and alpha_i(z) = alpha_i - 0.1 (1 - z); minimum
  -3.32237. sigma0 = 0.05 (0.0096 at b_max = 27).

Digits MLP: one hidden layer, SGD with momentum and L2 weight decay, softmax
cross-entropy, in numpy (float64, one BLAS thread) on scikit-learn's bundled digits
(1797 8x8 images; fixed split 1000 train / 397 validation / 400 test, pixels / 16). The
budget is epochs; the loss is the validation cross-entropy after that many epochs (capped
at 10, diverged runs score 10). Initialisation and batch order are seeded by a fixed seed,
so the loss is a deterministic function of (configuration, epochs) and training to b
epochs is a prefix of training to any larger budget (Optuna's trials and the full-budget
re-evaluations continue one run). Its minimum is not known: regret is measured against
the best validation loss at the full budget that any optimiser found in the same run of
the benchmark (stated in the summary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class P:
    """One parameter: kind "float" | "int" | "cat"."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: tuple = ()


def accelops_space(params):
    from accelops import hpo

    out = {}
    for p in params:
        if p.kind == "float":
            out[p.name] = hpo.Float(p.low, p.high, log=p.log)
        elif p.kind == "int":
            out[p.name] = hpo.Int(int(p.low), int(p.high), log=p.log)
        else:
            out[p.name] = hpo.Categorical(list(p.choices))
    return hpo.SearchSpace(out)


def configspace_space(params, seed):
    import ConfigSpace as CS

    cs = CS.ConfigurationSpace(seed=seed)
    for p in params:
        if p.kind == "float":
            cs.add(CS.UniformFloatHyperparameter(p.name, lower=p.low, upper=p.high, log=p.log))
        elif p.kind == "int":
            cs.add(CS.UniformIntegerHyperparameter(p.name, lower=int(p.low), upper=int(p.high), log=p.log))
        else:
            cs.add(CS.CategoricalHyperparameter(p.name, list(p.choices)))
    return cs


def optuna_distributions(params):
    import optuna.distributions as D

    out = {}
    for p in params:
        if p.kind == "float":
            out[p.name] = D.FloatDistribution(p.low, p.high, log=p.log)
        elif p.kind == "int":
            out[p.name] = D.IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            out[p.name] = D.CategoricalDistribution(list(p.choices))
    return out


def optuna_suggest(trial, params) -> dict:
    out = {}
    for p in params:
        if p.kind == "float":
            out[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        elif p.kind == "int":
            out[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            out[p.name] = trial.suggest_categorical(p.name, list(p.choices))
    return out


def plain(config: dict) -> dict:
    """numpy scalars (ConfigSpace's values) -> Python ones."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}


def config_key(config: dict) -> tuple:
    return tuple(sorted(plain(config).items()))


# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    name: str
    params: list
    min_budget: float
    max_budget: float
    eta: int
    total_budget: float  # per optimiser run, in budget units
    optimum: float | None  # None: the best full-budget loss found (empirical)
    description: str = ""
    unit: str = "budget units"
    cache: dict = field(default_factory=dict)

    def fidelity(self, budget) -> float:
        if self.max_budget == self.min_budget:
            return 1.0
        return math.log(budget / self.min_budget) / math.log(self.max_budget / self.min_budget)

    def start(self, config):
        """A run of one configuration: ``.loss(budget, rng)`` observed at increasing budgets."""
        return _SyntheticRun(self, config)

    def evaluate(self, config, budget, rng) -> float:
        return self.start(config).loss(budget, rng)

    def true_value(self, config) -> float:
        """Noise-free value at the full budget (cached)."""
        key = config_key(config)
        if key not in self.cache:
            self.cache[key] = self._true(plain(config))
        return self.cache[key]


class Synthetic(Problem):
    def __init__(self, name, params, fn, optimum, sigma0, max_budget, total_budget, description):
        super().__init__(name, params, 1, max_budget, 3, total_budget, optimum, description)
        self.fn, self.sigma0 = fn, sigma0

    def observe(self, config, budget, rng) -> float:
        z = self.fidelity(budget)
        noise = self.sigma0 * math.sqrt(self.min_budget / budget) * rng.standard_normal()
        return float(self.fn(plain(config), z) + noise)

    def _true(self, config):
        return float(self.fn(config, 1.0))


class _SyntheticRun:
    def __init__(self, problem, config):
        self.problem, self.config = problem, config

    def loss(self, budget, rng):
        return self.problem.observe(self.config, budget, rng)


def branin(c, z):
    x1, x2 = c["x1"], c["x2"]
    b = 5.1 / (4 * math.pi**2) - 0.01 * (1 - z)
    cc = 5 / math.pi - 0.1 * (1 - z)
    t = 1 / (8 * math.pi) + 0.05 * (1 - z)
    return (x2 - b * x1**2 + cc * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


_H_A = np.array(
    [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
)
_H_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)
_H_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6(c, z):
    x = np.array([c[f"x{i}"] for i in range(1, 7)])
    alpha = _H_ALPHA - 0.1 * (1 - z)
    return float(-np.sum(alpha * np.exp(-np.sum(_H_A * (x - _H_P) ** 2, axis=1))))


BRANIN_MIN = 0.397887357729738
HARTMANN6_MIN = -3.322368011391339


# --------------------------------------------------------------------------- digits MLP


class DigitsMLP(Problem):
    SEED = 0
    CAP = 10.0

    def __init__(self, max_budget, total_budget):
        params = [
            P("lr", "float", 1e-3, 1.0, log=True),
            P("momentum", "float", 0.0, 0.95),
            P("weight_decay", "float", 1e-6, 1e-1, log=True),
            P("width", "int", 16, 256, log=True),
            P("log2_batch", "int", 5, 8),
            P("activation", "cat", choices=("relu", "tanh")),
        ]
        super().__init__(
            "digits_mlp",
            params,
            1,
            max_budget,
            3,
            total_budget,
            None,
            "one-hidden-layer MLP on sklearn digits, budget = epochs, loss = validation cross-entropy",
            unit="epochs",
        )
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(self.SEED).permutation(len(y))
        x, y = x[order] / 16.0, y[order]
        self.xtr, self.ytr = x[:1000], y[:1000]
        self.xva, self.yva = x[1000:1397], y[1000:1397]

    def start(self, config):
        return _MLPRun(self, plain(config))

    def _true(self, config):
        return self.start(config).loss(self.max_budget, None)


class _MLPRun:
    """One training run, continued epoch by epoch (deterministic given the configuration)."""

    def __init__(self, problem: DigitsMLP, config: dict):
        self.p, self.c = problem, config
        rng = np.random.default_rng(DigitsMLP.SEED)
        width = int(config["width"])
        d, k = problem.xtr.shape[1], 10
        scale = math.sqrt(2.0 / d) if config["activation"] == "relu" else math.sqrt(1.0 / d)
        self.w1 = rng.standard_normal((d, width)) * scale
        self.b1 = np.zeros(width)
        self.w2 = rng.standard_normal((width, k)) * math.sqrt(1.0 / width)
        self.b2 = np.zeros(k)
        self.v = [np.zeros_like(a) for a in (self.w1, self.b1, self.w2, self.b2)]
        self.rng = rng
        self.epochs = 0
        self.dead = False

    def _act(self, a):
        return np.maximum(a, 0.0) if self.c["activation"] == "relu" else np.tanh(a)

    def _epoch(self):
        c, p = self.c, self.p
        lr, mom, wd = c["lr"], c["momentum"], c["weight_decay"]
        bs = 2 ** int(c["log2_batch"])
        n = len(p.ytr)
        order = self.rng.permutation(n)
        params = [self.w1, self.b1, self.w2, self.b2]
        for s in range(0, n - bs + 1, bs):
            idx = order[s : s + bs]
            x, y = p.xtr[idx], p.ytr[idx]
            a = x @ self.w1 + self.b1
            h = self._act(a)
            logits = h @ self.w2 + self.b2
            logits -= logits.max(axis=1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=1, keepdims=True)
            prob[np.arange(bs), y] -= 1.0
            g_logits = prob / bs
            g_w2 = h.T @ g_logits + wd * self.w2
            g_b2 = g_logits.sum(axis=0)
            g_h = g_logits @ self.w2.T
            g_a = g_h * (a > 0) if c["activation"] == "relu" else g_h * (1.0 - h * h)
            g_w1 = x.T @ g_a + wd * self.w1
            g_b1 = g_a.sum(axis=0)
            for v, w, g in zip(self.v, params, (g_w1, g_b1, g_w2, g_b2)):
                v *= mom
                v -= lr * g
                w += v
        if not all(np.isfinite(w).all() for w in params):
            self.dead = True

    def val_loss(self) -> float:
        p = self.p
        logits = self._act(p.xva @ self.w1 + self.b1) @ self.w2 + self.b2
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = float(-logp[np.arange(len(p.yva)), p.yva].mean())
        return loss if math.isfinite(loss) else DigitsMLP.CAP

    def loss(self, budget, rng=None) -> float:
        target = max(1, int(round(budget)))
        with np.errstate(all="ignore"):
            while self.epochs < target and not self.dead:
                self._epoch()
                self.epochs += 1
            if self.dead:
                return DigitsMLP.CAP
            return min(self.val_loss(), DigitsMLP.CAP)


def make_problems(quick: bool) -> list[Problem]:
    """Budgets 1..27 (eta 3, four rungs); quick: 1..9 and tiny totals."""
    top = 9 if quick else 27
    syn_total = (4 if quick else 60) * top
    mlp_total = (3 if quick else 30) * top
    b = [P("x1", "float", -5.0, 10.0), P("x2", "float", 0.0, 15.0)]
    h = [P(f"x{i}", "float", 0.0, 1.0) for i in range(1, 7)]
    return [
        Synthetic(
            "branin", b, branin, BRANIN_MIN, 1.0, top, syn_total, "multi-fidelity Branin (2-d), minimum 0.397887"
        ),
        Synthetic(
            "hartmann6",
            h,
            hartmann6,
            HARTMANN6_MIN,
            0.05,
            top,
            syn_total,
            "multi-fidelity Hartmann-6 (6-d), minimum -3.32237",
        ),
        DigitsMLP(top if not quick else 3, mlp_total if not quick else 3 * 3),
    ]
