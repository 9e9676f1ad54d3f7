"""Development-seed comparison of BOHB settings, for choosing options without looking at the
evaluation seeds of bench_hpo.py (0..99).

Each variant is a set of accelops BOHB keyword arguments; every run uses bench_hpo's
problems, budgets, cost rule (``resume``) and incumbent rule, so a mean here is what the
benchmark would report on the same seeds. Peers (Optuna, HpBandSter) are deterministic per
seed, so their results are cached in a JSON file and computed once.

    python bench/hpo_dev.py --problems branin,hartmann6 --seeds 100:300 \\
        --variant defaults='{}' --variant floor0='{"bandwidth_floor": 0}' [--peers optuna,hpbandster]

Prints, per problem and variant, the mean final regret (the MLP: the incumbent's full-budget
validation loss, since its optimum is not known), its standard error, the median and the
mean number of full-budget evaluations. Seeds below 100 are refused: they are the
evaluation seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time

import bench_hpo as bh
import hpo_problems as hp
import numpy as np

EVALUATION_SEEDS = 100  # bench_hpo uses seeds 0..99
PEERS = ("optuna", "hpbandster")
run_optimizer = bh.run_optimizer  # the benchmark's own ask/tell loop, budget and cost rule
_PROBLEMS: list = []


def parse_seeds(text: str) -> list[int]:
    """'100:300' -> 100..299; '100,105' -> [100, 105]."""
    if ":" in text:
        lo, hi = (int(t) for t in text.split(":"))
        seeds = list(range(lo, hi))
    else:
        seeds = [int(t) for t in text.split(",") if t]
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed")
    if min(seeds) < EVALUATION_SEEDS:
        raise ValueError(f"--seeds {text!r}: seeds below {EVALUATION_SEEDS} are bench_hpo's evaluation seeds")
    return seeds


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, kwargs = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: expected NAME=JSON")
    if name in PEERS:
        raise ValueError(f"--variant {text!r}: {name!r} is a peer's name")
    value = json.loads(kwargs)
    if not isinstance(value, dict):
        raise ValueError(f"--variant {text!r}: the JSON must be an object of BOHB keyword arguments")
    return name, value


def _init(quick: bool):
    from threadpoolctl import threadpool_limits

    global _LIMITS
    _LIMITS = threadpool_limits(1)
    _PROBLEMS[:] = hp.make_problems(quick)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
    except ImportError:
        pass


def _run(task):
    """One optimiser run -> (problem index, name, seed, final true value, full-budget evaluations)."""
    pi, name, seed, kwargs = task  # kwargs None: the peer ``name``
    problem, rng = _PROBLEMS[pi], bh._noise_rng(pi, seed)
    if kwargs is None and name == "optuna":
        res = bh.run_optuna(problem, seed, rng)
    elif kwargs is None:
        with bh._quiet_peers():
            res = bh.run_hpbandster(problem, seed, rng)
    else:
        from accelops import hpo

        space = hp.accelops_space(problem.params)
        opt = hpo.BOHB(space, problem.min_budget, problem.max_budget, problem.eta, seed=seed, **kwargs)
        res = run_optimizer(opt, problem, rng)
    incumbent = bh.incumbent_trace(res["evals"])[-1][1]
    full = sum(abs(e[0] - problem.max_budget) < 1e-9 for e in res["evals"])
    return pi, name, seed, float(problem.true_value(incumbent)), int(full)


def compare(
    variants: dict, problems: list[int], seeds: list[int], peers=("optuna",), cache_path=None, jobs=2, quick=False
) -> list[dict]:
    """-> one row per (problem, variant or peer): mean, se, median of the final regret, mean
    full-budget evaluations."""
    for peer in peers:
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")
    clash = sorted(set(variants) & set(PEERS))
    if clash:
        raise ValueError(f"variant name(s) {clash} are peer names; rename them")
    cache = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    tag = "quick/" if quick else ""
    tasks = [(pi, v, s, kw) for pi in problems for v, kw in variants.items() for s in seeds]
    tasks += [(pi, p, s, None) for pi in problems for p in peers for s in seeds if f"{tag}{pi}/{p}/{s}" not in cache]
    results = {}
    ctx = mp.get_context("fork")
    with ctx.Pool(max(1, jobs), initializer=_init, initargs=(quick,)) as pool:
        for pi, name, seed, value, full in pool.imap_unordered(_run, tasks, chunksize=2):
            results[(pi, name, seed)] = (value, full)
            if name in peers:
                cache[f"{tag}{pi}/{name}/{seed}"] = [value, full]
    if cache_path:
        tmp = f"{cache_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)
    rows = []
    all_problems = hp.make_problems(quick)
    for pi in problems:
        problem = all_problems[pi]
        optimum = problem.optimum if problem.optimum is not None else 0.0
        for name in list(variants) + list(peers):
            vals = [results.get((pi, name, s)) or tuple(cache[f"{tag}{pi}/{name}/{s}"]) for s in seeds]
            regret = np.array([v[0] for v in vals]) - optimum
            rows.append(
                {
                    "problem": problem.name,
                    "name": name,
                    "mean": float(regret.mean()),
                    "se": float(regret.std() / math.sqrt(len(regret))),
                    "median": float(np.median(regret)),
                    "full_budget": float(np.mean([v[1] for v in vals])),
                    "seeds": len(seeds),
                }
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default="branin,hartmann6", help="names from bench/hpo_problems.py")
    ap.add_argument("--seeds", default="100:300", help="LO:HI or a comma list, all >= 100")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON of BOHB keyword arguments")
    ap.add_argument("--peers", default="optuna", help="comma list of optuna, hpbandster ('' for none)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/accelops/hpo_dev_peers.json"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="bench_hpo's --quick budgets")
    args = ap.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        variants = dict(parse_variant(v) for v in args.variant) or {"defaults": {}}
        names = [p.name for p in hp.make_problems(args.quick)]
        wanted = [p for p in args.problems.split(",") if p]
        unknown = [p for p in wanted if p not in names]
        if unknown:
            raise ValueError(f"unknown problem(s) {unknown}; choose from {names}")
    except ValueError as exc:
        ap.error(str(exc))
    os.makedirs(os.path.dirname(args.cache) or ".", exist_ok=True)
    t0 = time.perf_counter()
    rows = compare(
        variants,
        [names.index(p) for p in wanted],
        seeds,
        tuple(p for p in args.peers.split(",") if p),
        args.cache,
        args.jobs,
        args.quick,
    )
    for r in rows:
        print(
            f"{r['problem']:10s} {r['name']:24s} mean {r['mean']:.4f} se {r['se']:.4f} "
            f"p50 {r['median']:.4f} full-budget evaluations {r['full_budget']:.1f}"
        )
    print(f"{len(seeds)} seeds, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
