"""The study journal under faults (issue 23): one writer at a time, held by a lock that a
second writer (another process, or another Study in this one) runs into at once and that
a SIGKILLed writer does not keep; NaN, +-Infinity and missing losses are refused on read
with the file and line, and never written."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from accelops import hpo
from accelops.hpo import journal as hpo_journal
from accelops.hpo import study as hpo_study
from tests import hpo_objectives as objectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 120  # seconds: generous, both cores may be busy with other tests


def space():
    return hpo.SearchSpace({"x": hpo.Float(0.0, 1.0), "k": hpo.Int(0, 4)})


def random_search():
    return hpo.RandomSearch(space(), budget=1, seed=0)


def sequence(results):
    return [(r.trial.id, r.trial.config, r.status, r.loss) for r in results]


# The writer process. accelops.hpo imports the standard library and numpy only
# (tests/test_hpo.py checks it), so it is loaded without accelops/__init__, which imports
# torch: seconds of start-up on a loaded machine.
WRITER = """
import os, sys, time, types
root, mode, journal, gate = sys.argv[1:5]
sys.path.insert(0, root)
pkg = types.ModuleType("accelops")
pkg.__path__ = [os.path.join(root, "accelops")]
sys.modules["accelops"] = pkg
from accelops import hpo
from tests.hpo_objectives import quadratic
from tests.test_hpo_journal_faults import random_search

def hold(seconds):
    # tell the test this process is inside a trial, holding the journal, then wait
    open(gate + ".started", "w").close()
    deadline = time.monotonic() + seconds
    while not os.path.exists(gate + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)

if mode == "resume":  # the first trial it runs waits for the test's go-ahead
    study = hpo.Study.resume(journal)
    def objective(config, budget):
        if not os.path.exists(gate + ".started"):
            hold(120)
        return quadratic(config, budget)
    study.optimize(objective, n_trials=25)
else:  # "killed": a new study whose fourth trial hangs until the test SIGKILLs it
    study = hpo.Study(random_search(), journal=journal)
    def objective(config, budget):
        if len(study.results) == 3:
            hold(600)
        return quadratic(config, budget)
    study.optimize(objective, n_trials=6)
print("results", len(study.results))
"""


def start_writer(mode, journal, gate):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, ROOT, mode, str(journal), str(gate)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_started(proc, gate):
    deadline = time.monotonic() + WAIT
    while not os.path.exists(f"{gate}.started"):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the writer exited ({proc.returncode}) before its trial started:\n{out}\n{err}")
        assert time.monotonic() < deadline, "the writer did not start its trial"
        time.sleep(0.02)


def assert_locked_by(pid, call):
    """``call`` fails at once with JournalLockedError naming ``pid`` on this host."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"PID {pid} on host {re.escape(socket.gethostname())}") as e:
        call()
    assert isinstance(e.value, hpo_journal.JournalLockedError)
    assert time.monotonic() - t0 < 10  # did not wait for the holder (it waits for us)


def test_second_process_fails_at_once_naming_the_writer(tmp_path):
    journal, gate = tmp_path / "s.jsonl", tmp_path / "gate"
    hpo.Study(random_search(), journal=journal).optimize(objectives.quadratic, n_trials=5)
    proc = start_writer("resume", journal, gate)
    try:
        wait_started(proc, gate)  # the writer resumed the journal and runs trial 5
        assert_locked_by(proc.pid, lambda: hpo.Study.resume(journal))
        # a new study on the path runs into the lock too (it is taken before the file is checked)
        assert_locked_by(proc.pid, lambda: hpo.Study(random_search(), journal=journal))
        # readers take no lock: a read-only look while the writer runs
        peek = hpo.Study.resume(journal, read_only=True)
        assert len(peek.results) >= 5
        with pytest.raises(ValueError, match="read_only"):
            peek.optimize(objectives.quadratic, n_trials=30)
        (tmp_path / "gate.go").touch()
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "results 25" in out, out + err
    # the journal is whole: every trial once, in order, as in one uninterrupted run
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 2 * 25
    done = hpo.Study.resume(journal)
    plain = hpo.Study(random_search())
    plain.optimize(objectives.quadratic, n_trials=25)
    assert sequence(done.results) == sequence(plain.results) and not done._requeue
    done.close()


def test_sigkilled_writer_releases_the_lock(tmp_path):
    journal, gate = tmp_path / "k.jsonl", tmp_path / "gate"
    proc = start_writer("killed", journal, gate)
    try:
        wait_started(proc, gate)  # inside its fourth trial, holding the lock
        assert_locked_by(proc.pid, lambda: hpo.Study.resume(journal))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=WAIT)
    assert proc.returncode == -signal.SIGKILL
    study = hpo.Study.resume(journal)  # the OS dropped the dead writer's lock
    assert len(study.results) == 3 and [t.id for t in study._requeue] == [3]
    study.optimize(objectives.quadratic, n_trials=6)
    plain = hpo.Study(random_search())
    plain.optimize(objectives.quadratic, n_trials=6)
    assert sequence(study.results) == sequence(plain.results)
    assert sequence(hpo.Study.resume(journal, read_only=True).results) == sequence(plain.results)


def test_lock_in_one_process_close_and_stale_study(tmp_path):
    journal = tmp_path / "p.jsonl"
    first = hpo.Study(random_search(), journal=journal)
    assert_locked_by(os.getpid(), lambda: hpo.Study.resume(journal))  # a second Study in this process
    first.close()
    with hpo.Study.resume(journal):  # close() / with released it
        assert_locked_by(os.getpid(), lambda: hpo.Study.resume(journal))
    hpo.Study.resume(journal)  # dropped without close(): released when collected
    # optimize releases the lock when it returns; the next optimize takes it again, and
    # refuses if another study continued the journal in between (its state is stale)
    a = hpo.Study.resume(journal)
    a.optimize(objectives.quadratic, n_trials=2)
    b = hpo.Study.resume(journal)
    b.optimize(objectives.quadratic, n_trials=4)
    with pytest.raises(ValueError, match="changed since this study last wrote it"):
        a.optimize(objectives.quadratic, n_trials=6)
    with pytest.raises(ValueError, match="changed since"):
        a.optimize(objectives.quadratic, n_trials=6)  # and stays refused
    b.optimize(objectives.quadratic, n_trials=6)  # b's state is current
    assert len(hpo.Study.resume(journal, read_only=True).results) == 6


def rewrite_loss(journal, lineno, token):
    """Journal text with the loss of result line ``lineno`` (1-based) replaced by the raw
    JSON ``token`` (None: the key removed)."""
    lines = journal.read_text().splitlines(keepends=True)
    rec = json.loads(lines[lineno - 1])
    assert rec["type"] == "result" and rec["status"] == "ok"
    if token is None:
        del rec["loss"]
        lines[lineno - 1] = json.dumps(rec) + "\n"
    else:
        rec["loss"] = "@LOSS@"
        lines[lineno - 1] = json.dumps(rec).replace('"@LOSS@"', token) + "\n"
    return "".join(lines)


@pytest.mark.parametrize("token", ["NaN", "-Infinity", "Infinity", "1e999", "null", None, '"0.5"'])
def test_non_finite_or_missing_loss_refused_with_file_and_line(tmp_path, token):
    good = tmp_path / "good.jsonl"
    hpo.Study(random_search(), journal=good).optimize(objectives.quadratic, n_trials=3)
    # lines: 1 header, then ask and result per trial: results on lines 3, 5 and 7
    for lineno in (5, 7):  # inside, and the last line (a whole line, not a torn write)
        bad = tmp_path / f"bad{lineno}.jsonl"
        bad.write_text(rewrite_loss(good, lineno, token))
        with pytest.raises(ValueError, match=re.escape(f"{bad}: line {lineno} ")):
            hpo.Study.resume(bad)
        with pytest.raises(ValueError, match=re.escape(f"{bad}: line {lineno} ")):
            hpo.Study.resume(bad, read_only=True)  # readers check too


def test_infinity_anywhere_refused(tmp_path):
    journal = tmp_path / "d.jsonl"
    hpo.Study(random_search(), journal=journal).optimize(objectives.quadratic, n_trials=2)
    lines = journal.read_text().splitlines(keepends=True)
    lines[2] = re.sub(r'"duration":[^,]+', '"duration":Infinity', lines[2])
    journal.write_text("".join(lines))
    with pytest.raises(ValueError, match=re.escape(f"{journal}: line 3 holds Infinity")):
        hpo.Study.resume(journal)


class NaNExecutor(hpo_study.EXECUTORS["inline"]):
    """Reports trial 1 as ok with a NaN loss, as a buggy or remote executor might."""

    def wait(self):
        out = super().wait()
        for res in out:
            if res["trial_id"] == 1:
                res["status"], res["loss"] = "ok", float("nan")
        return out


def nan_objective(config, budget):
    return np.float32("nan") if config["k"] == 0 else objectives.quadratic(config, budget)


def test_writer_never_writes_a_non_finite_loss(tmp_path, monkeypatch):
    monkeypatch.setitem(hpo_study.EXECUTORS, "inline", NaNExecutor)
    journal = tmp_path / "w.jsonl"
    study = hpo.Study(random_search(), journal=journal)
    best = study.optimize(nan_objective, n_trials=8)
    failed = {r.trial.id: r.error for r in study.failures}
    assert 1 in failed and all("non-finite loss" in e for e in failed.values()), failed
    assert math.isfinite(best.loss)
    for line in journal.read_text().splitlines():  # strict JSON, and no ok result without a loss
        rec = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} written"))
        assert rec.get("status") != "ok" or math.isfinite(rec["loss"])
    resumed = hpo.Study.resume(journal, read_only=True)
    assert sequence(resumed.results) == sequence(study.results)
    # the writer itself refuses, whoever calls it
    with hpo.Study(random_search(), journal=tmp_path / "x.jsonl") as other:
        with pytest.raises(ValueError, match=r"refusing to write an 'ok' result with loss None.*'loss': nan"):
            other._writer.write({"type": "result", "trial_id": 0, "status": "ok", "loss": float("nan")})
