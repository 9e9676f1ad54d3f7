"""Hyperparameter-optimisation family: accelops.hpo's RandomSearch, Hyperband and BOHB
against HpBandSter's BOHB and Optuna's TPESampler with its HyperbandPruner, at equal total
budget, 100 seeds each (--seeds N), on multi-fidelity Branin and Hartmann-6 (known optima) and a small
MLP on scikit-learn's digits with epochs as the budget (bench/hpo_problems.py defines
the problems and their fidelities).

Protocol (one optimiser run = one seed on one problem, everything sequential, one worker):

- Seeds 0..N-1 (N = 100 by default; 30 before 2026-12-03, where every target missed was
  within the noise). These are the evaluation seeds: BOHB's options were chosen on seeds
  100 and up (development: 100..499, and 500..2499 for bandwidth="adaptive"; bench/hpo_dev.py
  refuses 0..99), so N <= 100 keeps the two apart.

- Budgets 1..27, eta 3 (four rungs; --quick: 1..9, the MLP 1..3). Each optimiser may
  spend the problem's total budget (sum of the costs of the evaluations it starts;
  Branin and Hartmann-6: 60 x 27 = 1620, digits MLP: 30 x 27 = 810 epochs); an evaluation
  that would pass it is not run.
- Cost of an evaluation, the same rule for every optimiser (--accounting):
  ``resume`` (default): a configuration evaluated again at a larger budget continues its
  run and costs only the budget it adds (promoted 1 -> 3 -> 9 -> 27: 1 + 2 + 6 + 18 = 27).
  Every peer here can continue: accelops hands the objective a checkpoint_dir per
  configuration (Study / TrainObjective resume from it), HpBandSter's Worker.compute gets
  the configuration's config_id and a working_directory "to store intermediate results on
  lower budgets that can be reused later for a larger budget" (its documentation), and
  Optuna's trials report step by step. The MLP's run object is kept per configuration and
  trained on (the same loss as retraining: training to b epochs is a prefix of training
  longer); the synthetic functions draw the observation at the new budget.
  ``full``: accelops and HpBandSter pay every evaluation's full budget (promoted 1 -> 3 ->
  9 -> 27: 40), Optuna's trials still cost 1 a step: the accounting of the earlier rows
  in results/hpo.jsonl (those have no "accounting" field), which favoured Optuna.
- accelops: RandomSearch(budget=27), Hyperband and BOHB with their defaults (paper
  brackets; BOHB's bandwidth_floor=0.25, kde="univariate", random_placement="cheapest",
  bandwidth="adaptive", see accelops/hpo/bohb.py), BOHB with hpbandster_compat=True
  (HpBandSter's brackets), BOHB with the defaults of 2026-12-03 (bandwidth="fixed"), of
  2026-12-02 (also kde="multivariate", random_placement="every") and BOHB with HpBandSter's
  algorithm exactly (also bandwidth_floor=0), driven by ask/tell.
  Rows before 2026-12-02 (no "bandwidth_floor" field): "bohb" had the floor off and
  "bohb_floor" on; rows before 2026-12-03 (no "kde" field): "bohb" was multivariate with
  random_placement="every", and "bohb_nofloor" is today's "bohb_hpbandster"; rows before
  2026-12-04 (no "bandwidth" field in the options): every BOHB row had bandwidth="fixed".
- HpBandSter BOHB (its defaults) runs in-process as its documentation describes: a
  NameServer on 127.0.0.1 (random port), one Worker thread, the BOHB master, as many
  iterations as the budget needs; results past the budget are cut off. Pyro4's default
  serializer (serpent) cannot carry numpy 2 scalars (serpent writes np.float64(9.0) as
  the text "np.float64(9.0)", which its ast.literal_eval reader refuses: the worker drops
  every job and the run hangs), so the bench switches Pyro4 to its pickle serializer
  (loopback only). Seeded with numpy's global seed and the ConfigSpace seed.
- Optuna: TPESampler(seed) (defaults), a study name fixed by the problem and seed (its
  HyperbandPruner assigns trials to brackets by a hash of the study name, which is a random
  UUID by default: rows before run a5342a96a9a1 did not follow from the seed), with
  HyperbandPruner(min_resource=1,
  max_resource=27, reduction_factor=3), ask/tell; each trial reports its loss at every
  budget step 1, 2, ..., 27 (an epoch of the MLP, a fidelity step of the synthetic
  functions), each step costing 1, until pruned or complete. A trial continues where it
  stopped, so a configuration that reaches 27 has cost 27, where Hyperband's schedule
  charges a configuration promoted 1 -> 3 -> 9 -> 27 all four rungs (40): the accounting
  favours Optuna (accelops' Study avoids that cost with checkpoint-aware objectives, which
  the synthetic functions do not model).
- Regret after each evaluation: the incumbent is the lowest observed loss at the largest
  budget evaluated so far (Study.best()'s and HpBandSter's rule); its regret is the
  noise-free full-budget value of that configuration minus the optimum (the MLP: minus the
  best full-budget validation loss found by any optimiser in this run). Final regret =
  regret when the budget is spent. Mean with a 95% percentile-bootstrap interval, std,
  p20/p50/p80 and max over the seeds; each target line also gives the bootstrap interval
  of the difference of the two means (it says "within the noise" when it holds 0).
- Time to choose a configuration: accelops ask() for a new configuration (not a
  promotion), HpBandSter's config generator get_config, Optuna's study.ask() with the
  suggest calls; median over every choice of the runs. Then a dedicated measurement with
  500 observations at the full budget in each model (random configurations of the
  Hartmann-6 space and of the MLP's mixed space): the median over repeated calls.

Targets: accelops BOHB's mean final regret <= HpBandSter BOHB's and <= Optuna's on each
problem (reported for the defaults and for HpBandSter's algorithm); accelops BOHB's median
ask() time <= 5 ms with 500 observations. A peer that is not installed gives rows with
status "skipped" and the reason.

    python bench/bench_hpo.py [--quick] [--results-dir DIR] [--seeds N] [--accounting resume|full] [--jobs N]
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings

import common
import hpo_problems as hp
import numpy as np

FAMILY = "hpo"
OPTIMIZERS = {  # key: (label, accelops?)
    "random": ("accelops RandomSearch", True),
    "hyperband": ("accelops Hyperband", True),
    "bohb": ("accelops BOHB", True),
    "bohb_compat": ("accelops BOHB, HpBandSter brackets", True),
    "bohb_fixed": ("accelops BOHB, bandwidth='fixed' (the defaults of 2026-12-03)", True),
    "bohb_multivariate": (
        "accelops BOHB, kde='multivariate', random_placement='every', bandwidth='fixed' "
        "(the defaults before 2026-12-03)",
        True,
    ),
    "bohb_hpbandster": (
        "accelops BOHB, HpBandSter's algorithm (bandwidth_floor=0, kde='multivariate', "
        "random_placement='every', bandwidth='fixed')",
        True,
    ),
    "hpbandster_bohb": ("HpBandSter BOHB", False),
    "optuna_tpe_hb": ("Optuna TPE + HyperbandPruner", False),
}
ASK_TARGET_MS = 5.0
ACCOUNTINGS = ("resume", "full")
SETTINGS = {"seeds": None, "accounting": "resume"}  # set by main(); None: 100 (--quick: 2)
BOOTSTRAP = 10_000
PEER_DISTS = ("hpbandster", "ConfigSpace", "statsmodels", "Pyro4", "optuna")


def _percentiles(values):
    v = sorted(values)
    return {"p20": common.percentile(v, 0.2), "p50": common.percentile(v, 0.5), "p80": common.percentile(v, 0.8)}


def bootstrap_means(values, n=BOOTSTRAP, seed=0) -> np.ndarray:
    """Means of ``n`` resamples (with replacement) of ``values``, with a fixed seed."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    return v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)


def bootstrap_ci(values, level=0.95):
    """Percentile bootstrap confidence interval of the mean: [lo, hi]."""
    m = bootstrap_means(values)
    return [float(np.quantile(m, (1 - level) / 2)), float(np.quantile(m, (1 + level) / 2))]


def bootstrap_diff_ci(a, b, level=0.95):
    """Percentile bootstrap interval of mean(a) - mean(b) (independent resamples)."""
    d = bootstrap_means(a, seed=1) - bootstrap_means(b, seed=2)
    return [float(np.quantile(d, (1 - level) / 2)), float(np.quantile(d, (1 + level) / 2))]


# --------------------------------------------------------------------------- peers


def import_hpbandster():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import ConfigSpace  # noqa: F401
            import hpbandster.core.nameserver  # noqa: F401
            import Pyro4  # noqa: F401
            from hpbandster.optimizers import BOHB  # noqa: F401
            from hpbandster.optimizers.config_generators.bohb import BOHB as CG  # noqa: F401
        return None
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"hpbandster not importable: {type(exc).__name__}: {exc}"


def import_optuna():
    try:
        import optuna  # noqa: F401

        return None
    except Exception as exc:
        return f"optuna not importable: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _quiet_peers():
    names = ["hpbandster", "Pyro4", "optuna"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConfigSpace deprecations, statsmodels and pandas notices
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


@contextlib.contextmanager
def _pyro_pickle():
    """Pyro4 with its pickle serializer (see the module doc), restored afterwards."""
    import Pyro4

    saved = (Pyro4.config.SERIALIZER, set(Pyro4.config.SERIALIZERS_ACCEPTED))
    Pyro4.config.SERIALIZER = "pickle"
    Pyro4.config.SERIALIZERS_ACCEPTED = saved[1] | {"pickle"}
    try:
        yield
    finally:
        Pyro4.config.SERIALIZER, Pyro4.config.SERIALIZERS_ACCEPTED = saved


# --------------------------------------------------------------------------- optimiser runs
# Each returns {"evals": [(budget, config, loss)] in the order they finished,
# "choose_s": [seconds per configuration chosen]}.


def _noise_rng(problem_index, seed):
    return np.random.default_rng([seed, problem_index, 7])


class Runs:
    """The runs of one optimiser run's configurations, keyed by the optimiser's configuration
    id. ``accounting="resume"``: a configuration evaluated again at a larger budget continues
    its run (the MLP keeps training, the synthetic functions draw their observation at the
    new budget) and costs the budget it adds; "full": every evaluation starts from scratch
    and costs its budget."""

    def __init__(self, problem, accounting):
        self.problem, self.accounting = problem, accounting
        self.runs, self.reached = {}, {}

    def cost(self, key, budget) -> float:
        if self.accounting == "resume":
            return max(budget - self.reached.get(key, 0.0), 0.0)
        return budget

    def evaluate(self, key, config, budget, rng) -> float:
        if self.accounting == "resume":
            run = self.runs.setdefault(key, self.problem.start(config))
            self.reached[key] = max(budget, self.reached.get(key, 0.0))
            return run.loss(budget, rng)
        return self.problem.evaluate(config, budget, rng)


def make_accelops(kind, problem, seed):
    from accelops import hpo

    space = hp.accelops_space(problem.params)
    args = (space, problem.min_budget, problem.max_budget, problem.eta)
    if kind == "random":
        return hpo.RandomSearch(space, budget=problem.max_budget, seed=seed)
    if kind == "hyperband":
        return hpo.Hyperband(*args, seed=seed)
    if kind == "bohb_compat":
        return hpo.BOHB(*args, hpbandster_compat=True, seed=seed)
    if kind == "bohb_fixed":
        return hpo.BOHB(*args, bandwidth="fixed", seed=seed)
    if kind == "bohb_multivariate":
        return hpo.BOHB(*args, kde="multivariate", random_placement="every", bandwidth="fixed", seed=seed)
    if kind == "bohb_hpbandster":
        return hpo.BOHB(
            *args, bandwidth_floor=0.0, kde="multivariate", random_placement="every", bandwidth="fixed", seed=seed
        )
    return hpo.BOHB(*args, seed=seed)


def run_accelops(kind, problem, seed, rng, accounting="resume"):
    return run_optimizer(make_accelops(kind, problem, seed), problem, rng, accounting)


def run_optimizer(opt, problem, rng, accounting="resume"):
    """Drive an accelops optimiser by ask/tell until it stops or the next evaluation would pass
    the problem's total budget (bench/hpo_dev.py runs its variants through this too)."""
    runs = Runs(problem, accounting)
    evals, choose, spent = [], [], 0.0
    while True:
        t0 = time.perf_counter()
        trial = opt.ask()
        dt = time.perf_counter() - t0
        if trial is None:
            break
        cost = runs.cost(trial.config_id, trial.budget)
        if spent + cost > problem.total_budget + 1e-9:
            break
        if not trial.rung:  # rung 0 (or no rung): a newly chosen configuration
            choose.append(dt)
        loss = runs.evaluate(trial.config_id, trial.config, trial.budget, rng)
        opt.tell(trial, loss)
        spent += cost
        evals.append((trial.budget, dict(trial.config), loss, cost))
    return {"evals": evals, "choose_s": choose}


def _hpbandster_iterations(problem, accounting="resume") -> int:
    """HpBandSter brackets (its 'iterations') needed to spend the total budget."""
    from accelops.hpo import hyperband_brackets

    plans = hyperband_brackets(problem.min_budget, problem.max_budget, problem.eta, hpbandster_compat=True)
    total, n = 0.0, 0
    while total < problem.total_budget:
        p = plans[n % len(plans)]
        if accounting == "resume":
            previous = (0.0,) + tuple(p.budgets[:-1])
            total += sum(s * (b - a) for s, b, a in zip(p.sizes, p.budgets, previous))
        else:
            total += sum(s * b for s, b in zip(p.sizes, p.budgets))
        n += 1
    return n


def run_hpbandster(problem, seed, rng, accounting="resume"):
    import hpbandster.core.nameserver as hpns
    from hpbandster.core.worker import Worker
    from hpbandster.optimizers import BOHB

    evals = []
    runs = Runs(problem, accounting)

    class W(Worker):
        # HpBandSter passes the configuration's id (the same at every stage of its
        # successive halving) and a working directory per configuration "to store
        # intermediate results on lower budgets that can be reused later for a larger
        # budget" (its Worker.compute doc): the same continuation as accelops' checkpoint_dir.
        def compute(self, config_id, config, budget, **kwargs):
            config, budget = hp.plain(config), float(budget)
            key = tuple(config_id)
            cost = runs.cost(key, budget)
            loss = runs.evaluate(key, config, budget, rng)
            evals.append((budget, config, loss, cost))
            return {"loss": float(loss), "info": {}}

    run_id = f"accelops-bench-{problem.name}-{seed}"
    np.random.seed(seed)
    cs = hp.configspace_space(problem.params, seed)
    with _pyro_pickle():
        ns = hpns.NameServer(run_id=run_id, host="127.0.0.1", port=0)
        host, port = ns.start()
        worker = opt = None
        try:
            # a logger of its own: without one, Worker calls logging.basicConfig(level=DEBUG)
            worker = W(
                nameserver=host,
                nameserver_port=port,
                run_id=run_id,
                logger=logging.getLogger("hpbandster.bench_worker"),
            )
            worker.run(background=True)
            opt = BOHB(
                configspace=cs,
                run_id=run_id,
                nameserver=host,
                nameserver_port=port,
                min_budget=problem.min_budget,
                max_budget=problem.max_budget,
                eta=problem.eta,
                ping_interval=1,
            )
            cg = opt.config_generator
            choose, original = [], cg.get_config

            def timed(budget):
                t0 = time.perf_counter()
                out = original(budget)
                choose.append(time.perf_counter() - t0)
                return out

            cg.get_config = timed
            opt.run(n_iterations=_hpbandster_iterations(problem, accounting), min_n_workers=1)
        finally:
            if opt is not None:
                opt.shutdown(shutdown_workers=True)
            ns.shutdown()
    kept, spent = [], 0.0
    for e in evals:  # one worker: the order they finished in is the order they ran
        if spent + e[3] > problem.total_budget + 1e-9:
            break
        spent += e[3]
        kept.append(e)
    return {"evals": kept, "choose_s": choose[: len(kept)] if choose else []}


def run_optuna(problem, seed, rng):
    import optuna
    from optuna.trial import TrialState

    # HyperbandPruner puts trial n in the bracket crc32(f"{study_name}_{n}") picks, and a study's
    # default name is a fresh UUID: without a fixed name the run does not follow from the seed.
    study = optuna.create_study(
        study_name=f"accelops-bench-{problem.name}-{seed}",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.HyperbandPruner(
            min_resource=int(problem.min_budget), max_resource=int(problem.max_budget), reduction_factor=problem.eta
        ),
    )
    evals, choose, spent = [], [], 0
    top = int(problem.max_budget)
    while spent < problem.total_budget:
        t0 = time.perf_counter()
        trial = study.ask()
        config = hp.optuna_suggest(trial, problem.params)
        choose.append(time.perf_counter() - t0)
        run = problem.start(config)
        state, value = TrialState.COMPLETE, None
        for step in range(1, top + 1):
            if spent + 1 > problem.total_budget:
                state = TrialState.FAIL  # out of budget mid-trial
                break
            value = run.loss(step, rng)
            spent += 1
            evals.append((step, dict(config), value, 1))
            trial.report(value, step)
            if step < top and trial.should_prune():
                state = TrialState.PRUNED
                break
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    return {"evals": evals, "choose_s": choose}


def one_run(problems, pi, key, seed, accounting) -> dict:
    """One optimiser run (one seed on one problem); an exception is a row, not a crash."""
    problem, rng = problems[pi], _noise_rng(pi, seed)
    t0 = time.perf_counter()
    try:
        if OPTIMIZERS[key][1]:
            res = run_accelops(key, problem, seed, rng, accounting)
        elif key == "hpbandster_bohb":
            res = run_hpbandster(problem, seed, rng, accounting)
        else:
            res = run_optuna(problem, seed, rng)
        res["status"] = "ok"
    except Exception as exc:
        res = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    res["wall_s"] = time.perf_counter() - t0
    res["seed"] = seed
    return res


_WORKER = {}


def _init_worker(quick):
    from threadpoolctl import threadpool_limits

    _WORKER["limits"] = threadpool_limits(1)
    _WORKER["quiet"] = _quiet_peers()
    _WORKER["quiet"].__enter__()
    with contextlib.suppress(Exception):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
    _WORKER["problems"] = hp.make_problems(quick)


def _worker_run(pi, key, seed, accounting):
    res = one_run(_WORKER["problems"], pi, key, seed, accounting)
    for e in res.get("evals", ()):  # plain Python values across the process boundary
        e[1].update(hp.plain(e[1]))
    return res


# --------------------------------------------------------------------------- regret


def incumbent_trace(evals):
    """-> [(cumulative cost, incumbent config)] after each evaluation (incumbent: the
    lowest loss at the largest budget evaluated so far). An evaluation is (budget, config,
    loss, cost): cost = budget, except for Optuna's trials, which continue step by step
    (cost 1 a step)."""
    out, spent, top, best = [], 0.0, -math.inf, None
    for budget, config, loss, cost in evals:
        spent += cost
        if budget > top + 1e-9:
            top, best = budget, (loss, config)
        elif abs(budget - top) <= 1e-9 and loss < best[0]:
            best = (loss, config)
        out.append((spent, best[1]))
    return out


def regret_curve(trace, values, optimum, grid):
    """Regret of the incumbent at each cumulative budget of ``grid`` (NaN before the first)."""
    out, j, current = [], 0, math.nan
    for g in grid:
        while j < len(trace) and trace[j][0] <= g + 1e-9:
            current = values[hp.config_key(trace[j][1])] - optimum
            j += 1
        out.append(current)
    return out


# --------------------------------------------------------------------------- ask-time at N observations


def ask_time_rows(cfg, problem, n_obs, repeats, meta, skip):
    """Each optimiser's time to choose a configuration with ``n_obs`` full-budget
    observations in its model (random configurations of ``problem``'s space)."""
    from accelops import hpo

    rng = np.random.default_rng(123)
    space = hp.accelops_space(problem.params)
    configs = [space.sample(rng) for _ in range(n_obs)]
    losses = [problem.true_value(c) if problem.optimum is not None else float(rng.random()) for c in configs]
    rows = []
    base = {
        **meta,
        "family": FAMILY,
        "kind": "ask_time",
        "problem": problem.name,
        "observations": n_obs,
        "dims": len(problem.params),
    }

    def row(key, times, extra=None, status="ok", reason=None):
        r = {**base, "optimizer": key, "label": OPTIMIZERS[key][0], "accelops": OPTIMIZERS[key][1], "status": status}
        if status == "ok":
            ms = sorted(t * 1e3 for t in times)
            r.update(
                median_ms=common.percentile(ms, 0.5),
                p20_ms=common.percentile(ms, 0.2),
                p80_ms=common.percentile(ms, 0.8),
                repeats=len(ms),
                **(extra or {}),
            )
        else:
            r["reason"] = reason
        rows.append(r)

    # accelops BOHB: observations straight into the model (as tell() puts them), then ask()
    opt = hpo.BOHB(space, problem.min_budget, problem.max_budget, problem.eta, seed=0)
    for c, loss in zip(configs, losses):
        opt.model.observe(c, problem.max_budget, loss)
    times, model_based = [], []
    for _ in range(max(repeats, 200 if not cfg.quick else repeats)):
        t0 = time.perf_counter()
        trial = opt.ask()
        times.append(time.perf_counter() - t0)
        model_based.append(bool(trial.info.get("model_based")))
    mb = sorted(t * 1e3 for t, m in zip(times, model_based) if m)
    row(
        "bohb",
        times,
        {
            "model_based_fraction": float(np.mean(model_based)),
            "model_based_median_ms": common.percentile(mb, 0.5) if mb else None,
        },
    )

    if skip.get("hpbandster_bohb"):
        row("hpbandster_bohb", None, status="skipped", reason=skip["hpbandster_bohb"])
    else:
        try:
            from hpbandster.core.dispatcher import Job
            from hpbandster.optimizers.config_generators.bohb import BOHB as CG

            np.random.seed(0)
            cg = CG(hp.configspace_space(problem.params, 0))
            for i, (c, loss) in enumerate(zip(configs, losses)):
                job = Job((0, 0, i), budget=float(problem.max_budget), config=c)
                job.result, job.exception = {"loss": loss}, None
                cg.new_result(job, update_model=(i == n_obs - 1))
            times, picks = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _, info = cg.get_config(float(problem.max_budget))
                times.append(time.perf_counter() - t0)
                picks.append(bool(info.get("model_based_pick")))
            mb = sorted(t * 1e3 for t, m in zip(times, picks) if m)
            row(
                "hpbandster_bohb",
                times,
                {
                    "model_based_fraction": float(np.mean(picks)),
                    "model_based_median_ms": common.percentile(mb, 0.5) if mb else None,
                },
            )
        except Exception as exc:
            row("hpbandster_bohb", None, status="error", reason=f"{type(exc).__name__}: {exc}"[:500])

    if skip.get("optuna_tpe_hb"):
        row("optuna_tpe_hb", None, status="skipped", reason=skip["optuna_tpe_hb"])
    else:
        try:
            import optuna

            dists = hp.optuna_distributions(problem.params)
            study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
            study.add_trials(
                [
                    optuna.trial.create_trial(params=hp.plain(c), distributions=dists, value=loss)
                    for c, loss in zip(configs, losses)
                ]
            )
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                trial = study.ask()
                hp.optuna_suggest(trial, problem.params)
                times.append(time.perf_counter() - t0)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)  # not an observation
            row("optuna_tpe_hb", times, {"note": "TPESampler defaults (independent sampling)"})
        except Exception as exc:
            row("optuna_tpe_hb", None, status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
    for r in rows:
        common.append_row(cfg.results_file(FAMILY), r)
    return rows


# --------------------------------------------------------------------------- plots


def plot_curves(path, problems, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4.2))
    axes = np.atleast_1d(axes)
    for ax, problem in zip(axes, problems):
        for key, (label, _) in OPTIMIZERS.items():
            c = curves.get((problem.name, key))
            if c is None:
                continue
            grid, runs = np.asarray(c["grid"]), np.asarray(c["regret"], dtype=float)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # all-NaN columns before the first evaluation
                med = np.nanmedian(runs, axis=0)
                lo, hi = np.nanpercentile(runs, 20, axis=0), np.nanpercentile(runs, 80, axis=0)
            floor = 1e-6
            (line,) = ax.plot(grid, np.maximum(med, floor), label=label, lw=1.6, ls="-" if OPTIMIZERS[key][1] else "--")
            ax.fill_between(grid, np.maximum(lo, floor), np.maximum(hi, floor), color=line.get_color(), alpha=0.12)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"cumulative budget ({problem.unit})")
        ax.set_ylabel("regret (median, p20-p80 band)")
        ax.set_title(problem.name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the family


def _nan_as_null(values) -> list:
    return [None if math.isnan(v) else float(v) for v in values]


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def run(cfg: common.Config) -> common.FamilyResult:
    from threadpoolctl import threadpool_limits

    meta = common.run_metadata(cfg)
    meta["versions"].update({d.lower(): common._version(d) for d in PEER_DISTS})
    out_path = cfg.results_file(FAMILY)
    t_start = time.perf_counter()
    n_seeds = SETTINGS["seeds"] or (2 if cfg.quick else 100)
    seeds = list(range(n_seeds))
    accounting = SETTINGS["accounting"]
    meta["accounting"] = accounting
    problems = hp.make_problems(cfg.quick)
    skip = {"hpbandster_bohb": import_hpbandster(), "optuna_tpe_hb": import_optuna()}
    if not skip["optuna_tpe_hb"]:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)

    runs = {}  # (problem, optimiser) -> list of per-seed results
    jobs = max(1, int(SETTINGS.get("jobs") or 1))
    meta["jobs"] = jobs
    with threadpool_limits(1), _quiet_peers():
        tasks = [
            (pi, key, seed) for pi in range(len(problems)) for key in OPTIMIZERS if not skip.get(key) for seed in seeds
        ]
        total, done = len(tasks), 0

        def record(task, res):
            nonlocal done
            pi, key, seed = task
            runs.setdefault((problems[pi].name, key), []).append(res)
            done += 1
            print(
                f"hpo: {problems[pi].name} {key} seed {seed}: {res['status']}, {res['wall_s']:.1f} s ({done}/{total})",
                file=sys.stderr,
                flush=True,
            )

        if jobs == 1:
            for task in tasks:
                record(task, one_run(problems, *task, accounting))
        else:  # independent runs in worker processes (spawned); each result is a function of its task
            import concurrent.futures as cf
            import multiprocessing as mp

            with cf.ProcessPoolExecutor(
                jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(cfg.quick,)
            ) as pool:
                futures = [pool.submit(_worker_run, *task, accounting) for task in tasks]
                for task, fut in zip(tasks, futures):
                    record(task, fut.result())
        for results in runs.values():
            results.sort(key=lambda r: r["seed"])

        # true full-budget values of every incumbent, and the MLP's empirical optimum
        rows, curves = [], {}
        for problem in problems:
            for key in OPTIMIZERS:
                for res in runs.get((problem.name, key), []):
                    if res["status"] != "ok":
                        continue
                    res["trace"] = incumbent_trace(res["evals"])
                    for budget, config, loss, _ in res["evals"]:
                        if problem.optimum is None and abs(budget - problem.max_budget) < 1e-9:
                            problem.cache.setdefault(hp.config_key(config), loss)  # deterministic
                    for _, config in res["trace"]:
                        problem.true_value(config)
            optimum = problem.optimum
            if optimum is None:
                optimum = min(problem.cache.values()) if problem.cache else math.nan
            problem.reference = optimum
            # no full-budget evaluation in this run (the MLP): no optimum, written as null with
            # the reason (rows refuse NaN)
            optimum_or_null = optimum if math.isfinite(optimum) else None
            if problem.optimum is not None:
                optimum_kind = "known"
            elif optimum_or_null is not None:
                optimum_kind = "best found in this run"
            else:
                optimum_kind = "none: no configuration reached the full budget in this run"
            values = problem.cache
            grid = np.unique(np.geomspace(problem.min_budget, problem.total_budget, 60).round(6))
            for key, (label, is_accelops) in OPTIMIZERS.items():
                row = {
                    **meta,
                    "family": FAMILY,
                    "kind": "regret",
                    "problem": problem.name,
                    "optimizer": key,
                    "label": label,
                    "accelops": is_accelops,
                    "min_budget": problem.min_budget,
                    "max_budget": problem.max_budget,
                    "eta": problem.eta,
                    "total_budget": problem.total_budget,
                    "budget_unit": problem.unit,
                    "optimum": optimum_or_null,
                    "optimum_kind": optimum_kind,
                    "seeds": len(seeds),
                }
                if key.startswith("bohb"):
                    made = make_accelops(key, problem, 0)
                    row.update(
                        bandwidth_floor=made.model.bandwidth_floor,
                        kde=made.model.kde,
                        random_placement=made.random_placement,
                        bandwidth=made.model.bandwidth,
                    )
                results = runs.get((problem.name, key))
                if skip.get(key):
                    row.update(status="skipped", reason=skip[key])
                elif not results or any(r["status"] != "ok" for r in results):
                    bad = next((r for r in results or [] if r["status"] != "ok"), {})
                    row.update(status="error", reason=bad.get("reason", "no result"))
                else:
                    final = [regret_curve(r["trace"], values, optimum, [problem.total_budget])[0] for r in results]
                    undefined = sum(not math.isfinite(f) for f in final)
                    if undefined:
                        # a seed with no finished evaluation by the total budget (or no optimum to
                        # measure against) has no regret: an error row with the reason, not NaN
                        row.update(
                            status="error",
                            reason=f"final regret undefined for {undefined} of {len(final)} "
                            "seeds: no incumbent by the total budget, or no optimum",
                        )
                    else:
                        choose_ms = [t * 1e3 for r in results for t in r["choose_s"]]
                        row.update(
                            status="ok",
                            final_regret=final,
                            final_regret_mean=float(np.mean(final)),
                            final_regret_std=float(np.std(final)),
                            final_regret_ci95=bootstrap_ci(final),
                            **{f"final_regret_{k}": v for k, v in _percentiles(final).items()},
                            evaluations_mean=float(np.mean([len(r["evals"]) for r in results])),
                            full_budget_evaluations_mean=float(
                                np.mean(
                                    [sum(abs(e[0] - problem.max_budget) < 1e-9 for e in r["evals"]) for r in results]
                                )
                            ),
                            budget_spent_mean=float(np.mean([sum(e[3] for e in r["evals"]) for r in results])),
                            choose_ms_median=common.percentile(sorted(choose_ms), 0.5) if choose_ms else None,
                            choose_ms_p80=common.percentile(sorted(choose_ms), 0.8) if choose_ms else None,
                            configs_chosen_mean=float(np.mean([len(r["choose_s"]) for r in results])),
                            wall_s_mean=float(np.mean([r["wall_s"] for r in results])),
                        )
                        curve = [regret_curve(r["trace"], values, optimum, grid) for r in results]
                        curves[(problem.name, key)] = {"grid": grid.tolist(), "regret": curve}
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            median = np.nanmedian(np.asarray(curve, dtype=float), axis=0)
                            mean = np.nanmean(np.asarray(curve, dtype=float), axis=0)
                        # before any seed's first evaluation finishes the regret is undefined: null
                        # (rows refuse NaN), and the reason beside it
                        row["curve"] = {
                            "budget": grid.tolist(),
                            "median": _nan_as_null(median),
                            "mean": _nan_as_null(mean),
                        }
                        if any(math.isnan(v) for v in median):
                            row["curve"]["null"] = "no seed had finished an evaluation by that budget: no regret"
                row["loadavg_1m"] = os.getloadavg()[0]
                common.append_row(out_path, row)
                rows.append(row)

        # the dedicated ask-time measurement
        n_obs, repeats = (100, 5) if cfg.quick else (500, 30)
        ask_rows = []
        for problem in problems[1:]:  # Hartmann-6 (6 floats) and the MLP's mixed space
            ask_rows += ask_time_rows(cfg, problem, n_obs, repeats, meta, skip)

    png = cfg.results_dir / ("hpo_regret_quick.png" if cfg.quick else "hpo_regret.png")
    plot_note = ""
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_curves(png, problems, curves)
        plot_note = f"Regret curves: `{png.name}` (median over seeds, p20-p80 band, log-log)."
    except Exception as exc:  # matplotlib missing: the rows and the summary still stand
        plot_note = f"Regret curves not drawn: {type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t_start
    summary = summarize(rows, ask_rows, problems, cfg, meta, wall, plot_note, n_obs)
    failures = [
        f"{r['problem']} {r['optimizer']}: {r['status']}: {r.get('reason')}"
        for r in rows + ask_rows
        if r["accelops"] and r["status"] not in ("ok", "skipped")
    ]
    return common.FamilyResult(FAMILY, summary, rows + ask_rows, failures)


def summarize(rows, ask_rows, problems, cfg, meta, wall_s, plot_note, n_obs) -> str:
    head = common.run_header(FAMILY, meta, cfg, 1, wall_s, versions=("python",))
    v = meta["versions"]
    out = [
        "## Hyperparameter optimisation benchmark",
        "",
        *head,
        f"Peers: hpbandster {v.get('hpbandster')} (ConfigSpace {v.get('configspace')}, statsmodels "
        f"{v.get('statsmodels')}, Pyro4 {v.get('pyro4')}), optuna {v.get('optuna')}. {rows[0]['seeds']} seeds "
        "per problem and optimiser, one worker, numpy on one thread.",
        "",
    ]
    if meta.get("accounting") == "resume":
        out += [
            "Accounting `resume`: a configuration evaluated again at a larger budget continues its run and "
            "costs only the budget it adds, for every optimiser that can continue: accelops (its "
            "`checkpoint_dir`), HpBandSter (its worker's `config_id` / `working_directory`) and Optuna (a "
            "trial reports step by step). RandomSearch evaluates each configuration once.",
            "",
        ]
    else:
        out += [
            "Accounting `full`: accelops and HpBandSter pay every evaluation's budget, a promoted "
            "configuration starts over; Optuna's trials still continue step by step (cost 1 a step).",
            "",
        ]
    budgets = "; ".join(
        f"{p.name}: budgets {p.min_budget:g}..{p.max_budget:g} {p.unit}, eta {p.eta}, total {p.total_budget:g} per run"
        for p in problems
    )
    out += [
        f"Equal total budget per optimiser run ({budgets}). Final regret = full-budget noise-free value of "
        "the incumbent minus the optimum when the budget is spent (digits MLP: minus the best full-budget "
        f"validation loss found in this run, {_fmt(getattr(problems[-1], 'reference', None), 5)}). "
        "Time to choose: median over every new configuration of the runs.",
        "",
    ]
    table = []
    for r in rows:
        if r["status"] == "ok":
            lo, hi = r["final_regret_ci95"]
            table.append(
                [
                    r["problem"],
                    r["label"],
                    _fmt(r["final_regret_mean"]),
                    f"{_fmt(lo)} - {_fmt(hi)}",
                    _fmt(r["final_regret_std"]),
                    f"{_fmt(r['final_regret_p20'])} / {_fmt(r['final_regret_p50'])} / {_fmt(r['final_regret_p80'])}",
                    _fmt(max(r["final_regret"])),
                    f"{r['evaluations_mean']:.0f}",
                    f"{r['full_budget_evaluations_mean']:.0f}",
                    f"{r['budget_spent_mean']:.0f}",
                    f"{_fmt(r['choose_ms_median'])} ms",
                    f"{r['wall_s_mean']:.2f} s",
                ]
            )
        else:
            table.append([r["problem"], r["label"], f"{r['status']}: {r.get('reason')}", *[""] * 10])
    out += [
        common.md_table(
            [
                "problem",
                "optimiser",
                "final regret mean",
                "95% CI of the mean",
                "std",
                "p20 / p50 / p80",
                "max",
                "evaluations",
                "at full budget",
                "budget spent",
                "time to choose",
                "wall per run",
            ],
            table,
        ),
        "",
        '95% CI: percentile bootstrap of the mean over the seeds (10,000 resamples). "at full budget": '
        "evaluations at the largest budget (Optuna: steps reaching it).",
        "",
        plot_note,
        "",
    ]

    out += [
        f"Time to choose a configuration with {n_obs} full-budget observations in the model (random "
        "configurations; accelops: ask(), HpBandSter: config generator get_config, Optuna: study.ask() + "
        "suggest calls):",
        "",
    ]
    table = []
    for r in ask_rows:
        if r["status"] == "ok":
            mbf = r.get("model_based_fraction")
            table.append(
                [
                    r["problem"],
                    f"{r['dims']}",
                    r["label"],
                    f"{_fmt(r['median_ms'])} ms ({_fmt(r['p20_ms'])} - {_fmt(r['p80_ms'])})",
                    "-" if mbf is None else f"{mbf:.2f}",
                    f"{_fmt(r.get('model_based_median_ms'))} ms" if r.get("model_based_median_ms") is not None else "-",
                    r["repeats"],
                ]
            )
        else:
            table.append([r["problem"], f"{r['dims']}", r["label"], f"{r['status']}: {r.get('reason')}", "", "", ""])
    out += [
        common.md_table(
            ["space", "dims", "optimiser", "median (p20 - p80)", "model-based share", "model-based median", "calls"],
            table,
        ),
        "",
    ]

    # targets
    lines = []
    by = {(r["problem"], r["optimizer"]): r for r in rows}
    for key in ("bohb", "bohb_hpbandster"):
        for p in problems:
            mine = by.get((p.name, key))
            for peer in ("hpbandster_bohb", "optuna_tpe_hb"):
                other = by.get((p.name, peer))
                name = OPTIMIZERS[key][0]
                if mine is None or mine["status"] != "ok" or other is None or other["status"] != "ok":
                    why = (
                        (other or {}).get("reason")
                        if (other or {}).get("status") != "ok"
                        else (mine or {}).get("reason")
                    )
                    lines.append(f"- {p.name}: {name} mean final regret <= {OPTIMIZERS[peer][0]}'s: n/a ({why})")
                    continue
                ok = mine["final_regret_mean"] <= other["final_regret_mean"]
                lo, hi = bootstrap_diff_ci(mine["final_regret"], other["final_regret"])
                sig = (
                    "the difference is within the noise"
                    if lo <= 0 <= hi
                    else ("significantly better" if hi < 0 else "significantly worse")
                )
                lines.append(
                    f"- {p.name}: {name} mean final regret {_fmt(mine['final_regret_mean'])} <= "
                    f"{OPTIMIZERS[peer][0]}'s {_fmt(other['final_regret_mean'])}: "
                    f"{'met' if ok else 'MISSED'} (difference {_fmt(lo)} .. {_fmt(hi)}, 95% bootstrap: "
                    f"{sig})"
                )
    for r in ask_rows:
        if r["optimizer"] == "bohb" and r["status"] == "ok":
            ok = r["median_ms"] <= ASK_TARGET_MS
            mark = (
                ("met" if ok else "MISSED")
                if r["observations"] >= 500
                else f"{'met' if ok else 'MISSED'} at {r['observations']} observations (--quick; the target is at 500)"
            )
            lines.append(
                f"- {r['problem']} space: accelops BOHB median ask() {_fmt(r['median_ms'])} ms <= "
                f"{ASK_TARGET_MS:g} ms with {r['observations']} observations: {mark}"
            )
    out += ["Targets:", "", *lines, ""]
    return "\n".join(out)


def main(argv=None) -> int:
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--seeds", type=int, default=None, help="seeds per problem and optimiser (100; --quick: 2)")
    pre.add_argument(
        "--accounting",
        choices=ACCOUNTINGS,
        default="resume",
        help="resume (default): a promoted configuration costs the budget it adds; full: every rung",
    )
    pre.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="optimiser runs in parallel worker processes (1: in this process); regret does not "
        "depend on it, wall and ask times do",
    )
    known, rest = pre.parse_known_args(argv)
    if known.seeds is not None and known.seeds < 1:
        pre.error("--seeds must be >= 1")
    SETTINGS.update(seeds=known.seeds, accounting=known.accounting, jobs=known.jobs)
    return common.family_main(__doc__, run, rest)


if __name__ == "__main__":
    sys.exit(main())
