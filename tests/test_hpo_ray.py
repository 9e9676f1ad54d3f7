"""accelops.hpo.Study with executor="ray": the same trials and losses as the process pool,
timeouts cancel the Ray task and count from the task's start (not while it is queued), a
task whose worker dies fails only its trial, and checkpoint-aware objectives resume
promoted trials. Ray is optional: without it these are
skipped with the reason and test_hpo_study.py checks the error message instead."""

import os
import warnings

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]')")

from accelops import hpo  # noqa: E402
from tests import hpo_objectives as objectives  # noqa: E402
from tests.test_hpo_study import process_is_gone  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A local two-CPU Ray instance for this module (the executor joins it instead of
    starting its own); the tests' objectives are importable by the workers through the
    repository root on their PYTHONPATH."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}},
    )
    yield
    ray.shutdown()


def small_space():
    return hpo.SearchSpace({"x": hpo.Float(0.0, 1.0), "k": hpo.Int(0, 4)})


def trials(study):
    return sorted((r.trial.config_id, r.trial.budget, r.status, r.loss) for r in study.results)


def test_ray_two_workers_match_the_process_pool(tmp_path):
    def run(executor):
        opt = hpo.Hyperband(small_space(), min_budget=1, max_budget=9, eta=3, n_brackets=2, seed=0)
        study = hpo.Study(opt, journal=tmp_path / f"{executor}.jsonl")
        best = study.optimize(objectives.sleepy, n_workers=2, executor=executor)
        return study, best

    on_ray, best = run("ray")
    in_pool, pool_best = run("process")
    assert len(on_ray.results) == 9 + 3 + 1 + 5 + 1 and all(r.ok for r in on_ray.results)
    assert trials(on_ray) == trials(in_pool)
    assert (best.trial.config, best.loss) == (pool_best.trial.config, pool_best.loss)
    assert {r.info["pid"] for r in on_ray.results}.isdisjoint({os.getpid()})
    resumed = hpo.Study.resume(tmp_path / "ray.jsonl")
    assert trials(resumed) == trials(on_ray)


def test_ray_timeout_cancels_and_a_dead_worker_fails_one_trial():
    opt = hpo.GridSearch(small_space(), budget=1, resolution={"x": 11, "k": 1})  # x = 0, 0.1, ..., 1
    study = hpo.Study(opt)
    study.optimize(objectives.misbehaving, n_workers=2, timeout_per_trial=3.0, executor="ray")
    by_x = {round(r.config["x"], 1): r for r in study.results}
    assert len(by_x) == 11
    for x in (0.0, 0.1):  # sleep 60 s
        assert by_x[x].status == "timeout" and "Ray task cancelled" in by_x[x].error
    assert by_x[0.2].status == "failed" and by_x[0.2].loss is None  # os._exit(3) in the worker
    assert "WorkerCrashedError" in by_x[0.2].error, by_x[0.2].error
    assert all(by_x[x].ok for x in by_x if x >= 0.3)


def test_ray_checkpoint_aware_objective_resumes_promoted_trials(tmp_path):
    opt = hpo.Hyperband(small_space(), min_budget=1, max_budget=9, eta=3, n_brackets=1, seed=0)
    study = hpo.Study(opt, journal=tmp_path / "c.jsonl")
    study.optimize(objectives.resumable, n_workers=2, executor="ray")
    assert sorted(r.budget for r in study.results) == [1] * 9 + [3] * 3 + [9]
    assert sum(r.info["work"] for r in study.results) == 6 * 1 + 2 * 3 + 9


def test_ray_timeout_counts_from_the_trials_start(tmp_path):
    """Six trials at once on two CPUs: four wait in Ray's queue, for longer than the 4 s
    timeout, and trials that run 1.5 s from their own start are not timeouts; the one that
    hangs still is, and its Ray worker is killed. No warning about the queue either."""
    timeout = 4.0
    opt = hpo.GridSearch(small_space(), budget=1, resolution={"x": 6, "k": 1})  # x = 0, 0.2, ..., 1
    study = hpo.Study(opt, checkpoint_dir=tmp_path)
    objective = objectives.Naps(load_s=0.5, run_s=1.5, hang=(0.0, 0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study.optimize(objective, n_workers=6, timeout_per_trial=timeout, executor="ray")
    by_x = {round(r.config["x"], 1): r for r in study.results}
    assert sorted(by_x) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    hung = by_x.pop(0.0)
    assert all(r.ok for r in by_x.values()), [(x, r.status, r.error) for x, r in by_x.items()]
    assert hung.status == "timeout" and "Ray task cancelled" in hung.error, hung.error
    assert hung.duration >= timeout
    with open(tmp_path / f"config_{hung.trial.config_id}" / "pid") as f:
        assert process_is_gone(int(f.read()))
    # some waited in the queue: from submission they ran past the timeout
    assert max(r.info["end"] - r.started for r in by_x.values()) > timeout
    assert not [w for w in caught if "executor='ray'" in str(w.message)]
