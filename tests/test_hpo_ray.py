"""accelops.hpo.Study with executor="ray": the same trials and losses as the process pool,
timeouts cancel the Ray task, a task whose worker dies fails only its trial, and
checkpoint-aware objectives resume promoted trials. Ray is optional: without it these are
skipped with the reason and test_hpo_study.py checks the error message instead."""
import os

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]')")

from accelops import hpo  # noqa: E402
from tests import hpo_objectives as objectives  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A local two-CPU Ray instance for this module (the executor joins it instead of
    starting its own); the tests' objectives are importable by the workers through the
    repository root on their PYTHONPATH."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}})
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


def test_ray_warns_when_the_cluster_has_fewer_cpus_than_workers():
    study = hpo.Study(hpo.RandomSearch(small_space(), budget=1, seed=0))
    with pytest.warns(UserWarning, match=r"2 CPUs for n_workers=3.*counts from submission"):
        study.optimize(objectives.quadratic, n_trials=3, n_workers=3, timeout_per_trial=30.0, executor="ray")
    assert all(r.ok for r in study.results)
