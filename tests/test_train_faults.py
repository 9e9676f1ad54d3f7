"""The Trainer under faults (issue 23, "Nothing lost, nothing silently wrong"): two runs on
one checkpoint directory, SIGTERM, unwritable or full directories, and the memory a
checkpoint takes to save and load.

Tiny models and few steps; the subprocesses (a run holding the directory, a run that gets
SIGTERM, the memory probes) only wait on conditions, never on fixed sleeps, so that the file
passes on a loaded 2-core machine. Running as root, chmod does not stop writes: there the
read-only directory is simulated by making the file opens inside it fail (EROFS / ENOSPC),
the chmod variant is skipped."""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist

from accelops.train import CheckpointWarning, list_checkpoints, load_checkpoint
from accelops.train.checkpoint import save_checkpoint
from accelops.train.dirs import LOCK_NAME, DirectoryLock, DirectoryLocked
from accelops.train.trainer import default_loss

from .helpers import rank_results, run_forked_ranks
from .test_train import losses, make_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


pytestmark = pytest.mark.one_thread


def counting_loss():
    """A loss_fn that counts its calls (training and evaluation forwards)."""

    def loss_fn(model, batch):
        loss_fn.calls += 1
        return default_loss(model, batch)

    loss_fn.calls = 0
    return loss_fn


# A training run in a subprocess. argv: mode, checkpoint_dir.
#   hold:    builds a Trainer (which locks the directory), says "ready", waits for a line on
#            stdin, then trains 4 steps and says "done".
#   sigterm: trains "forever", says "training" at its 3rd step; the test sends SIGTERM.
_RUN = r"""
import sys
import torch
torch.set_num_threads(1)
from accelops.train.trainer import default_loss
from tests.test_train import make_trainer

mode, ckpt = sys.argv[1], sys.argv[2]
if mode == "hold":
    t = make_trainer(4, checkpoint_dir=ckpt, checkpoint_every=1, keep_last=10)
    print("ready", flush=True)
    sys.stdin.readline()
    t.fit()
    print("done", flush=True)
else:
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        if calls[0] == 3:
            print("training", flush=True)
        return default_loss(model, batch)

    make_trainer(10**6, checkpoint_dir=ckpt, loss_fn=loss_fn, log_every=1).fit()
"""


def start_run(tmp_path, mode, ckpt, expect):
    script = tmp_path / "run_trainer.py"
    script.write_text(_RUN)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(ckpt)],
        env=ENV,
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    line = proc.stdout.readline()  # blocks until the run says it is there (or dies)
    if line.strip() != expect:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the {mode} run did not get to {expect!r}: {line!r}\n{err}")
    return proc


# --------------------------------------------------------------------------- one run per directory


def test_second_run_on_a_checkpoint_dir_is_refused_naming_the_holder(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "step-00000001.ckpt.tmp-999999").write_bytes(b"half a checkpoint of a run that died")
    holder = start_run(tmp_path, "hold", d, "ready")
    try:
        assert not (d / "step-00000001.ckpt.tmp-999999").exists()  # the lock holder removes a dead run's
        with pytest.raises(DirectoryLocked) as info:
            make_trainer(4, checkpoint_dir=d)  # a second process: refused before it reads
        msg = str(info.value)
        assert repr(str(d)) in msg and f"pid {holder.pid} on {socket.gethostname()}" in msg
        assert "another checkpoint_dir" in msg
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = holder.communicate(timeout=120)
        assert holder.returncode == 0 and "done" in out, err
    finally:
        holder.kill()
        holder.wait()
    # the holder's checkpoints are all there, all its own: nothing pruned or interleaved by the other
    assert [s for s, _ in list_checkpoints(d)] == [4, 3, 2, 1]
    resumed = make_trainer(6, checkpoint_dir=d)  # free again once the holder ended
    assert resumed.step == 4
    resumed.close()


def test_a_killed_holder_leaves_the_directory_free(tmp_path):
    d = tmp_path / "ckpt"
    holder = start_run(tmp_path, "hold", d, "ready")
    holder.kill()  # SIGKILL: no clean-up code runs
    holder.wait()
    assert (d / LOCK_NAME).exists()  # the file stays, the OS dropped the lock
    t = make_trainer(2, checkpoint_dir=d)
    t.fit()
    assert t.step == 2


def test_two_trainers_in_one_process_and_pruning_only_own_files(tmp_path):
    d = tmp_path / "ckpt"
    first = make_trainer(3, checkpoint_dir=d, checkpoint_every=1, keep_last=1)
    with pytest.raises(DirectoryLocked, match="that is this process"):
        make_trainer(3, checkpoint_dir=d)
    # a temporary file that appears while the run holds the directory is not the run's own
    # (a writer that ignores the lock): pruning leaves it alone
    foreign = d / "step-00000002.ckpt.tmp-4242"
    foreign.write_bytes(b"someone else's save in progress")
    first.fit()  # releases the directory at the end
    assert foreign.exists()
    assert [s for s, _ in list_checkpoints(d)] == [3]
    second = make_trainer(5, checkpoint_dir=d)
    assert second.step == 3
    second.close()


def test_a_newer_bad_checkpoint_does_not_get_the_new_ones_pruned(tmp_path):
    d = tmp_path / "ckpt"
    make_trainer(2, checkpoint_dir=d, checkpoint_every=1, keep_last=1).fit()
    (d / "step-00000050.ckpt").write_bytes(b"garbage")  # a later checkpoint that is not whole
    with pytest.warns(CheckpointWarning, match="step-00000050"):
        t = make_trainer(4, checkpoint_dir=d, checkpoint_every=1, keep_last=1)
    assert t.step == 2
    t.fit()
    # the run's own newest checkpoint is kept (counting step 50 among the newest deleted it)
    assert [s for s, _ in list_checkpoints(d)] == [50, 4]
    assert load_checkpoint(d / "step-00000004.ckpt")["step"] == 4


def _ranks_worker(rank, world, port, out_dir, locked_dir, ckpt_dir):
    torch.set_num_threads(1)  # first: OpenMP pools do not survive the fork
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    res = {}
    try:
        try:  # the parent holds locked_dir
            make_trainer(2, checkpoint_dir=locked_dir, dropout=0.0)
        except DirectoryLocked as exc:
            res["refused"] = str(exc)
        calls = [0]

        def loss_fn(model, batch):
            calls[0] += 1
            if rank == 1 and calls[0] == 3:  # SIGTERM to rank 1 alone, in its step 3
                os.kill(os.getpid(), signal.SIGTERM)
            return default_loss(model, batch)

        t = make_trainer(50, checkpoint_dir=ckpt_dir, dropout=0.0, loss_fn=loss_fn, log_every=2)
        # The forked rank inherits the test process's handler, which is not SIG_DFL once an
        # earlier test in the same pytest run installed one (ray.init does): compare with it.
        before = signal.getsignal(signal.SIGTERM)
        try:
            t.fit()
        except KeyboardInterrupt as exc:
            res["stopped"] = (exc.step, exc.signum, str(exc))
        res["handler_restored"] = signal.getsignal(signal.SIGTERM) == before
    except BaseException:
        res["error"] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)


def test_two_ranks_refuse_a_held_directory_and_stop_together_on_sigterm(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    lock = DirectoryLock(locked)
    assert lock.acquire()
    try:
        run_forked_ranks(_ranks_worker, str(tmp_path), str(locked), str(tmp_path / "ckpt"))
    finally:
        lock.release()
    r0, r1 = rank_results(tmp_path)
    # rank 0 holds the lock for the run; rank 1 learns of the refusal from it
    assert f"pid {os.getpid()}" in r0["refused"] and r1["refused"].startswith("rank 0: ")
    # rank 1 alone was signalled in step 3; the ranks agree at the next log_every step (4)
    assert r0["stopped"][:2] == (4, None) and r1["stopped"][:2] == (4, signal.SIGTERM)
    assert "SIGTERM" in r1["stopped"][2] and "step-00000004.ckpt" in r0["stopped"][2]
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt")] == [4]
    assert r0["handler_restored"] and r1["handler_restored"]


# --------------------------------------------------------------------------- SIGTERM = SIGINT


def _not_handled_by_the_trainer(signum, frame):
    raise RuntimeError(f"{signal.Signals(signum).name} reached the handler that was there before fit()")


@pytest.fixture
def sigterm_guard():
    # SIGTERM's default would end pytest itself if the trainer did not handle it
    before = signal.signal(signal.SIGTERM, _not_handled_by_the_trainer)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, signum, sigterm_guard):
    ref = make_trainer(5)
    ref.fit()
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signum)  # arrives in the middle of step 3
        return default_loss(model, batch)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    d = tmp_path / "ckpt"
    t = make_trainer(5, checkpoint_dir=d, loss_fn=loss_fn, log_every=1)
    with pytest.raises(KeyboardInterrupt) as info:  # as Ctrl-C ended fit() before
        t.fit()
    assert type(info.value) is KeyboardInterrupt
    assert info.value.signum == signum and info.value.step == 3
    assert f"stopped by {signal.Signals(signum).name} after step 3" in str(info.value)
    assert {s: signal.getsignal(s) for s in before} == before  # handlers put back
    assert [s for s, _ in list_checkpoints(d)] == [3] and info.value.checkpoint.endswith("step-00000003.ckpt")
    resumed = make_trainer(5, model_seed=7, checkpoint_dir=d)
    assert resumed.step == 3
    resumed.fit()
    assert losses(t) + losses(resumed) == losses(ref)  # nothing lost: the run goes on exactly


def test_sigterm_to_a_training_process_writes_a_checkpoint_then_exits_as_sigint_does(tmp_path):
    d = tmp_path / "ckpt"
    proc = start_run(tmp_path, "sigterm", d, "training")
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    # an uncaught KeyboardInterrupt ends Python by SIGINT: what a Ctrl-C'ed run did before
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), err
    assert "KeyboardInterrupt: stopped by SIGTERM after step " in err
    step = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert step >= 3 and [s for s, _ in list_checkpoints(d)] == [step]
    assert load_checkpoint(list_checkpoints(d)[0][1])["step"] == step


# --------------------------------------------------------------------------- directories checked before step 1


def deny_writes(monkeypatch, directory, code):
    """Every open for writing of a file under `directory` fails with OSError(code): a
    read-only (EROFS) or full (ENOSPC) file system, also for root."""
    directory = os.path.abspath(directory)
    real_os_open, real_open = os.open, builtins.open

    def inside(path) -> bool:
        return not isinstance(path, int) and os.path.abspath(os.fspath(path)).startswith(directory + os.sep)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            raise OSError(code, os.strerror(code), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)


@pytest.mark.parametrize("which,code", [("checkpoint_dir", errno.EROFS), ("log_dir", errno.ENOSPC)])
def test_unwritable_directory_is_named_before_the_first_step(tmp_path, monkeypatch, which, code):
    d = tmp_path / which
    d.mkdir()
    deny_writes(monkeypatch, d, code)
    loss_fn = counting_loss()
    with pytest.raises(OSError) as info:
        make_trainer(20, loss_fn=loss_fn, checkpoint_every=15, **{which: d}).fit()
    assert info.value.errno == code
    assert f"{which} {str(d)!r} is not writable ({os.strerror(code)})" in str(info.value)
    assert loss_fn.calls == 0  # not one step trained into the void


@pytest.mark.skipif(
    IS_ROOT,
    reason="running as root: chmod does not stop root's writes (the EROFS / ENOSPC "
    "variants above simulate a read-only or full directory instead)",
)
def test_read_only_checkpoint_dir_by_chmod_is_named_before_the_first_step(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    d.chmod(0o555)
    loss_fn = counting_loss()
    try:
        with pytest.raises(PermissionError, match=f"checkpoint_dir {str(d)!r} is not writable"):
            make_trainer(20, loss_fn=loss_fn, checkpoint_dir=d, checkpoint_every=15).fit()
    finally:
        d.chmod(0o755)
    assert loss_fn.calls == 0


# --------------------------------------------------------------------------- a metrics write fails mid-run


def test_full_disk_at_a_metrics_write_checkpoints_then_raises_the_real_error(tmp_path, monkeypatch):
    real = csv.DictWriter.writerows

    def writerows(self, rows):
        rows = list(rows)
        if any(r.get("step") == 5 for r in rows):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, rows)

    monkeypatch.setattr(csv.DictWriter, "writerows", writerows)
    d = tmp_path / "ckpt"
    t = make_trainer(40, checkpoint_dir=d, log_dir=tmp_path / "log", log_every=1, checkpoint_every=30)
    with pytest.raises(OSError) as info:
        t.fit()
    assert info.value.errno == errno.ENOSPC  # the real error, not a consequence of it
    assert any(
        "training stopped after step 5" in n and "step-00000005.ckpt" in n for n in getattr(info.value, "__notes__", [])
    )
    assert [s for s, _ in list_checkpoints(d)] == [5]  # 5 steps kept, not thrown away
    resumed = make_trainer(40, checkpoint_dir=d)
    assert resumed.step == 5
    resumed.close()


def test_tensorboard_close_error_does_not_hide_the_write_error(tmp_path, monkeypatch):
    SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter
    real_add = SummaryWriter.add_scalar

    def add_scalar(self, tag, value, step=None, *args, **kwargs):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device: events file")
        return real_add(self, tag, value, step, *args, **kwargs)

    def close(self):
        raise RuntimeError("tensorboard close() failed (flushing into the full disk)")

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    monkeypatch.setattr(SummaryWriter, "close", close)
    d = tmp_path / "ckpt"
    with pytest.raises(OSError, match="events file"):
        make_trainer(10, checkpoint_dir=d, log_dir=tmp_path / "log", log_every=1).fit()
    assert [s for s, _ in list_checkpoints(d)] == [3]


# --------------------------------------------------------------------------- checkpoint memory

_MEMORY = r"""
import json, sys
import torch
torch.set_num_threads(1)
from accelops.train.checkpoint import load_checkpoint, save_checkpoint

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

mode, path, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = mib << 20
before = status("VmRSS")
if mode == "save":   # the state is made here: the peak counts it once, plus what saving adds
    state = {"model": {f"w{i}": torch.full((size // 16 // 4,), 1.5) for i in range(16)}, "step": 7}
    save_checkpoint(path, state)
else:                # load and read every tensor (the way a model's load_state_dict copies them)
    state = load_checkpoint(path)
    assert sum(float(t.sum()) for t in state["model"].values()) == 1.5 * size // 4
print(json.dumps({"peak_over_state": (status("VmHWM") - before) / size}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc/self/status")
def test_checkpoint_save_and_load_peak_near_one_state(tmp_path):
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY)
    path, mib = tmp_path / "big.ckpt", 96
    peaks = {}
    for mode in ("save", "load"):  # a process each: VmHWM is the peak of the process's life
        out = subprocess.run(
            [sys.executable, str(script), mode, str(path), str(mib)],
            env=ENV,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_over_state"]
    # one state's worth (made, or mapped and read) and little more; the former in-memory
    # save and load peaked at 3.0x (docs/training.md, "Reliability")
    assert peaks["save"] < 1.3 and peaks["load"] < 1.3, peaks


def test_previous_format_checkpoints_still_load(tmp_path):
    # the format before streaming: a 48-byte header (magic, length, SHA-256), then the payload
    import hashlib

    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 3}
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    old = tmp_path / "step-00000003.ckpt"
    old.write_bytes(struct.pack("<8sQ32s", b"ACCKPT01", len(payload), hashlib.sha256(payload).digest()) + payload)
    got = load_checkpoint(old)
    assert got["step"] == 3 and torch.equal(got["w"], state["w"])
    # and the current format is the payload first (torch.load can map it), the trailer last
    new = tmp_path / "new.ckpt"
    save_checkpoint(new, state)
    assert new.read_bytes()[:4] == b"PK\x03\x04" and new.read_bytes()[-88:-80] == b"ACCKPT02"
    assert torch.equal(torch.load(new, mmap=True, weights_only=True)["w"], state["w"])
