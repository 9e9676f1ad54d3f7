"""Stopping a study by a signal. SIGTERM (what schedulers and `timeout` send) stops it as
Ctrl-C does: KeyboardInterrupt, the running trials killed, the journal resumable. Its
process workers and the processes their trials started die with the study, also when it is
SIGKILLed, so a resumed study never runs a trial in the same checkpoint directory as a
leftover one. Each study runs in a subprocess that the test signals."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

from accelops import hpo
from tests import hpo_objectives as objectives
from tests.test_hpo_study import ROOT, process_is_gone

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

STARTUP_S = 180  # a study process (and its workers) start: torch imports, slow on a loaded machine
GONE_S = 20  # generous: killing is immediate when the machine is idle

STUDY = textwrap.dedent("""
    import signal, sys
    # As in a terminal: a shell that runs pytest in the background starts it with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler in this child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from accelops import hpo
    from tests import hpo_objectives as o
    journal, objective, n_workers, executor, own_handler = sys.argv[1:]
    if executor == "ray":
        import os, ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    if own_handler == "1":
        def previous(signum, frame):  # the program's own: optimize must put it back
            print("the previous SIGTERM handler ran", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, previous)
    space = hpo.SearchSpace({"x": hpo.Float(0.0, 1.0), "k": hpo.Int(0, 4)})
    study = hpo.Study(hpo.GridSearch(space, budget=1, resolution={"x": 4, "k": 1}), journal=journal)
    try:
        study.optimize(eval(objective), n_workers=int(n_workers), executor=executor)
    except KeyboardInterrupt:
        print("interrupted; SIGTERM handler restored:",
              own_handler != "1" or signal.getsignal(signal.SIGTERM) is previous, flush=True)
        if executor == "ray":  # checked here: Ray's shutdown at exit would end every task anyway
            import glob, time
            from tests.test_hpo_study import process_is_gone
            pids = [int(open(p).read()) for p in glob.glob(journal + ".checkpoints/config_*/pid")]
            deadline = time.monotonic() + 20
            print("ray tasks ended before the driver:",
                  all(process_is_gone(p, max(0.0, deadline - time.monotonic())) for p in pids), flush=True)
        raise
    print("finished", flush=True)
""")
N_TRIALS = 4  # the grid above


@pytest.fixture
def leftovers():
    """PIDs a test saw; any still running at its end (a failed test) is killed."""
    pids = []
    yield pids
    for pid in pids:
        if not process_is_gone(pid, within=0):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_study(tmp_path, objective, n_workers, executor, own_handler=False):
    journal = str(tmp_path / "study.jsonl")
    # Its output goes to a file, not a pipe: processes it leaves behind would hold a pipe open.
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", STUDY, journal, objective, str(n_workers), executor, str(int(own_handler))],
            env={**os.environ, "PYTHONPATH": ROOT},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.output = tmp_path / "out.txt"
    return proc, journal


def finish(proc, within=60):
    """Waits for the study process to end -> its output."""
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the study did not end within {within} s of the signal:\n{proc.output.read_text()}")
    return proc.output.read_text()


def running_trials(proc, journal, name, n, leftovers) -> dict:
    """Waits until ``n`` trials have written their PIDs to ``name`` in their checkpoint
    directories -> {config_id: [pids]}."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        found = {}
        for path in glob.glob(os.path.join(journal + ".checkpoints", "config_*", name)):
            with open(path) as f:
                pids = [int(p) for p in f.read().split()]
            if pids:  # else made but not written yet
                found[int(os.path.basename(os.path.dirname(path))[len("config_") :])] = pids
        if len(found) >= n:
            leftovers.extend(p for pids in found.values() for p in pids)
            return found
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{len(found)} of {n} trials started; the study:\n{proc.output.read_text()}")
        time.sleep(0.05)


def still_running(pids):
    deadline = time.monotonic() + GONE_S
    return [pid for pid in pids if not process_is_gone(pid, within=max(0.0, deadline - time.monotonic()))]


def resume_and_finish(journal, running):
    """The trials that were running are re-queued; the resumed study runs them and the rest."""
    study = hpo.Study.resume(journal)
    assert sorted(t.config_id for t in study._requeue) == sorted(running)
    study.optimize(objectives.Naps(0.0, 0.0), executor="inline")
    assert sorted(r.trial.config_id for r in study.results) == list(range(N_TRIALS))
    assert all(r.ok for r in study.results), [r.error for r in study.results]


def test_sigterm_stops_the_study_and_kills_its_workers_and_their_children(tmp_path, leftovers):
    proc, journal = start_study(tmp_path, "o.SpawnsAndSleeps(60)", 2, "process")
    running = running_trials(proc, journal, "pids", 2, leftovers)
    workers = {pids[0] for pids in running.values()}
    assert len(workers) == 2 and proc.pid not in workers
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == -signal.SIGINT, out  # as Ctrl-C ends a Python program
    assert "interrupted; SIGTERM handler restored: True" in out, out
    assert not still_running(leftovers), out
    resume_and_finish(journal, running)


def test_sigkill_of_the_study_kills_its_workers_and_their_children(tmp_path, leftovers):
    proc, journal = start_study(tmp_path, "o.SpawnsAndSleeps(60)", 2, "process")
    running = running_trials(proc, journal, "pids", 2, leftovers)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not still_running(leftovers)
    resume_and_finish(journal, running)


def test_sigterm_ends_a_study_as_sigint_does(tmp_path, leftovers):
    """The same exit status and exception, the program's own SIGTERM handler back in place
    afterwards, and a journal that resumes (inline executor: the trial runs in the study)."""
    seen = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        (tmp_path / sig.name).mkdir()
        proc, journal = start_study(tmp_path / sig.name, "o.Naps(0.0, 60.0)", 1, "inline", own_handler=True)
        running = running_trials(proc, journal, "pid", 1, leftovers)
        proc.send_signal(sig)
        out = finish(proc)
        last = out.strip().splitlines()[-1]
        seen[sig] = (proc.returncode, last.split(":")[0], "interrupted; SIGTERM handler restored: True" in out)
        recs = [json.loads(line) for line in open(journal)]  # every line whole
        assert [r["type"] for r in recs] == ["study", "ask"], out
        resume_and_finish(journal, running)
    assert seen[signal.SIGTERM] == seen[signal.SIGINT] == (-signal.SIGINT, "KeyboardInterrupt", True), seen


def test_optimize_takes_sigterm_only_for_the_run_and_never_over_an_ignored_one():
    seen = []

    def objective(config, budget):
        seen.append(signal.getsignal(signal.SIGTERM))
        return 0.0

    def run():
        space = hpo.SearchSpace({"x": hpo.Float(0.0, 1.0)})
        hpo.Study(hpo.GridSearch(space, resolution={"x": 1})).optimize(objective)

    def own(signum, frame):
        pass

    before = signal.getsignal(signal.SIGTERM)
    try:
        for previous in (own, signal.SIG_DFL):
            signal.signal(signal.SIGTERM, previous)
            run()
            assert callable(seen[-1]) and seen[-1] is not previous  # the study's, during the run
            assert signal.getsignal(signal.SIGTERM) is previous  # put back
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nohup-like: the caller does not want it
        run()
        assert seen[-1] is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        thread = threading.Thread(target=run)  # Python lets only the main thread set handlers
        thread.start()
        thread.join()
        assert seen[-1] is signal.SIG_DFL and len(seen) == 4
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_in_a_trial_stops_at_once_one_in_the_clean_up_waits_for_it(monkeypatch):
    """In-process, inline: a SIGTERM during a trial raises KeyboardInterrupt there; one during
    the clean-up (killing the workers) lets it finish: it is raised after it when the run was
    ending normally, and dropped when an interrupt is already on its way out."""
    from accelops.hpo import executors

    own_calls, shut_down = [], []

    def own(signum, frame):
        own_calls.append(signum)

    def signalled_shutdown(self):
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line
        shut_down.append(True)

    def study():
        space = hpo.SearchSpace({"x": hpo.Float(0.0, 1.0)})
        return hpo.Study(hpo.GridSearch(space, resolution={"x": 2}))

    def sigterm_in_trial(config, budget):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # not reached: the interrupt comes first
        return 0.0

    before = signal.signal(signal.SIGTERM, own)
    try:
        s = study()
        with pytest.raises(KeyboardInterrupt) as e:
            s.optimize(sigterm_in_trial)
        assert e.value.signum == signal.SIGTERM and not s.results and [t.id for t in s._requeue] == [0]
        assert signal.getsignal(signal.SIGTERM) is own

        monkeypatch.setattr(executors.InlineExecutor, "shutdown", signalled_shutdown)
        s = study()
        with pytest.raises(KeyboardInterrupt) as e:
            s.optimize(lambda config, budget: 0.0)
        assert shut_down == [True] and len(s.results) == 2 and all(r.ok for r in s.results)

        s = study()
        with pytest.raises(KeyboardInterrupt) as e:
            s.optimize(sigterm_in_trial)
        assert shut_down == [True, True] and [t.id for t in s._requeue] == [0]
        assert "sigterm_in_trial" in "".join(traceback.format_tb(e.tb))  # the first one's
        assert signal.getsignal(signal.SIGTERM) is own and own_calls == []
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_cancels_the_ray_tasks(tmp_path, leftovers):
    """The driver stops as on Ctrl-C (KeyboardInterrupt; Ray then ends the driver with
    status 1, for Ctrl-C too) and cancels its running tasks before it exits. Before, the
    SIGTERM handler of Ray's C++ core aborted the driver (SIGABRT) without that clean-up."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]')")
    proc, journal = start_study(tmp_path, "o.Naps(0.0, 60.0)", 2, "ray")
    running = running_trials(proc, journal, "pid", 2, leftovers)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode != 0 and out.strip().splitlines()[-1].startswith("KeyboardInterrupt"), out
    assert "interrupted; SIGTERM handler restored: True" in out, out
    assert "ray tasks ended before the driver: True" in out, out
    assert not still_running(leftovers), out
    resume_and_finish(journal, running)
