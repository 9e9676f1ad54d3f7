"""Objectives for the tests/test_hpo_*.py studies, in their own light module so that worker
processes (which unpickle them by module name) import little."""

import json
import math
import os
import signal
import subprocess
import sys
import time


def quadratic(config, budget):
    """Smooth in x (and layers), noisier at small budgets, deterministic."""
    x = config["x"]
    noise = 0.3 * math.sin(37.0 * x + config["k"] * 1.3) / budget
    return (x - 0.3) ** 2 + 0.05 * config["k"] + noise


def with_failures(config, budget):
    if config["k"] == 3:
        raise RuntimeError(f"k=3 does not train (x={config['x']:.3f})")
    if config["x"] > 0.8:
        return float("nan")
    if config["x"] < 0.1:
        return {"accuracy": 0.5}  # no "loss" key
    return {"loss": quadratic(config, budget), "pid": os.getpid()}


def sleepy(config, budget):
    time.sleep(0.05)
    return {"loss": quadratic(config, budget), "pid": os.getpid()}


def misbehaving(config, budget):
    """For the process pool: x < 0.2 hangs, 0.2 <= x < 0.3 kills its own worker."""
    if config["x"] < 0.2:
        time.sleep(60)
    if config["x"] < 0.3:
        os._exit(3)
    return quadratic(config, budget)


def slow(config, budget):
    time.sleep(0.25)
    return quadratic(config, budget)


class KillAt:
    """Runs ``quadratic`` and SIGKILLs its own process at the n-th call (inline executor)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, config, budget):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return quadratic(config, budget)


def resumable(config, budget, checkpoint_dir):
    """Trains 'budget' steps, continuing from the checkpoint of a lower rung if any;
    reports the steps it actually ran as 'work'."""
    path = os.path.join(checkpoint_dir, "state.json")
    done = 0
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)["steps"]
    work = budget - done
    assert work >= 0, (done, budget)
    with open(path, "w") as f:
        json.dump({"steps": budget}, f)
    return {"loss": quadratic(config, budget), "work": work, "resumed_from": done}


def _refuse_to_load():
    raise RuntimeError("this objective cannot be loaded in a worker")


class LoadsOnlyHere:
    """Pickles fine, fails to unpickle (as a notebook's function does in a worker process)."""

    def __reduce__(self):
        return (_refuse_to_load, ())

    def __call__(self, config, budget):
        return quadratic(config, budget)


class Naps:
    """Sleeps ``run_s`` per trial, or 60 s (it hangs) where ``hang[0] <= x < hang[1]``,
    after ``load_s`` of loading wherever it is unpickled (a worker process, a Ray task), as an
    objective that imports torch or reads a data set would. It writes its pid to the
    trial's checkpoint directory before it sleeps (so a test can check that a hung trial's
    process was killed) and reports its own start and end (time.time()) as info."""

    def __init__(self, load_s, run_s, hang=(0.0, 0.0)):
        self.load_s, self.run_s, self.hang = load_s, run_s, hang

    def __setstate__(self, state):
        self.__dict__.update(state)
        time.sleep(self.load_s)

    def __call__(self, config, budget, checkpoint_dir):
        start = time.time()
        with open(os.path.join(checkpoint_dir, "pid"), "w") as f:
            f.write(str(os.getpid()))
        lo, hi = self.hang
        time.sleep(60 if lo <= config["x"] < hi else self.run_s)
        return {"loss": quadratic(config, budget), "start": start, "end": time.time()}


class SpawnsAndSleeps:
    """A trial that starts a process of its own (as one that runs a data loader or a tool
    would), writes ``"<its pid> <the child's pid>"`` to ``pids`` in its checkpoint directory,
    then sleeps ``run_s``. The child sleeps 120 s, so it is gone sooner only if it was killed."""

    def __init__(self, run_s):
        self.run_s = run_s

    def __call__(self, config, budget, checkpoint_dir):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        path = os.path.join(checkpoint_dir, "pids")
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
        os.replace(path + ".tmp", path)  # a reader never sees half of it
        time.sleep(self.run_s)
        child.kill()
        child.wait()
        return quadratic(config, budget)
