"""BOHB: Hyperband whose new configurations come from a TPE-style pair of kernel density
estimators, following HpBandSter's BOHB config generator and defaults, in vectorised numpy
(no statsmodels, no scipy).

Per budget b, the results seen at b (failures as +inf) are sorted; the best
n_good = max(min_points_in_model, top_n_percent * n // 100) fit the "good" density l(x) and
the next n_bad = max(min_points_in_model, (100 - top_n_percent) * n // 100) the "bad" one
g(x), once n >= min_points_in_model and both sets have more rows than dimensions. A model
is (re)fitted only at budgets no smaller than the largest budget that already has one, and
new configurations always use the model of the largest budget.

Proposal (``sample``): with probability ``random_fraction`` (its bracket's share, see
``random_placement``), or while no model exists, a draw from the prior. Otherwise
``num_samples`` candidates are drawn around good points (truncated normal of bandwidth
``bandwidth_factor * bw`` on [0, 1] for continuous and integer parameters, the kernel itself
for categorical and ordinal ones) and the one with the smallest g(x) / l(x) (each clipped
at 1e-32) is returned.

Kernels, one per parameter, as statsmodels' KDEMultivariate with var_type 'c' / 'u' / 'o':

- continuous ('c'): Gaussian, bandwidth h: exp(-((x - x_i) / h)^2 / 2) / (sqrt(2 pi) h);
- categorical ('u', Aitchison-Aitken): 1 - h when x == x_i, else h / (c - 1);
- ordinal ('o', Wang-Ryzin): 1 - h when x == x_i, else (1 - h) / 2 * h^|x - x_i|.

Bandwidths are the normal-reference rule 1.06 * std * n^(-1 / (4 + d)) per dimension
(statsmodels' ``bw='normal_reference'``), clipped below at ``min_bandwidth``.

Option ``bandwidth_floor`` (default 0.25; 0 turns it off and gives HpBandSter's KDE): continuous bandwidths of
a KDE fitted to n points are also at least ``bandwidth_floor / min(100, n + 1)`` of the unit
range, the "magic clip" of TPE (Bergstra et al. 2011; Hyperopt, and Optuna's
``consider_magic_clip`` with factor 1). The normal-reference rule collapses when the few
good points of the largest budget sit close together (the model then proposes the same
point again and again and never looks beside it: on the benchmark's multi-fidelity Branin,
2 of 10 seeds stalled at regret ~1.8); the floor keeps l(x) wide while it is fitted to few
points and fades as n grows. Measured by bench/bench_hpo.py (30 seeds, 2026-12-02) against 0: Branin
0.0945 vs 0.401 mean final regret (significantly better), Hartmann-6 0.282 vs 0.289, the
digits MLP 0.0202 vs 0.0199 (both within the noise), hence the default; 0.25 was chosen on
development seeds, never on the evaluation seeds.

Option ``kde`` (default "univariate"; "multivariate" is HpBandSter's): "multivariate" is the
product-kernel KDE, l(x) = mean_i prod_j k_j(x_j, x_ij), and a candidate is drawn around one
good point; "univariate" is TPE's model (Bergstra et al. 2011; Optuna's default
``multivariate=False``), a product of one-parameter KDEs, l(x) = prod_j mean_i k_j(x_j, x_ij),
with the same kernels and bandwidths, and each parameter of a candidate is drawn around its
own random good point. The product kernel only rates combinations close to a good point as
good; with the few good points the largest budget holds (7 of 14..34 on the benchmark's
Hartmann-6) the univariate model also proposes mixtures of their coordinates. (The
one-dimensional normal-reference exponent, n^(-1/5), measured worse than keeping d's.)

Option ``random_placement`` (default "cheapest"; "every" is HpBandSter's): "every" draws each
new configuration at random with probability ``random_fraction``; "cheapest" keeps the same
expected number per Hyperband iteration, ``random_fraction`` times its new configurations,
and gives them to the brackets with the smallest first budget first (budgets 1..27, eta 3:
16.3 of 49, a probability of 0.60 in the bracket starting at 1 and 0 in the others;
``random_shares``). A random configuration started at the full budget costs the most and
rarely wins; started at the smallest it still explores and is promoted if it is good. The
expensive brackets then hold only model-based configurations. Trade-off: where the smallest
budget misleads (a low fidelity that ranks configurations differently), random
configurations are judged by it alone.

Option ``bandwidth`` (default "adaptive"; "fixed" is HpBandSter's): the good density's
continuous kernels become sample-point adaptive (Breiman, Meisel and Purcell 1977; the
k-nearest-neighbour bandwidths of Loftsgaarden and Quesenberry with k = 1): good point i's
kernel is the fixed normal-reference one scaled by r_i = min(1, the distance to its nearest
other good point, in bandwidths, root mean square over the continuous dimensions), at least
the floor above (or ``min_bandwidth``) and, for an integer parameter, one step between its
values; the bad density keeps the fixed bandwidths. One bandwidth per parameter, fitted to a
good set that spans several optima (Branin's three minimisers), is as wide as the spread
between them, so the candidates drawn around a good point (``bandwidth_factor`` x that) never
refine it: on the benchmark's Branin, 14 of the 15 worst of 2000 development runs ended with
no full-budget configuration within 0.1 of the optimum. Good points with a close neighbour now get narrow
kernels and candidates near them; isolated ones keep the fixed width and keep exploring. In
6 dimensions nearest neighbours are rarely within a bandwidth, so Hartmann-6 changes less.
Development seeds (2026-12-04), fixed -> adaptive: Branin 0.0975 -> 0.0869 (2000 seeds
500..2499; Optuna 0.0929), Hartmann-6 0.1975 -> 0.1840 (1000 seeds 500..1499), digits MLP
0.0511 -> 0.0507 (200 seeds 140..339; without the integer step 0.0521). Measured worse: the
bad density adaptive too (Branin 0.134), one-dimensional neighbour gaps (Optuna's rule,
capped at the fixed bandwidth; Branin 0.091, Hartmann-6 0.330) and their geometric mean with
the fixed bandwidth (0.087, 0.233), the largest coordinate distance instead of the RMS
(0.088, 0.194).

``kde`` and ``random_placement`` were chosen on development seeds (100..499, never the
evaluation seeds 0..99) of bench/bench_hpo.py, with every listed HpBandSter default (random_fraction, top_n_percent,
num_samples, bandwidth_factor, min_bandwidth, min_points_in_model) unchanged. Mean final
regret over seeds 100..299 / 300..499, HpBandSter's KDE with the floor -> both options:
Hartmann-6 0.275 / 0.287 -> 0.186 / 0.182 (Optuna 0.240 / 0.270), Branin 0.099 / 0.108 ->
0.107 / 0.100 (Optuna 0.091 / 0.090; Branin's regret is dominated by picking the incumbent
among noisy full-budget results, every variant tried landed within the noise of Optuna),
digits MLP (seeds 100..139) 0.0514 -> 0.0511 (Optuna 0.054). Either option alone gained
less on Hartmann-6 (univariate 0.244, cheapest 0.259). The evaluation is in docs/hpo.md.
``bandwidth_floor=0, kde="multivariate", random_placement="every", bandwidth="fixed"`` is
HpBandSter's algorithm exactly; a journal written before an option existed resumes with
HpBandSter's value for it.

Differences from HpBandSter, where its behaviour is undefined or degenerate: c is the
parameter's number of values (statsmodels counts the values present in the data, which
divides by zero when all good points agree, HpBandSter's "not finite" case); discrete
bandwidths are also clipped above at (c - 1) / c, where the Aitchison-Aitken kernel is
uniform (beyond it the kernel turns negative); discrete candidates are drawn from the same
kernel that scores them (HpBandSter keeps the centre with probability 1 - h and otherwise
draws uniformly from all c values); ordinal parameters are supported (HpBandSter refuses
them). Inactive (conditional) entries are imputed as HpBandSter does: copied from a random
row of the same set in which they are active, else drawn at random.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .hyperband import Hyperband
from .space import SearchSpace

__all__ = ["BOHB", "KDE", "BOHBModel", "normal_reference_bandwidth"]

CONT, CAT, ORD = 0, 1, 2
_KIND = {"float": CONT, "int": CONT, "categorical": CAT, "ordinal": ORD}
_LOG_FLOOR = math.log(1e-32)
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def normal_reference_bandwidth(data: np.ndarray) -> np.ndarray:
    """Scott's / Silverman's rule as statsmodels applies it: 1.06 * std * n^(-1/(4+d))."""
    n, d = data.shape
    return 1.06 * data.std(axis=0) * n ** (-1.0 / (4 + d))


class KDE:
    """Product-kernel density estimate over mixed data (one row per observation).

    ``kinds``: per dimension CONT (0), CAT (1) or ORD (2); ``levels``: number of values of
    a discrete dimension (data hold its index 0..c-1); ``bw``: bandwidth per dimension.
    """

    def __init__(self, data, kinds, levels, bw, univariate: bool = False):
        self.univariate = bool(univariate)
        self.data = np.asarray(data, dtype=np.float64)
        if self.data.ndim != 2:
            raise ValueError(f"KDE: data must be 2-D, got shape {self.data.shape}")
        self.kinds = np.asarray(kinds, dtype=np.int64)
        self.levels = np.asarray(levels, dtype=np.int64)
        self.bw = np.asarray(bw, dtype=np.float64)
        d = self.data.shape[1]
        if not (self.kinds.shape == self.levels.shape == self.bw.shape == (d,)):
            raise ValueError("KDE: kinds, levels and bw need one entry per data column")
        if not np.all(self.bw > 0):
            raise ValueError(f"KDE: bandwidths must be > 0, got {self.bw}")
        self._cont = np.flatnonzero(self.kinds == CONT)
        self._disc = np.flatnonzero(self.kinds != CONT)
        self._cont_pos = {int(j): a for a, j in enumerate(self._cont)}  # dimension -> column of point_bw
        # [n, number of continuous dimensions]: the bandwidth of each point's kernel in each
        # continuous dimension (the same ``bw`` for every point unless ``adapt`` narrowed it)
        self._set_point_bw(np.broadcast_to(self.bw[self._cont], (self.data.shape[0], self._cont.size)).copy())

    def _set_point_bw(self, point_bw: np.ndarray) -> None:
        # the logs are needed by every logpdf call (each ask scores num_samples candidates)
        self.point_bw = point_bw
        self._log_point_bw = np.log(point_bw)
        self._log_norm = self._log_point_bw.sum(axis=1) + self._cont.size * _LOG_SQRT_2PI

    @classmethod
    def fit(
        cls, data, kinds, levels, min_bandwidth=1e-3, bandwidth_floor=0.0, univariate=False, adaptive=False, steps=None
    ) -> "KDE":
        """Normal-reference bandwidths, clipped to [min_bandwidth, (c - 1) / c] for discrete ones;
        continuous ones also at least ``bandwidth_floor / min(100, n + 1)`` (see the module doc).
        ``univariate``: the density is a product of one-parameter KDEs (same bandwidths).
        ``adaptive``: each point's continuous bandwidths are narrowed by ``adapt`` (``steps``:
        per dimension, the unit-cube step between an integer parameter's values, 0 for floats)."""
        data = np.asarray(data, dtype=np.float64)
        kinds = np.asarray(kinds, dtype=np.int64)
        levels = np.asarray(levels, dtype=np.int64)
        bw = np.maximum(normal_reference_bandwidth(data), min_bandwidth)
        floor = bandwidth_floor / min(100.0, data.shape[0] + 1.0) if bandwidth_floor > 0 else 0.0
        cont = kinds == CONT
        if floor > 0:
            bw[cont] = np.maximum(bw[cont], floor)
        disc = kinds != CONT
        upper = np.where(levels > 1, (levels - 1) / np.maximum(levels, 1), 1.0)
        bw[disc] = np.clip(bw[disc], min_bandwidth, np.maximum(upper[disc], min_bandwidth))
        kde = cls(data, kinds, levels, bw, univariate)
        if adaptive:
            kde.adapt(max(floor, min_bandwidth), steps)
        return kde

    def adapt(self, floor: float, steps=None) -> None:
        """Sample-point adaptive bandwidths: point i's kernel is the fixed one scaled by
        r_i = min(1, distance from x_i to its nearest other point), the distance measured in
        bandwidths (root mean square over the continuous dimensions of (x_i - x_k) / bw), and
        kept at least ``floor`` and, for an integer parameter, the step between its values
        (``steps``, per dimension; narrower only pins the value), never below the fixed
        bandwidth where that is smaller. A point with a close neighbour gets a narrow kernel,
        an isolated one keeps the fixed width."""
        n, c = self.data.shape[0], self._cont
        if n < 2 or c.size == 0:
            return
        lowest = np.full(c.size, float(floor))
        if steps is not None:
            lowest = np.maximum(lowest, np.asarray(steps, dtype=np.float64)[c])
        z = self.data[:, c] / self.bw[c]
        dist = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).mean(axis=2))
        np.fill_diagonal(dist, np.inf)
        r = np.minimum(dist.min(axis=1), 1.0)
        fixed = self.bw[c][None, :]
        self._set_point_bw(np.clip(fixed * r[:, None], np.minimum(lowest[None, :], fixed), fixed))

    def _dim_log_kernels(self, x: np.ndarray, j: int) -> np.ndarray | None:
        """log kernel of dimension j between every query row and every data row: [m, n]
        (None: a one-value discrete dimension, whose kernel is 1)."""
        if self.kinds[j] == CONT:
            a = self._cont_pos[j]
            z = (x[:, j, None] - self.data[None, :, j]) / self.point_bw[None, :, a]
            return -0.5 * z * z - (self._log_point_bw[None, :, a] + _LOG_SQRT_2PI)
        c, h = self.levels[j], self.bw[j]
        if c <= 1:
            return None
        diff = np.abs(x[:, j, None] - self.data[None, :, j])
        same = diff == 0
        if self.kinds[j] == CAT:
            return np.where(same, math.log(1 - h), math.log(h / (c - 1)))
        return np.where(same, math.log(1 - h), math.log(0.5 * (1 - h)) + diff * math.log(h))

    def log_kernels(self, x: np.ndarray) -> np.ndarray:
        """log of the product kernel between every query row and every data row: [m, n]."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        m, n = x.shape[0], self.data.shape[0]
        acc = np.zeros((m, n))
        if self._cont.size:
            h = self.point_bw  # [n, continuous dimensions]
            z = (x[:, None, self._cont] - self.data[None, :, self._cont]) / h[None]
            acc -= 0.5 * np.einsum("mnj,mnj->mn", z, z)
            acc -= self._log_norm[None, :]
        for j in self._disc:
            k = self._dim_log_kernels(x, j)
            if k is not None:
                acc += k
        return acc

    def logpdf(self, x) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if not self.univariate:
            return _log_mean_exp(self.log_kernels(x))
        out = np.zeros(x.shape[0])
        for j in range(self.data.shape[1]):
            k = self._dim_log_kernels(x, j)
            if k is not None:
                out += _log_mean_exp(k)
        return out

    def pdf(self, x) -> np.ndarray:
        return np.exp(self.logpdf(x))


def _log_mean_exp(acc: np.ndarray) -> np.ndarray:
    """log(mean(exp(acc), axis=1)), stable."""
    top = acc.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (top[:, 0] + np.log(np.exp(acc - top).sum(axis=1))) - math.log(acc.shape[1])


def _truncated_normal(rng, mu, sigma):
    """Draws of N(mu, sigma) truncated to [0, 1], by rejection (mu lies in [0, 1], so at
    least about half of each draw is accepted)."""
    x = rng.normal(mu, sigma)
    for _ in range(64):
        bad = (x < 0) | (x > 1)
        if not bad.any():
            break
        x[bad] = rng.normal(np.broadcast_to(mu, x.shape)[bad], np.broadcast_to(sigma, x.shape)[bad])
    return np.clip(x, 0.0, 1.0)


DEFAULT_BANDWIDTH_FLOOR = 0.25  # TPE's magic clip (module doc); 0: HpBandSter's KDE
KDE_KINDS = ("univariate", "multivariate")  # the first is the default (module doc)
BANDWIDTHS = ("adaptive", "fixed")  # the first is the default (module doc)
RANDOM_PLACEMENTS = ("cheapest", "every")  # the first is the default (module doc)


class BOHBModel:
    """The good/bad KDE pairs per budget and the proposal step (see the module doc)."""

    def __init__(
        self,
        space: SearchSpace,
        rng: np.random.Generator,
        top_n_percent=15,
        num_samples=64,
        random_fraction=1 / 3,
        bandwidth_factor=3,
        min_bandwidth=1e-3,
        min_points_in_model=None,
        bandwidth_floor=DEFAULT_BANDWIDTH_FLOOR,
        kde="univariate",
        bandwidth="adaptive",
    ):
        d = len(space)
        if kde not in KDE_KINDS:
            raise ValueError(f"kde must be one of {KDE_KINDS}, got {kde!r}")
        if bandwidth not in BANDWIDTHS:
            raise ValueError(f"bandwidth must be one of {BANDWIDTHS}, got {bandwidth!r}")
        if not 0 < top_n_percent < 100:
            raise ValueError(f"top_n_percent must be in (0, 100), got {top_n_percent!r}")
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not 0 <= random_fraction <= 1:
            raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction!r}")
        if not (bandwidth_factor > 0 and min_bandwidth > 0):
            raise ValueError("bandwidth_factor and min_bandwidth must be > 0")
        if (
            isinstance(bandwidth_floor, bool)
            or not isinstance(bandwidth_floor, (int, float))
            or not (math.isfinite(bandwidth_floor) and bandwidth_floor >= 0)
        ):
            raise ValueError(f"bandwidth_floor must be a finite number >= 0, got {bandwidth_floor!r}")
        if min_points_in_model is None:
            min_points_in_model = d + 1
        if min_points_in_model < d + 1:
            warnings.warn(
                f"min_points_in_model={min_points_in_model} is below d + 1 = {d + 1} "
                f"(a KDE needs more points than dimensions); using {d + 1}",
                stacklevel=3,
            )
            min_points_in_model = d + 1
        self.space, self.rng = space, rng
        self.top_n_percent, self.num_samples = top_n_percent, num_samples
        self.random_fraction, self.bandwidth_factor = random_fraction, bandwidth_factor
        self.min_bandwidth, self.min_points_in_model = min_bandwidth, int(min_points_in_model)
        self.bandwidth_floor = float(bandwidth_floor)
        self.kde, self.bandwidth = kde, bandwidth
        self.kinds = np.array([_KIND[k] for k in space.kinds], dtype=np.int64)
        self.levels = space.n_levels.copy()
        self._disc = self.kinds != CONT
        self.observations: dict = {}  # budget -> (list of vectors, list of losses)
        self.models: dict = {}  # budget -> (good KDE, bad KDE)

    # -- representation ------------------------------------------------------------------
    def to_vector(self, config) -> np.ndarray:
        """Unit-cube vector with discrete entries replaced by their index (NaN: inactive)."""
        v = self.space.to_unit(config)
        d = self._disc & ~np.isnan(v)
        v[d] = np.minimum(np.floor(v[d] * self.levels[d]), self.levels[d] - 1)
        return v

    def from_vector(self, v) -> dict:
        u = np.array(v, dtype=np.float64)
        u[self._disc] = (u[self._disc] + 0.5) / self.levels[self._disc]
        return self.space.from_unit(u)

    @property
    def model_budget(self):
        """The budget whose model proposes configurations (None: no model yet)."""
        return max(self.models) if self.models else None

    # -- fitting -------------------------------------------------------------------------
    def impute(self, array: np.ndarray) -> np.ndarray:
        """Fill inactive (NaN) entries: for the first NaN column of a row, copy all of the
        row's NaN entries from a random row where that column is active (HpBandSter's rule),
        column by column so the rows are handled together."""
        out = array.copy()
        for j in range(out.shape[1]):
            rows = np.flatnonzero(np.isnan(out[:, j]))
            if rows.size == 0:
                continue
            valid = np.flatnonzero(~np.isnan(array[:, j]))
            if valid.size:
                donors = array[valid[self.rng.integers(0, valid.size, size=rows.size)]]
                block = out[rows]
                out[rows] = np.where(np.isnan(block), donors, block)
            elif self.kinds[j] == CONT:
                out[rows, j] = self.rng.random(rows.size)
            else:
                out[rows, j] = self.rng.integers(0, self.levels[j], size=rows.size)
        return out

    def observe(self, config, budget, loss: float) -> None:
        vectors, losses = self.observations.setdefault(budget, ([], []))
        vectors.append(self.to_vector(config))
        losses.append(loss if math.isfinite(loss) else math.inf)
        if self.models and max(self.models) > budget:
            return  # a larger budget already has a model; this one would never be used
        n = len(losses)
        if n < self.min_points_in_model:
            return
        d = len(self.space)
        n_good = max(self.min_points_in_model, (self.top_n_percent * n) // 100)
        n_bad = max(self.min_points_in_model, ((100 - self.top_n_percent) * n) // 100)
        order = np.argsort(np.asarray(losses), kind="stable")
        data = np.asarray(vectors)
        good = self.impute(data[order[:n_good]])
        bad = self.impute(data[order[n_good : n_good + n_bad]])
        if good.shape[0] <= d or bad.shape[0] <= d:
            return
        univariate, adaptive = self.kde == "univariate", self.bandwidth == "adaptive"
        # only the good density adapts (narrowing the bad one too measured worse, module doc)
        self.models[budget] = (
            KDE.fit(
                good,
                self.kinds,
                self.levels,
                self.min_bandwidth,
                self.bandwidth_floor,
                univariate,
                adaptive,
                self.space.unit_steps,
            ),
            KDE.fit(bad, self.kinds, self.levels, self.min_bandwidth, self.bandwidth_floor, univariate),
        )

    # -- proposing -----------------------------------------------------------------------
    def propose(self, good: KDE) -> np.ndarray:
        """``num_samples`` candidate vectors drawn around random good points: [m, d]. A
        univariate model draws each parameter around its own random good point (its density
        is a product of one-parameter KDEs), a multivariate one a whole point at a time."""
        rng, m = self.rng, self.num_samples
        n, d = good.data.shape
        if good.univariate:
            which = rng.integers(0, n, size=(m, d))  # the good point behind each entry
        else:
            which = np.repeat(rng.integers(0, n, size=m)[:, None], d, axis=1)
        centres = good.data[which, np.arange(d)[None, :]]
        cand = centres.copy()
        cont = good._cont
        if cont.size:
            h = good.point_bw[which[:, cont], np.arange(cont.size)[None, :]]  # each centre's own kernel
            sigma = self.bandwidth_factor * np.maximum(h, self.min_bandwidth)
            cand[:, cont] = _truncated_normal(rng, centres[:, cont], sigma)
        for j in good._disc:
            c, h = int(self.levels[j]), float(good.bw[j])
            if c <= 1:
                continue
            centre = centres[:, j].astype(np.int64)
            if self.kinds[j] == CAT:
                move = rng.random(m) < h
                other = (centre + 1 + rng.integers(0, c - 1, size=m)) % c
                cand[:, j] = np.where(move, other, centre)
            else:
                dist = np.abs(np.arange(c)[None, :] - centre[:, None])
                p = np.where(dist == 0, 1 - h, 0.5 * (1 - h) * h**dist)
                cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
                cand[:, j] = np.minimum((cdf < rng.random(m)[:, None]).sum(axis=1), c - 1)
        return cand

    def sample(self, random_fraction: float | None = None) -> tuple[dict, dict]:
        """A new configuration: at random with probability ``random_fraction`` (None: the
        model's; BOHB passes its bracket's share) or while there is no model, else the best
        of ``num_samples`` candidates by l/g."""
        p = self.random_fraction if random_fraction is None else random_fraction
        # Same short-circuit as HpBandSter: no random draw is spent while there is no model.
        if not self.models or self.rng.random() < p:
            return self.space.sample(self.rng), {"model_based": False}
        budget = max(self.models)
        good, bad = self.models[budget]
        cand = self.propose(good)
        score = np.maximum(bad.logpdf(cand), _LOG_FLOOR) - np.maximum(good.logpdf(cand), _LOG_FLOOR)
        best = int(np.argmin(score))
        return self.from_vector(cand[best]), {"model_based": True, "model_budget": budget}


def random_shares(plans, random_fraction: float, placement: str) -> dict:
    """Probability that a new configuration of the bracket starting at each budget is drawn
    at random. "every": ``random_fraction`` in every bracket (HpBandSter). "cheapest": the
    same expected number of random configurations per Hyperband iteration,
    ``random_fraction`` x its new configurations, given to the brackets with the smallest
    first budget first (module doc)."""
    if placement not in RANDOM_PLACEMENTS:
        raise ValueError(f"random_placement must be one of {RANDOM_PLACEMENTS}, got {placement!r}")
    if placement == "every":
        return {p.budgets[0]: random_fraction for p in plans}
    quota = random_fraction * sum(p.sizes[0] for p in plans)
    shares = {}
    for p in sorted(plans, key=lambda p: p.budgets[0]):
        take = min(quota, p.sizes[0])
        shares[p.budgets[0]] = take / p.sizes[0]
        quota = max(quota - take, 0.0)
    return shares


class BOHB(Hyperband):
    """Hyperband's schedule with configurations proposed by BOHB's KDE model: HpBandSter's
    algorithm and defaults with four departures that measured better (module doc):
    ``bandwidth_floor=0.25`` (TPE's bandwidth floor), ``kde="univariate"`` (TPE's product of
    one-parameter densities), ``random_placement="cheapest"`` (the random third of the
    configurations goes to the cheapest brackets) and ``bandwidth="adaptive"`` (good points
    with a close neighbour get narrower kernels). ``bandwidth_floor=0, kde="multivariate",
    random_placement="every", bandwidth="fixed"`` is HpBandSter's BOHB exactly (with
    ``hpbandster_compat=True`` its brackets too). ``seed`` drives every random choice."""

    def __init__(
        self,
        space: SearchSpace,
        min_budget,
        max_budget,
        eta=3,
        hpbandster_compat: bool = False,
        n_brackets: int | None = None,
        top_n_percent=15,
        num_samples=64,
        random_fraction=1 / 3,
        bandwidth_factor=3,
        min_bandwidth=1e-3,
        min_points_in_model=None,
        bandwidth_floor=DEFAULT_BANDWIDTH_FLOOR,
        kde="univariate",
        random_placement="cheapest",
        bandwidth="adaptive",
        seed=None,
    ):
        super().__init__(space, min_budget, max_budget, eta, hpbandster_compat, n_brackets, seed)
        self.model = BOHBModel(
            space,
            self.rng,
            top_n_percent=top_n_percent,
            num_samples=num_samples,
            random_fraction=random_fraction,
            bandwidth_factor=bandwidth_factor,
            min_bandwidth=min_bandwidth,
            min_points_in_model=min_points_in_model,
            bandwidth_floor=bandwidth_floor,
            kde=kde,
            bandwidth=bandwidth,
        )
        self.random_placement = random_placement
        self.random_shares = random_shares(self.plans, self.model.random_fraction, random_placement)

    def _kwargs(self):
        m = self.model
        return {
            **super()._kwargs(),
            "top_n_percent": m.top_n_percent,
            "num_samples": m.num_samples,
            "random_fraction": m.random_fraction,
            "bandwidth_factor": m.bandwidth_factor,
            "min_bandwidth": m.min_bandwidth,
            "min_points_in_model": m.min_points_in_model,
            "bandwidth_floor": m.bandwidth_floor,
            "kde": m.kde,
            "random_placement": self.random_placement,
            "bandwidth": m.bandwidth,
        }

    def _sample_config(self, budget):
        return self.model.sample(self.random_shares[budget])

    def _tell(self, trial, loss):
        self.model.observe(trial.config, trial.budget, loss)
        super()._tell(trial, loss)
