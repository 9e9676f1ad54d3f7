"""Study: runs an ask/tell optimiser against an objective, journals every step, resumes.

    study = hpo.Study(opt, journal="runs/study.jsonl")
    best = study.optimize(objective, n_workers=2, max_budget_total=50_000)
    study = hpo.Study.resume("runs/study.jsonl")        # after a crash; then optimize again

``objective(config, budget)`` -> loss (or a dict with "loss"; other keys are kept as the
trial's ``info``); ``objective(config, budget, checkpoint_dir)`` also gets a directory per
configuration, the same for every rung it is promoted to, so training can continue from
its checkpoint instead of starting over. Exceptions, NaN/inf losses and timeouts are
failures: recorded with their message, told to the optimiser as the worst loss, and the
study goes on.

Resume replays the journal through a fresh optimiser (rebuilt from the journal's header,
or the one given, which must match it): every ask is repeated and checked against the
recorded trial, every result is told again in the recorded order, so the optimiser ends in
exactly the state it had. Trials that were asked but have no result (they were running at
the crash) are run first by the next ``optimize``. With one worker the trial sequence is
then identical to an uninterrupted run with the same seed, as it is for a plain ask/tell
loop. The limits of ``optimize`` (``n_trials``, ``max_budget_total``) count the whole
study, journal included, so calling it again with the same arguments finishes the run.

A journal has one writer at a time (journal.py): ``Study(opt, journal=...)`` and
``Study.resume(journal)`` take its lock and fail at once with JournalLockedError, naming
the PID and host of the holder, when another study has it. The lock is released when
``optimize`` returns (or raises), by ``close()`` / the end of a ``with`` block, and by the
OS when the process dies; the next ``optimize`` takes it again and refuses with a
ValueError if the journal changed in between. ``Study.resume(journal, read_only=True)``
takes no lock (to look at a journal that may be being written) and cannot optimize.

Stopping: Ctrl-C (SIGINT) or SIGTERM (what schedulers and `timeout` send) during
``optimize`` raises KeyboardInterrupt in it, which kills the running trials, leaves the
journal ready to resume (the killed trials are re-run first) and, uncaught, ends the
program as Ctrl-C does (exit status 130). ``optimize`` handles SIGTERM only while it runs,
in the main thread, and not where SIGTERM is ignored; it puts the previous handler back.
Process workers die with the study's process however it ends, SIGKILL included.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time

from .executors import EXECUTORS, accepts_checkpoint
from .journal import VERSION, JournalWriter, finite_loss, read_journal, to_json
from .optimizers import Optimizer, Trial

__all__ = ["Study", "TrialResult"]


@dataclasses.dataclass
class TrialResult:
    """A finished trial: ``loss`` is None unless ``status == "ok"``."""

    trial: Trial
    status: str  # "ok" | "failed" | "timeout"
    loss: float | None
    error: str | None = None
    duration: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)
    started: float = 0.0  # wall-clock (time.time()) when the trial was asked
    finished: float = 0.0  # wall-clock when its result was recorded

    @property
    def config(self):
        return self.trial.config

    @property
    def budget(self):
        return self.trial.budget

    @property
    def ok(self):
        return self.status == "ok"


def _normalise(obj):
    return json.loads(json.dumps(to_json(obj)))


class Study:
    """Runs ``optimizer`` and records every trial to ``journal`` (optional JSON-lines path,
    which must not exist yet: continue an existing one with ``Study.resume``)."""

    def __init__(self, optimizer: Optimizer, journal=None, checkpoint_dir=None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a hpo optimiser (BOHB, Hyperband, ...), got {optimizer!r}")
        self.optimizer = optimizer
        self.journal_path = None if journal is None else os.fspath(journal)
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.results: list[TrialResult] = []
        self.started: dict[int, float] = {}  # trial id -> wall-clock start
        self.budget_started = 0.0
        self.n_started = 0
        self.created = time.time()
        self._requeue: list[Trial] = []
        self._writer, self._read_only = None, False
        if self.journal_path is not None:
            # takes the journal's lock, then refuses a non-empty journal (FileExistsError)
            self._writer = JournalWriter(self.journal_path, create=True)
            try:
                self._write({"type": "study", "version": VERSION, "optimizer": optimizer.spec(), "time": self.created})
            except BaseException:
                self._writer.close()
                raise

    # -- journal -------------------------------------------------------------------------
    def _write(self, record):
        if self._writer is not None:
            self._writer.write(record)

    @classmethod
    def resume(
        cls, journal, optimizer: Optimizer | None = None, checkpoint_dir=None, read_only: bool = False
    ) -> "Study":
        """Rebuild a study from its journal (see the module doc). A torn last line is ignored
        with a warning; any other damage is a ValueError. Takes the journal's lock
        (JournalLockedError if another study holds it) unless ``read_only``."""
        path = os.fspath(journal)
        # Locked before reading, so no other writer can append between the read and our writes.
        writer = None if read_only else JournalWriter(path, create=False)
        try:
            self, keep = cls._replay(path, optimizer, checkpoint_dir)
            if writer is not None:
                writer.cut(keep)  # drop a torn last line before appending
        except BaseException:
            if writer is not None:
                writer.close()
            raise
        self._writer, self._read_only = writer, read_only
        return self

    @classmethod
    def _replay(cls, path, optimizer, checkpoint_dir) -> tuple["Study", int]:
        records, keep = read_journal(path)
        if not records or records[0].get("type") != "study":
            raise ValueError(f"{path}: not a study journal (no header line)")
        header = records[0]
        if header.get("version") != VERSION:
            raise ValueError(f"{path}: journal version {header.get('version')!r}, this accelops reads {VERSION}")
        if optimizer is None:
            optimizer = Optimizer.from_spec(header["optimizer"])
        elif _normalise(optimizer.spec()) != _normalise(header["optimizer"]):
            raise ValueError(
                f"{path}: the optimiser given does not match the journal's "
                f"({header['optimizer']['class']} with seed {header['optimizer']['seed']} "
                f"and kwargs {header['optimizer']['kwargs']}); pass optimizer=None to rebuild it"
            )
        self = cls.__new__(cls)
        self.optimizer = optimizer
        self.journal_path = path
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.results, self.started = [], {}
        self.budget_started, self.n_started = 0.0, 0
        self.created = header.get("time", time.time())
        self._requeue, self._writer, self._read_only = [], None, True
        for i, rec in enumerate(records[1:], start=2):
            kind = rec.get("type")
            if kind == "ask":
                trial = optimizer.ask()
                if trial is None or _normalise(trial.to_json()) != _normalise(rec["trial"]):
                    raise ValueError(
                        f"{path}: line {i}: the optimiser asks for {trial!r} where the journal "
                        f"has {rec['trial']!r}; the journal was written by a different optimiser "
                        "or version"
                    )
                self._started(trial, rec.get("time", 0.0))
            elif kind == "result":
                self._finish(rec, write=False)
            else:
                raise ValueError(f"{path}: line {i}: unknown record type {kind!r}")
        self._requeue = sorted(optimizer.running.values(), key=lambda t: t.id)
        return self, keep

    def _started(self, trial, when):
        self.started[trial.id] = when
        self.budget_started += trial.budget
        self.n_started += 1

    def _finish(self, rec, write=True):
        tid = rec["trial_id"]
        trial = self.optimizer.trials[tid]
        status = rec["status"]
        loss = rec["loss"] if status == "ok" else None
        error = rec.get("error")
        if write and status == "ok":
            # The executors already fail a NaN/inf loss; this keeps any other way one could
            # arrive out of best() and the journal (which refuses to write it), the same way.
            bad, loss = loss, to_json(loss)  # numpy scalars to Python, non-finite to None
            if not finite_loss(loss):
                status, loss, error = "failed", None, f"the objective returned a non-finite loss ({bad!r})"
        self.optimizer.tell(trial, math.inf if loss is None else loss)
        now = rec.get("time", time.time())
        res = TrialResult(
            trial=trial,
            status=status,
            loss=loss,
            error=error,
            duration=rec.get("duration", 0.0),
            info=rec.get("info") or {},
            started=self.started.get(tid, now),
            finished=now,
        )
        self.results.append(res)
        if write:
            self._write(
                {
                    "type": "result",
                    "trial_id": tid,
                    "status": status,
                    "loss": loss,
                    "error": res.error,
                    "duration": res.duration,
                    "info": res.info,
                    "time": now,
                }
            )
        return res

    # -- running -------------------------------------------------------------------------
    def _next(self, max_budget_total, n_trials) -> Trial | None:
        if self._requeue:
            return self._requeue.pop(0)
        if n_trials is not None and self.n_started >= n_trials:
            return None
        if max_budget_total is not None and self.budget_started >= max_budget_total:
            return None
        trial = self.optimizer.ask()
        if trial is not None:
            now = time.time()
            self._write({"type": "ask", "trial": trial.to_json(), "time": now})
            self._started(trial, now)
        return trial

    def _checkpoint_root(self):
        if self.checkpoint_dir is None:
            if self.journal_path is not None:
                self.checkpoint_dir = self.journal_path + ".checkpoints"
            else:
                self.checkpoint_dir = tempfile.mkdtemp(prefix="accelops-hpo-")
        return self.checkpoint_dir

    def optimize(
        self,
        objective,
        n_workers: int = 1,
        max_budget_total=None,
        n_trials: int | None = None,
        timeout_per_trial: float | None = None,
        executor: str = "auto",
    ) -> TrialResult | None:
        """Run trials until the optimiser has nothing left, ``n_trials`` trials were started
        or the budget of the started trials reaches ``max_budget_total`` (both counted over
        the whole study), then wait for the running ones. ``executor``: "auto" (in-process
        for one worker, else "process"), "inline", "process" or "ray". Returns ``best()``."""
        if not callable(objective):
            raise TypeError(f"objective must be callable, got {objective!r}")
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers must be a positive int, got {n_workers!r}")
        if timeout_per_trial is not None and not timeout_per_trial > 0:
            raise ValueError(f"timeout_per_trial must be > 0 seconds, got {timeout_per_trial!r}")
        if max_budget_total is None and n_trials is None and _endless(self.optimizer):
            raise ValueError(
                f"{type(self.optimizer).__name__} never runs out of trials: give n_trials or max_budget_total"
            )
        if executor == "auto":
            executor = "inline" if n_workers == 1 else "process"
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be 'auto', 'inline', 'process' or 'ray', got {executor!r}")
        if self._read_only:
            raise ValueError(
                f"{self.journal_path}: this study was resumed read_only; continue it with hpo.Study.resume(journal)"
            )
        if self._writer is not None:
            # released at the end of the last optimize or by close(): take it again, and
            # refuse if another study wrote the journal meanwhile (our state would be stale)
            self._writer.reopen()
        try:
            return self._optimize(objective, n_workers, max_budget_total, n_trials, timeout_per_trial, executor)
        finally:
            if self._writer is not None:
                self._writer.close()  # the run is over: the journal is whole, let others resume it

    def _optimize(self, objective, n_workers, max_budget_total, n_trials, timeout_per_trial, executor):
        ckpt = accepts_checkpoint(objective)
        ex = EXECUTORS[executor](objective, n_workers, timeout_per_trial)
        # After the executor is made: ray.init() sets SIGTERM handlers of its own in the driver
        # (a Python one that calls sys.exit, then its C++ core's, which aborts the process with
        # no clean-up); ours goes over both for the run, and the Python one is put back.
        sigterm = _SigtermAsInterrupt(self.journal_path)
        try:
            sigterm.install()
            while True:
                while ex.n_running < n_workers:
                    trial = self._next(max_budget_total, n_trials)
                    if trial is None:
                        break
                    task = {
                        "trial_id": trial.id,
                        "config": trial.config,
                        "budget": trial.budget,
                        "checkpoint_dir": (
                            os.path.join(self._checkpoint_root(), f"config_{trial.config_id}") if ckpt else None
                        ),
                    }
                    ex.submit(task)
                if ex.n_running == 0:
                    break
                for res in ex.wait():
                    self._finish({**res, "time": time.time()})
        finally:
            sigterm.stopping = True  # a SIGTERM from here on waits until the trials are killed
            try:
                ex.shutdown()
                # what was still running is re-queued by the next optimize (or a resume)
                self._requeue = sorted(self.optimizer.running.values(), key=lambda t: t.id)
            finally:
                sigterm.restore()
        sigterm.raise_pending()  # one that came while the run was finishing
        return self.best()

    def close(self):
        """Release the journal (file and lock); a later ``optimize`` takes it again."""
        if self._writer is not None:
            self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- results -------------------------------------------------------------------------
    def best(self) -> TrialResult | None:
        """The lowest loss among successful trials at the largest budget that has one."""
        ok = [r for r in self.results if r.ok]
        if not ok:
            return None
        top = max(r.budget for r in ok)
        return min((r for r in ok if r.budget == top), key=lambda r: r.loss)

    @property
    def failures(self) -> list[TrialResult]:
        return [r for r in self.results if not r.ok]

    def __repr__(self):
        best = self.best()
        return (
            f"Study({type(self.optimizer).__name__}, {len(self.results)} results, "
            f"best={None if best is None else best.loss})"
        )


class _SigtermAsInterrupt:
    """For one ``optimize``: SIGTERM raises KeyboardInterrupt, as SIGINT does, so that it
    stops the study the way Ctrl-C always did (running trials killed, journal resumable)
    instead of ending the process on the spot, which left the process workers running.

    KeyboardInterrupt itself, not a subclass, as the Trainer raises for the same signal:
    uncaught, Python ends the program by SIGINT (exit status 130) only for that exact type.
    Only the first SIGTERM raises; one that comes while the study is already stopping (a
    launcher relays the scheduler's signal, which the scheduler also sent itself) must not
    cut short the killing of the workers: it is dropped while an interrupt is on its way
    out, and raised after the clean-up when the run was ending normally."""

    def __init__(self, journal_path):
        self.journal_path = journal_path
        self.previous = None  # the handler we replaced; None while ours is not installed
        self.stopping = False
        self.pending = False

    def install(self):
        # Only the main thread may set handlers (Python's rule); a handler not set from
        # Python (None) could not be put back; an ignored SIGTERM is ignored on purpose.
        if threading.current_thread() is not threading.main_thread():
            return
        old = signal.getsignal(signal.SIGTERM)
        if old is None or old == signal.SIG_IGN:
            return
        signal.signal(signal.SIGTERM, self._handle)
        self.previous = old

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _handle(self, signum, frame):
        if self.stopping:
            self.pending = True
            return
        self.stopping = True
        raise self._interrupt()

    def raise_pending(self):
        if self.pending:
            raise self._interrupt()

    def _interrupt(self):
        resume = (
            ""
            if self.journal_path is None
            else f": hpo.Study.resume({self.journal_path!r}) and optimize() continue it, running "
            "the trials that this stop kills first"
        )
        exc = KeyboardInterrupt(f"the study was stopped by SIGTERM{resume}")
        exc.signum = signal.SIGTERM
        return exc


def _endless(opt) -> bool:
    from .hyperband import Hyperband
    from .optimizers import GridSearch

    if isinstance(opt, GridSearch):
        return False
    if isinstance(opt, Hyperband):
        return opt.n_brackets is None
    return True
