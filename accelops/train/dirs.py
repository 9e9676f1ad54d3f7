"""The Trainer's directories: one run per checkpoint directory, and writable before step 1.

DirectoryLock is an exclusive fcntl.flock on `accelops.lock` in the checkpoint directory,
held for the run's life. The OS releases it when the process dies (however it dies), so a
lock file left behind by a crash never blocks the next run; the holder's PID and host are
written into the file so that a refused run can say who holds the directory. Two runs in one
directory would otherwise resume from, interleave and prune each other's checkpoints.

check_writable creates, writes, fsyncs and deletes a probe file, so a read-only, full or
missing directory is named before the first step instead of at the first save (the steps
until then lost) or the next metrics write (the run killed without a checkpoint).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
import warnings

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is skipped with a warning
    fcntl = None

__all__ = ["DirectoryLock", "DirectoryLocked", "check_writable", "LOCK_NAME"]

log = logging.getLogger("accelops.train")

LOCK_NAME = "accelops.lock"
# What a writer that died mid-save leaves: save_checkpoint's temporary file (see checkpoint/files.py).
_STALE_TMP = re.compile(r"^step-\d{8,}\.ckpt\.tmp-\d+$")


class DirectoryLocked(RuntimeError):
    """The checkpoint directory is held by another run (its PID and host are in the message)."""


def check_writable(directory, what: str) -> None:
    """Creates `directory` if needed and writes, fsyncs and deletes a small probe file in it;
    OSError naming `what` (e.g. "checkpoint_dir"), the directory and the cause otherwise."""
    directory = os.fspath(directory)
    probe = os.path.join(directory, f".accelops-write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"accelops checks that this directory takes writes\n")
            os.fsync(fd)  # a full disk may accept the write and refuse only here
        finally:
            os.close(fd)
            try:
                os.unlink(probe)
            except OSError:
                pass
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"{what} {directory!r} is not writable ({exc.strerror or exc}): fix it or "
            f"choose another {what} before training, nothing was trained",
        ) from exc


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        text = ""
    return text or "a process that has not written its PID yet"


class DirectoryLock:
    """An exclusive lock on `directory` for one run: acquire() or DirectoryLocked naming the
    holder; release() (also when the object is garbage collected, and by the OS when the
    process ends)."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd = self._pid = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Takes the lock -> True; False (with a warning) where the file system has no flock,
        so that training still runs there, unguarded. Removes the temporary files that dead
        writers left: with the lock held, no other run can be writing them."""
        if self._fd is not None:
            return True
        if fcntl is None:
            warnings.warn(
                f"no fcntl on this platform: checkpoint_dir {self.directory!r} is not locked, so nothing "
                "stops a second run from writing into it",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's PID is in it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder(self.path)
                mine = f"pid {os.getpid()} on {socket.gethostname()}" in holder
                raise DirectoryLocked(
                    f"checkpoint_dir {self.directory!r} is in use by another run ({holder}; lock file {self.path!r})"
                    + (
                        ": that is this process, another Trainer on this directory that has not finished fit() "
                        "or been close()d"
                        if mine
                        else ""
                    )
                    + ". Two runs in one directory would resume from and prune each other's checkpoints: wait for "
                    "it to end, stop it, or give this run another checkpoint_dir"
                ) from None
            # ENOLCK, EOPNOTSUPP, ENOSYS: a network file system without lock support
            warnings.warn(
                f"cannot lock checkpoint_dir {self.directory!r} ({exc}): this file system does not "
                "support flock, so nothing stops a second run from writing into it",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        try:
            os.ftruncate(fd, 0)
            os.write(
                fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
            )
        except OSError as exc:
            os.close(fd)  # releases the lock
            raise OSError(
                exc.errno,
                f"checkpoint_dir {self.directory!r}: cannot write the lock file {self.path!r} ({exc.strerror or exc})",
            ) from exc
        self._fd, self._pid = fd, os.getpid()
        self._remove_stale_temp_files()
        return True

    def _remove_stale_temp_files(self) -> None:
        for name in os.listdir(self.directory):
            if _STALE_TMP.match(name):
                try:
                    os.unlink(os.path.join(self.directory, name))
                    log.info("removed %s, left by a run that died while saving", name)
                except OSError:
                    pass

    def release(self) -> None:
        """Unlocks. The file stays: deleting it would let a run that has just opened it lock
        a file that another run then creates anew, two holders at once."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if os.getpid() != self._pid:
            # A forked child's copy of this object: its descriptor shares the parent's lock, and
            # LOCK_UN would release it for the parent too. Closing the copy leaves it held.
            os.close(fd)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
