"""Plots of a study (matplotlib, Agg backend, PNG files) and the numbers behind them.

- ``plot_best_loss(study, path)``: the incumbent's loss against wall time and against the
  cumulative budget of finished trials. The incumbent is ``Study.best()`` at each point:
  the lowest loss at the largest budget that has a success so far (losses at different
  budgets are not comparable, so the curve may step up when a larger budget first reports).
- ``plot_rank_correlation(study, path)``: Spearman's rank correlation of the losses of the
  configurations evaluated at both of two budgets, for every pair of budgets: how well a
  small budget predicts the ranking at a large one, which is what successive halving bets on.

The data functions (``incumbent_trace``, ``rank_correlations``, ``spearman``) need numpy
only; the plotting ones need matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["incumbent_trace", "rank_correlations", "spearman", "plot_best_loss", "plot_rank_correlation"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "accelops.hpo.plots needs matplotlib, which is not installed: pip install matplotlib"
        ) from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def incumbent_trace(study) -> dict:
    """Per finished trial (in completion order): seconds since the study started, cumulative
    budget of finished trials, and the incumbent's loss (NaN before the first success)."""
    t, spent, best = [], [], []
    total, top_budget, top_loss = 0.0, -math.inf, math.inf
    for r in study.results:
        total += r.budget
        if r.ok:
            if r.budget > top_budget:
                top_budget, top_loss = r.budget, r.loss
            elif r.budget == top_budget:
                top_loss = min(top_loss, r.loss)
        t.append(r.finished - study.created)
        spent.append(total)
        best.append(top_loss if math.isfinite(top_loss) else math.nan)
    return {"time": np.array(t), "budget": np.array(spent), "loss": np.array(best)}


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    sa = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rho (Pearson correlation of the average ranks); NaN for fewer than 2
    points or a constant side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman: need two 1-D arrays of one length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else math.nan


def rank_correlations(study) -> dict:
    """{(small_budget, large_budget): (rho, n)} over configurations with successful results at both."""
    by_budget: dict = {}
    for r in study.results:
        if r.ok:
            by_budget.setdefault(r.budget, {})[r.trial.config_id] = r.loss
    budgets = sorted(by_budget)
    out = {}
    for i, b1 in enumerate(budgets):
        for b2 in budgets[i + 1 :]:
            common = sorted(set(by_budget[b1]) & set(by_budget[b2]))
            rho = spearman([by_budget[b1][c] for c in common], [by_budget[b2][c] for c in common])
            out[(b1, b2)] = (rho, len(common))
    return out


def plot_best_loss(study, path) -> str:
    plt = _pyplot()
    tr = incumbent_trace(study)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, label in ((axes[0], "time", "wall time (s)"), (axes[1], "budget", "cumulative budget")):
        ax.step(tr[key], tr["loss"], where="post")
        ax.set_xlabel(label)
        ax.set_ylabel("incumbent loss")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{type(study.optimizer).__name__}: best loss")
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return str(path)


def plot_rank_correlation(study, path) -> str:
    plt = _pyplot()
    corr = rank_correlations(study)
    budgets = sorted({b for pair in corr for b in pair})
    n = len(budgets)
    m = np.full((n, n), np.nan)
    for (b1, b2), (rho, _) in corr.items():
        i, j = budgets.index(b1), budgets.index(b2)
        m[i, j] = m[j, i] = rho
    np.fill_diagonal(m, 1.0)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.2 * n + 2), constrained_layout=True)
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="coolwarm")
    labels = [f"{b:g}" for b in budgets]
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    for (b1, b2), (rho, cnt) in corr.items():
        i, j = budgets.index(b1), budgets.index(b2)
        ax.text(j, i, f"{rho:.2f}\nn={cnt}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("budget")
    ax.set_ylabel("budget")
    ax.set_title("Spearman rank correlation of losses")
    fig.colorbar(im, ax=ax)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return str(path)
