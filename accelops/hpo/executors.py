"""Where objectives run: in the study's process, in a pool of local worker processes, or
on Ray.

Every executor calls ``run_objective`` on a task dict and hands back outcome dicts
``{"trial_id", "status": "ok"|"failed"|"timeout", "loss", "error", "duration", "info"}``.
Trial timeouts count from the moment the trial starts running, not from its submission:
the time a trial waits for a worker (a process starting and loading the objective, a Ray
task queued for a free CPU) is not the trial's.

- ``InlineExecutor``: one trial at a time in the calling process. It cannot stop a running
  trial: one that returns after ``timeout`` seconds is recorded as a timeout (its loss is
  discarded).
- ``ProcessExecutor``: ``n_workers`` long-lived worker processes started with the
  'forkserver' method where the platform has it (else 'spawn'), never 'fork', so a study
  whose objectives use threads or CUDA is safe. The objective is pickled to the workers:
  it must be a module-level function or another picklable callable (no lambdas or
  closures) in a module the workers can import: one from an interactive ``__main__`` (a
  notebook, ``python -c``) is refused up front, and a worker that cannot unpickle it
  raises ``ObjectiveLoadError`` in the study (every trial would fail the same way). A
  trial past its timeout has its worker killed (SIGKILL) and replaced; a worker that dies
  (segfault, os._exit, out of memory) fails only its trial. Each worker runs in a process
  group of its own, which it shares with the processes its trials start (unless they leave
  it, e.g. ``start_new_session=True``): "killing a worker" is SIGKILL to that group. The
  workers die with the study's process however it ends, SIGKILL included (see
  ``_die_with_the_study``), so a resumed study never runs a trial beside a leftover one in
  the same checkpoint directory.
- ``RayExecutor``: one Ray task per trial; Ray is imported only when asked for. A trial
  past its timeout is cancelled with ``ray.cancel(force=True)``; a task whose worker dies
  is not retried and fails its trial. Each task first yields a marker that tells the driver
  it has started (see ``_ray_task``); a trial queued for a free CPU waits without a
  deadline. Checkpoint directories must then be on storage that every node sees.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback

__all__ = [
    "InlineExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "ObjectiveLoadError",
    "run_objective",
    "accepts_checkpoint",
]


def accepts_checkpoint(objective) -> bool:
    """True when ``objective`` takes a third argument (``checkpoint_dir``)."""
    try:
        sig = inspect.signature(objective)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())
    if any(p.name == "checkpoint_dir" for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _parse_result(out):
    if isinstance(out, dict):
        if "loss" not in out:
            raise TypeError(f"the objective returned a dict without a 'loss' key: {sorted(out)}")
        info = {k: v for k, v in out.items() if k != "loss"}
        out = out["loss"]
    else:
        info = {}
    if isinstance(out, bool) or not hasattr(out, "__float__"):
        raise TypeError(f"the objective must return a number or a dict with 'loss', got {out!r}")
    return float(out), info


def run_objective(objective, task: dict) -> dict:
    """Run one trial; exceptions and non-finite losses become failures with a message."""
    start = time.perf_counter()
    res = {"trial_id": task["trial_id"], "status": "ok", "loss": None, "error": None, "info": {}}
    try:
        if task.get("checkpoint_dir") is not None:
            os.makedirs(task["checkpoint_dir"], exist_ok=True)
            out = objective(task["config"], task["budget"], task["checkpoint_dir"])
        else:
            out = objective(task["config"], task["budget"])
        loss, info = _parse_result(out)
        res["info"] = info
        if math.isfinite(loss):
            res["loss"] = loss
        else:
            res["status"], res["error"] = "failed", f"the objective returned a non-finite loss ({loss})"
    except Exception as e:  # noqa: BLE001 -- any failure of a trial is recorded, the study goes on
        tb = traceback.format_exc(limit=-3)
        res["status"], res["error"] = "failed", f"{type(e).__name__}: {e}\n{tb}"
    res["duration"] = time.perf_counter() - start
    return res


def _timeout_result(task, timeout, duration, note=""):
    return {
        "trial_id": task["trial_id"],
        "status": "timeout",
        "loss": None,
        "info": {},
        "error": f"ran {duration:.3g} s, over timeout_per_trial={timeout:g} s{note}",
        "duration": duration,
    }


class InlineExecutor:
    def __init__(self, objective, n_workers=1, timeout=None):
        if n_workers != 1:
            raise ValueError(f"executor='inline' runs one trial at a time; got n_workers={n_workers}")
        self.objective, self.timeout, self.n_workers = objective, timeout, 1
        self._task = None

    @property
    def n_running(self):
        return int(self._task is not None)

    def submit(self, task):
        assert self._task is None
        self._task = task

    def wait(self):
        task, self._task = self._task, None
        res = run_objective(self.objective, task)
        if self.timeout is not None and res["duration"] > self.timeout:
            res = _timeout_result(
                task,
                self.timeout,
                res["duration"],
                " (the inline executor cannot stop a trial; its result is discarded; "
                "executor='process' kills it at the deadline)",
            )
        return [res]

    def shutdown(self):
        pass


class ObjectiveLoadError(RuntimeError):
    """The worker processes cannot load the objective (raised by the study, not a trial failure:
    every trial would fail the same way)."""


_STARTED = "started"  # a worker's message (or a Ray task's first value) before it runs the trial


def _die_with_the_study(lifeline):
    """Blocks until the study's process ends, then SIGKILLs this worker's process group: the
    worker and what its trial started. (Runs in a daemon thread of the worker.)

    The study holds the only write end of ``lifeline`` and never writes to it, so a read
    returns EOF exactly when that process is gone, however it ended (SIGKILL included: the
    kernel closes its files) and on any OS. Simpler and sturdier than the alternatives:
    ``prctl(PR_SET_PDEATHSIG)`` is Linux-only and watches the *parent*, which for a
    forkserver worker is the fork server, and the fork server outlives the study while any
    of its children live (they hold its liveness pipe); polling ``os.getppid()`` has the
    same problem and a delay. The limit of a thread: it needs the GIL, so an objective stuck
    in C code that holds the GIL for long is killed when that code lets go of it."""
    try:
        lifeline.recv_bytes()
    except BaseException:  # noqa: BLE001 -- EOF (the study is gone) or a broken pipe: the same
        pass
    if hasattr(os, "killpg") and os.getpgrp() == os.getpid():  # never the study's group
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _worker_main(conn, lifeline, payload):
    # A group (and session) of its own, before anything else: the processes its trials start
    # join it, so one killpg() ends them all, from the study or from _die_with_the_study; and
    # signals for the study's terminal or job (Ctrl-C, `timeout`'s SIGTERM to its group) reach
    # only the study, which stops the trials itself (Study.optimize), never half of them.
    if hasattr(os, "setsid"):
        try:
            os.setsid()
        except OSError:  # already a group leader (cannot happen to a forked child): keep going
            pass
    threading.Thread(target=_die_with_the_study, args=(lifeline,), daemon=True, name="accelops-hpo-lifeline").start()
    try:
        objective = pickle.loads(payload)
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises it
        conn.send({"load_error": f"{type(e).__name__}: {e}"})
        return
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(_STARTED)  # the parent starts the trial's timeout when it reads this
        conn.send(run_objective(objective, task))


def _in_interactive_main(objective) -> bool:
    """True when ``objective`` (or its class) lives in a ``__main__`` without a source file
    (a notebook, ``python -c``, the REPL): pickle refers to it by name, and worker processes
    cannot import that module to find it."""
    owner = objective if hasattr(objective, "__qualname__") else type(objective)
    if getattr(owner, "__module__", None) != "__main__":
        return False
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return not (isinstance(path, str) and os.path.exists(path))


def _pickle_objective(objective) -> bytes:
    if _in_interactive_main(objective):
        raise TypeError(
            f"executor='process': the objective {getattr(objective, '__qualname__', objective)!r} "
            "is defined in an interactive __main__ (a notebook, python -c or the REPL), which "
            "worker processes cannot import; move it into a module (a .py file) and import it, "
            "or use executor='inline' (n_workers=1) or executor='ray' (Ray pickles it by value)"
        )
    try:
        return pickle.dumps(objective)
    except Exception as e:
        raise TypeError(
            "executor='process' pickles the objective to its workers: it must be a "
            "module-level function or another picklable callable, not a lambda or a "
            f"closure ({type(e).__name__}: {e})"
        ) from e


def _context():
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        # Workers are forked from a server that already imported this module (and numpy).
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


class _Worker:
    def __init__(self, ctx, payload: bytes):
        self.conn, child = ctx.Pipe()
        # The worker's lifeline (see _die_with_the_study): this process keeps the write end,
        # the only one (forkserver and spawn hand a child only the descriptors it is given,
        # unlike 'fork', which _context() never uses), and closes it in kill().
        lifeline, self.lifeline = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_worker_main, args=(child, lifeline, payload), daemon=True)
        try:
            self.proc.start()
        except BaseException:
            self.conn.close()
            self.lifeline.close()
            raise
        finally:
            child.close()
            lifeline.close()
        self.task = None
        self.started = None  # time.monotonic() in the parent when the worker said it started the task
        self.deadline = None  # started + timeout

    def kill(self):
        """SIGKILL to the worker's process group (the worker and what its trial started),
        then to the worker itself in case it had not made its group yet; waits for it."""
        if hasattr(os, "killpg") and self.proc.pid is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:  # no such group: every member is gone, or the worker had not made it yet
                pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.lifeline.close()


class ProcessExecutor:
    def __init__(self, objective, n_workers=2, timeout=None):
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        self.objective, self.n_workers, self.timeout = objective, n_workers, timeout
        self._payload = _pickle_objective(objective)  # once, and clear errors before any trial starts
        self._ctx = _context()
        self._workers: list[_Worker] = []

    @property
    def n_running(self):
        return sum(w.task is not None for w in self._workers)

    def submit(self, task):
        idle = [w for w in self._workers if w.task is None]
        if idle:
            w = idle[0]
        else:
            assert len(self._workers) < self.n_workers
            w = _Worker(self._ctx, self._payload)
            self._workers.append(w)
        # No deadline yet: a new worker may take seconds to start and unpickle the objective
        # (its imports: torch, a data set), which is not the trial's time. The deadline is set
        # when the worker reports that it has started the trial.
        w.task, w.started, w.deadline = task, None, None
        w.conn.send(task)

    def _retire(self, w):
        w.kill()
        self._workers.remove(w)

    def wait(self):
        """Block until at least one trial has finished (or timed out); return their outcomes."""
        out = []
        while not out:  # a round may only see workers report that they started a trial
            out = self._wait_once()
        return out

    def _wait_once(self):
        busy = [w for w in self._workers if w.task is not None]
        deadlines = [w.deadline for w in busy if w.deadline is not None]
        wait_for = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
        handles = {}
        for w in busy:
            handles[w.conn] = w
            handles[w.proc.sentinel] = w
        ready = mp.connection.wait(list(handles), timeout=wait_for)
        out, done = [], set()
        for h in ready:
            w = handles[h]
            if id(w) in done:
                continue
            done.add(id(w))
            try:
                if not w.conn.poll():
                    raise EOFError
                res = w.conn.recv()
            except (EOFError, OSError):
                task = w.task
                w.proc.join(1)
                out.append(
                    {
                        "trial_id": task["trial_id"],
                        "status": "failed",
                        "loss": None,
                        "info": {},
                        "duration": 0.0 if w.started is None else time.monotonic() - w.started,
                        "error": f"the worker process died (exit code {w.proc.exitcode})",
                    }
                )
                self._retire(w)
                continue
            if res == _STARTED:
                # Reading it in the parent, not a timestamp from the worker: one clock for
                # start and deadline. The parent reads it late only when it is busy, which
                # gives the trial more time, never less.
                w.started = time.monotonic()
                w.deadline = None if self.timeout is None else w.started + self.timeout
                continue
            if "load_error" in res:
                self._retire(w)
                raise ObjectiveLoadError(
                    f"executor='process': a worker process could not load the objective ({res['load_error']}); "
                    "it must be importable from a module in the workers (the trial was not run)"
                )
            w.task = None
            out.append(res)
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and id(w) not in done and w.deadline is not None and now >= w.deadline:
                out.append(_timeout_result(w.task, self.timeout, now - w.started, " (worker killed)"))
                self._retire(w)
        return out

    def shutdown(self):
        for w in self._workers:
            if w.task is None and w.proc.is_alive():
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in self._workers:
            if w.task is None:
                w.proc.join(5)
            w.kill()
        self._workers = []


def _ray_task(objective, task):
    # A streaming generator task: Ray hands each yielded value to the driver as soon as it
    # is yielded, and ray.wait() on the generator wakes when it arrives. The first value says
    # the task has started (its arguments, the objective included, are loaded), the second is
    # the outcome. The driver starts the trial's timeout when it sees the first, by its own
    # clock (the worker may be on another node, whose clock is not the driver's). Simpler and
    # sturdier than the alternatives: no extra actor to keep alive, no file that every node
    # must see, no polling of Ray's state API (which needs the dashboard), and a worker that
    # dies still fails the trial through the same ObjectRef (WorkerCrashedError).
    yield _STARTED
    yield run_objective(objective, task)


class RayExecutor:
    def __init__(self, objective, n_workers=2, timeout=None):
        try:
            import ray
        except ImportError:
            raise ImportError(
                "executor='ray' needs Ray, which is not installed: pip install 'ray[default]' "
                "(or use executor='process' on one machine)"
            ) from None
        self._ray = ray
        if not ray.is_initialized():
            ray.init()  # joins the cluster at RAY_ADDRESS when it is set
        # A cluster with fewer CPUs than n_workers queues the extra trials in Ray; their
        # timeouts start when they do (see _ray_task), so that costs time, not trials.
        self.n_workers, self.timeout = n_workers, timeout
        # max_retries=0: Ray re-runs a task whose worker died (3 times by default); a trial
        # that kills its worker would then run again and again, and a checkpoint-aware one
        # would continue from a half-written state. Like the process pool, a dead worker
        # fails its trial once and the study goes on.
        self._remote = ray.remote(max_retries=0, num_returns="streaming")(_ray_task)
        self._objective = ray.put(objective)
        # ObjectRefGenerator -> (task, started): started is the driver's time.monotonic() when
        # the task's start marker arrived, None while it is queued (no deadline yet)
        self._running = {}

    @property
    def n_running(self):
        return len(self._running)

    def submit(self, task):
        self._running[self._remote.remote(self._objective, task)] = (task, None)

    def wait(self):
        """Block until at least one trial has finished (or timed out); return their outcomes."""
        out = []
        while not out:  # a round may only see tasks report that they started
            out = self._wait_once()
        return out

    def _wait_once(self):
        ray = self._ray
        wait_for = None  # with no trial started there is no deadline: wait for a start or an outcome
        starts = [started for _, started in self._running.values() if started is not None]
        if self.timeout is not None and starts:
            wait_for = max(0.0, min(starts) + self.timeout - time.monotonic())
        ready, _ = ray.wait(list(self._running), num_returns=1, timeout=wait_for)
        out = []
        for gen in ready:
            task, started = self._running[gen]
            try:
                value = ray.get(next(gen))
            except Exception as e:  # noqa: BLE001 -- a lost worker fails its trial only
                del self._running[gen]
                out.append(
                    {
                        "trial_id": task["trial_id"],
                        "status": "failed",
                        "loss": None,
                        "info": {},
                        "duration": 0.0 if started is None else time.monotonic() - started,
                        "error": f"{type(e).__name__}: {e}",
                    }
                )
                continue
            if started is None:
                assert value == _STARTED, value
                self._running[gen] = (task, time.monotonic())
            else:
                del self._running[gen]
                out.append(value)
        now = time.monotonic()
        if self.timeout is not None:
            for gen, (task, started) in list(self._running.items()):
                if started is not None and now - started >= self.timeout:
                    ray.cancel(gen, force=True)
                    del self._running[gen]
                    out.append(_timeout_result(task, self.timeout, now - started, " (Ray task cancelled)"))
        return out

    def shutdown(self):
        for gen in self._running:
            self._ray.cancel(gen, force=True)
        self._running = {}


EXECUTORS = {"inline": InlineExecutor, "process": ProcessExecutor, "ray": RayExecutor}
