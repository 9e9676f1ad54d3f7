"""accelops.hpo.Study: journal, crash-safe resume, reproducibility, failures, timeouts,
the process-pool executor and checkpoint-aware objectives (the Ray executor: test_hpo_ray.py)."""

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from accelops import hpo
from tests import hpo_objectives as objectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_space():
    return hpo.SearchSpace({"x": hpo.Float(0.0, 1.0), "k": hpo.Int(0, 4)})


def make_bohb(seed=0):
    return hpo.BOHB(small_space(), min_budget=1, max_budget=9, eta=3, seed=seed)


def sequence(results):
    return [(r.trial.id, r.trial.config_id, r.trial.config, r.trial.budget, r.status, r.loss) for r in results]


def ask_tell_loop(opt, objective, max_budget_total):
    """The loop Study.optimize runs with one worker, written out by hand."""
    out, spent = [], 0
    while spent < max_budget_total:
        t = opt.ask()
        if t is None:
            break
        spent += t.budget
        loss = objective(t.config, t.budget)
        opt.tell(t, loss)
        out.append((t.id, t.config_id, t.config, t.budget, "ok", loss))
    return out


BUDGET = 150  # BOHB 1..9: brackets of 9+3+1, 5+1, 3 -> about 12 brackets' worth of budget


def test_plain_run_equals_ask_tell_and_is_seeded(tmp_path):
    study = hpo.Study(make_bohb(0), journal=tmp_path / "a.jsonl")
    best = study.optimize(objectives.quadratic, max_budget_total=BUDGET)
    plain = sequence(study.results)
    assert plain == ask_tell_loop(make_bohb(0), objectives.quadratic, BUDGET)
    assert sum(r.budget for r in study.results) >= BUDGET
    assert any(r.trial.info.get("model_based") for r in study.results)
    again = hpo.Study(make_bohb(0)).optimize(objectives.quadratic, max_budget_total=BUDGET)
    assert again.loss == best.loss and again.config == best.config
    other = hpo.Study(make_bohb(1))
    other.optimize(objectives.quadratic, max_budget_total=BUDGET)
    assert sequence(other.results) != plain
    # best: the lowest loss at the largest budget
    top = [r for r in study.results if r.budget == 9]
    assert best.budget == 9 and best.loss == min(r.loss for r in top)
    # the journal: a header, then an ask and a result per trial, each a JSON line
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert recs[0]["type"] == "study" and recs[0]["optimizer"]["class"] == "BOHB"
    assert sum(r["type"] == "ask" for r in recs) == sum(r["type"] == "result" for r in recs) == len(plain)


def test_resume_after_sigkill_matches_plain_run(tmp_path):
    journal = tmp_path / "killed.jsonl"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from accelops import hpo
        from tests import hpo_objectives as o
        from tests.test_hpo_study import make_bohb
        study = hpo.Study(make_bohb(0), journal={str(journal)!r})
        study.optimize(o.KillAt(40), max_budget_total={BUDGET})
        print("not killed")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == -9, proc.stdout + proc.stderr
    recs = [json.loads(x) for x in journal.read_text().splitlines()]
    asked = [r["trial"]["id"] for r in recs if r["type"] == "ask"]
    told = [r["trial_id"] for r in recs if r["type"] == "result"]
    assert len(told) == 39 and asked[-1] == 39 and 39 not in told  # killed inside trial 39

    study = hpo.Study.resume(journal)
    assert len(study.results) == 39
    assert [t.id for t in study._requeue] == [39]  # the running trial is re-queued
    study.optimize(objectives.quadratic, max_budget_total=BUDGET)
    plain = hpo.Study(make_bohb(0))
    plain.optimize(objectives.quadratic, max_budget_total=BUDGET)
    assert sequence(study.results) == sequence(plain.results)

    # resuming the finished journal replays everything and has nothing left to do
    done = hpo.Study.resume(journal, optimizer=make_bohb(0))
    assert sequence(done.results) == sequence(plain.results) and not done._requeue
    done.optimize(objectives.quadratic, max_budget_total=BUDGET)
    assert len(done.results) == len(plain.results)


def test_resume_torn_last_line_and_corruption(tmp_path):
    journal = tmp_path / "s.jsonl"
    study = hpo.Study(hpo.RandomSearch(small_space(), budget=1, seed=0), journal=journal)
    study.optimize(objectives.quadratic, n_trials=5)
    study.close()
    good = journal.read_bytes()
    journal.write_bytes(good + b'{"type":"result","trial_id":5,"sta')
    with pytest.warns(UserWarning, match="torn last line"):
        study = hpo.Study.resume(journal)
    assert len(study.results) == 5
    study.optimize(objectives.quadratic, n_trials=8)
    study.close()
    recs = [json.loads(x) for x in journal.read_text().splitlines()]  # the torn tail was cut
    assert sum(r["type"] == "result" for r in recs) == 8

    lines = good.split(b"\n")
    lines[3] = lines[3][:10]
    journal.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match="line 4 is corrupt"):
        hpo.Study.resume(journal)


def test_study_journal_guards(tmp_path):
    journal = tmp_path / "g.jsonl"
    hpo.Study(make_bohb(0), journal=journal).optimize(objectives.quadratic, n_trials=3)
    with pytest.raises(FileExistsError, match="resume"):
        hpo.Study(make_bohb(0), journal=journal)
    with pytest.raises(ValueError, match="does not match"):
        hpo.Study.resume(journal, optimizer=make_bohb(1))
    with pytest.raises(ValueError, match="never runs out"):
        hpo.Study(make_bohb(0)).optimize(objectives.quadratic)
    with pytest.raises(ValueError, match="executor"):
        hpo.Study(make_bohb(0)).optimize(objectives.quadratic, n_trials=1, executor="threads")
    with pytest.raises(ValueError, match="one trial at a time"):
        hpo.Study(make_bohb(0)).optimize(objectives.quadratic, n_trials=1, n_workers=2, executor="inline")


def test_failures_are_recorded_and_the_study_goes_on(tmp_path):
    opt = hpo.Hyperband(small_space(), min_budget=1, max_budget=9, eta=3, n_brackets=3, seed=0)
    study = hpo.Study(opt, journal=tmp_path / "f.jsonl")
    study.optimize(objectives.with_failures)
    assert len(study.results) == 9 + 3 + 1 + 5 + 1 + 3
    errors = [r.error for r in study.failures]
    assert any("RuntimeError: k=3 does not train" in e for e in errors)
    assert any("non-finite loss (nan)" in e for e in errors)
    assert any("without a 'loss' key" in e for e in errors)
    for r in study.failures:
        assert r.loss is None and opt.results[r.trial.id] == math.inf
    assert all("pid" in r.info for r in study.results if r.ok)
    resumed = hpo.Study.resume(tmp_path / "f.jsonl")
    assert sequence(resumed.results) == sequence(study.results)
    assert [r.error for r in resumed.failures] == errors


def test_inline_timeout_is_recorded_after_the_fact():
    study = hpo.Study(hpo.RandomSearch(small_space(), budget=1, seed=0))
    study.optimize(objectives.slow, n_trials=2, timeout_per_trial=0.05)
    assert [r.status for r in study.results] == ["timeout", "timeout"]
    assert "cannot stop a trial" in study.results[0].error


def test_process_pool_two_workers(tmp_path):
    opt = hpo.Hyperband(small_space(), min_budget=1, max_budget=9, eta=3, n_brackets=2, seed=0)
    study = hpo.Study(opt, journal=tmp_path / "p.jsonl")
    best = study.optimize(objectives.sleepy, n_workers=2)
    assert len(study.results) == 9 + 3 + 1 + 5 + 1 and all(r.ok for r in study.results)
    assert len({r.info["pid"] for r in study.results}) == 2
    assert {r.info["pid"] for r in study.results}.isdisjoint({os.getpid()})
    assert best.budget == 9
    resumed = hpo.Study.resume(tmp_path / "p.jsonl")
    assert sequence(resumed.results) == sequence(study.results)


def test_process_pool_timeout_kills_and_crash_fails_one_trial():
    space = hpo.SearchSpace({"x": hpo.Float(0.0, 1.0), "k": hpo.Int(0, 4)})
    opt = hpo.GridSearch(space, budget=1, resolution={"x": 11, "k": 1})  # x = 0, 0.1, ..., 1
    study = hpo.Study(opt)
    study.optimize(objectives.misbehaving, n_workers=2, timeout_per_trial=1.5)
    by_x = {round(r.config["x"], 1): r for r in study.results}
    assert len(by_x) == 11
    for x in (0.0, 0.1):
        assert by_x[x].status == "timeout" and "worker killed" in by_x[x].error
    assert by_x[0.2].status == "failed" and "worker process died (exit code 3)" in by_x[0.2].error
    assert all(by_x[x].ok for x in by_x if x >= 0.3)


def process_is_gone(pid, within=30.0):
    """True once ``pid`` no longer runs (no such process, or a zombie waiting to be reaped)."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        except OSError:  # no /proc (not Linux): os.kill said it still exists
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def test_process_pool_timeout_counts_from_the_trials_start(tmp_path):
    """A trial's timeout starts when its worker starts it, not at submission: every new worker
    takes 3 s to load the objective (longer than the 2.5 s timeout), and trials that run 0.5 s
    from their own start are not timeouts; the one that hangs still is, and its worker is
    killed. One worker, so every trial after the first waits for the one before."""
    timeout = 2.5
    opt = hpo.GridSearch(small_space(), budget=1, resolution={"x": 4, "k": 1})  # x = 0, 1/3, 2/3, 1
    study = hpo.Study(opt, checkpoint_dir=tmp_path)
    objective = objectives.Naps(load_s=3.0, run_s=0.5, hang=(0.3, 0.4))
    study.optimize(objective, n_workers=1, timeout_per_trial=timeout, executor="process")
    by_x = {round(r.config["x"], 1): r for r in study.results}
    assert sorted(by_x) == [0.0, 0.3, 0.7, 1.0]
    hung = by_x.pop(0.3)
    assert all(r.ok for r in by_x.values()), [(x, r.status, r.error) for x, r in by_x.items()]
    assert hung.status == "timeout" and "worker killed" in hung.error, hung.error
    assert hung.duration >= timeout
    with open(tmp_path / f"config_{hung.trial.config_id}" / "pid") as f:
        assert process_is_gone(int(f.read()))
    for x in (0.0, 0.7):  # each waited for a new worker: from submission, past the timeout
        assert by_x[x].info["end"] - by_x[x].started > timeout


def test_process_pool_needs_a_picklable_objective():
    with pytest.raises(TypeError, match="picklable"):
        hpo.Study(hpo.RandomSearch(small_space(), seed=0)).optimize(lambda c, b: 0.0, n_trials=2, n_workers=2)


def test_process_pool_objective_the_workers_cannot_load(tmp_path):
    study = hpo.Study(hpo.RandomSearch(small_space(), budget=1, seed=0), journal=tmp_path / "l.jsonl")
    with pytest.raises(hpo.ObjectiveLoadError, match="could not load the objective .*cannot be loaded in a worker"):
        study.optimize(objectives.LoadsOnlyHere(), n_trials=4, n_workers=2)
    assert study.results == []  # no trial is recorded as failed: none ran
    resumed = hpo.Study.resume(tmp_path / "l.jsonl")
    resumed.optimize(objectives.quadratic, n_trials=4)  # the asked trials are run again, inline
    assert len(resumed.results) == 4 and all(r.ok for r in resumed.results)


def test_process_pool_refuses_an_objective_from_an_interactive_main():
    code = textwrap.dedent("""
        from accelops import hpo
        def objective(config, budget):
            return config["x"]
        study = hpo.Study(hpo.RandomSearch(hpo.SearchSpace({"x": hpo.Float(0.0, 1.0)}), budget=1, seed=0))
        try:
            study.optimize(objective, n_trials=2, n_workers=2)
        except TypeError as e:
            print("refused:", e, len(study.results))
        print("inline:", study.optimize(objective, n_trials=2).loss >= 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (
        "refused: executor='process': the objective 'objective' is defined in an interactive __main__" in out.stdout
    ), out.stdout + out.stderr
    assert "move it into a module" in out.stdout and "inline: True" in out.stdout


def test_ray_executor_clear_error_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, installed or not
    with pytest.raises(ImportError, match="executor='ray' needs Ray"):
        hpo.Study(hpo.RandomSearch(small_space(), seed=0)).optimize(objectives.quadratic, n_trials=1, executor="ray")


def test_checkpoint_aware_objective_resumes_promoted_trials(tmp_path):
    opt = hpo.Hyperband(small_space(), min_budget=1, max_budget=9, eta=3, n_brackets=1, seed=0)
    study = hpo.Study(opt, journal=tmp_path / "c.jsonl")
    study.optimize(objectives.resumable)
    # 9 configs at 1, the best 3 continue to 3, the best one to 9: each step is run once
    assert [r.budget for r in study.results] == [1] * 9 + [3] * 3 + [9]
    assert sum(r.info["work"] for r in study.results) == 6 * 1 + 2 * 3 + 9
    assert [r.info["resumed_from"] for r in study.results[9:]] == [1, 1, 1, 3]
    assert set(os.listdir(tmp_path / "c.jsonl.checkpoints")) == {f"config_{r.trial.config_id}" for r in study.results}


# ---------------------------------------------------------------------------------------
# plots and the numbers behind them
# ---------------------------------------------------------------------------------------

from accelops.hpo import plots  # noqa: E402


def test_spearman_by_hand():
    assert plots.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert plots.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with ties: a -> 1, 2.5, 2.5, 4; b -> 1, 2, 3, 4: r = 4.5 / sqrt(4.5 * 5)
    assert plots.spearman([0, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(plots.spearman([1], [2])) and math.isnan(plots.spearman([1, 1], [1, 2]))


def test_incumbent_trace_and_rank_correlations():
    opt = hpo.Hyperband(small_space(), min_budget=1, max_budget=9, eta=3, n_brackets=2, seed=0)
    study = hpo.Study(opt)
    study.optimize(objectives.quadratic)
    tr = plots.incumbent_trace(study)
    assert len(tr["loss"]) == len(study.results)
    assert tr["budget"][-1] == sum(r.budget for r in study.results)
    assert np.all(np.diff(tr["time"]) >= 0)
    assert tr["loss"][-1] == study.best().loss
    corr = plots.rank_correlations(study)
    assert set(corr) == {(1, 3), (1, 9), (3, 9)}
    assert corr[(1, 3)][1] == 3 and corr[(3, 9)][1] == 1 + 1  # one from each bracket


def test_plots_write_pngs_or_ask_for_matplotlib(tmp_path):
    study = hpo.Study(hpo.Hyperband(small_space(), min_budget=1, max_budget=9, n_brackets=1, seed=0))
    study.optimize(objectives.quadratic)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            plots.plot_best_loss(study, tmp_path / "best.png")
        return
    for fn in (plots.plot_best_loss, plots.plot_rank_correlation):
        path = tmp_path / f"{fn.__name__}.png"
        fn(study, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
