"""The study journal: one JSON object a line, each flushed and fsynced before the study
goes on, so a crash loses at most the line being written.

Records: a header ``{"type": "study", "version", "optimizer": spec}``, then in the order
they happened ``{"type": "ask", "trial": {...}}`` when a trial starts and
``{"type": "result", "trial_id", "status", "loss", "error", "duration", "info"}`` when it
ends. Reading tolerates a torn *last* line (the write a crash interrupted: a warning, and
the next append starts by cutting it off); a bad line anywhere else is a ValueError naming
the line. A line with NaN or +-Infinity, or an "ok" result without a finite loss, is a
ValueError wherever it is: no writer produces one, so it is damage, not a torn write.

One writer at a time: a ``JournalWriter`` holds an exclusive ``flock`` on
``<journal>.lock`` (which names its PID and host) while it is open, so a second writer
fails at once instead of interleaving its trials with the first's; the OS drops the lock
when the process dies, however it dies. Writes are O_APPEND. Reading takes no lock.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
import warnings

import numpy as np

__all__ = ["JournalWriter", "JournalLockedError", "read_journal", "to_json"]

VERSION = 1


class JournalLockedError(RuntimeError):
    """Another process (or another Study in this one) is writing the journal."""


def to_json(obj):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None, tuples to lists,
    anything else unknown to its repr."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    return repr(obj)


def finite_loss(loss) -> bool:
    """True for a real, finite number (what an "ok" result's loss must be)."""
    return isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)


class _NonFinite(Exception):
    pass


def _refuse_constant(name):
    # json.loads accepts NaN, Infinity and -Infinity by default; the writer never emits them
    raise _NonFinite(name)


def _check_record(rec) -> str | None:
    """Why a parsed record is wrong, or None."""
    if rec.get("type") == "result" and rec.get("status") == "ok":
        if "loss" not in rec:
            return "an 'ok' result without a loss"
        if not finite_loss(rec["loss"]):
            return f"an 'ok' result with loss {rec['loss']!r}, not a finite number"
    return None


def read_journal(path) -> tuple[list[dict], int]:
    """The records of a journal and the byte length of its intact part."""
    with open(path, "rb") as f:
        data = f.read()
    records, pos, lineno = [], 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        last = end == -1 or end == len(data) - 1
        line = data[pos:] if end == -1 else data[pos:end]
        lineno += 1
        try:
            if end == -1:
                raise ValueError("no newline at the end")
            rec = json.loads(line, parse_constant=_refuse_constant)
            if not isinstance(rec, dict) or "type" not in rec:
                raise ValueError("not a journal record")
        except _NonFinite as e:
            # a whole line that parses is no torn write, even the last one: refuse it
            raise ValueError(
                f"{path}: line {lineno} holds {e} (the journal stores finite numbers only); "
                "this journal cannot be resumed until that line is fixed or deleted"
            ) from None
        except ValueError as e:
            if last:
                warnings.warn(
                    f"{path}: ignoring a torn last line {lineno} ({e}); the trial it "
                    "described is treated as not written",
                    stacklevel=3,
                )
                break
            raise ValueError(
                f"{path}: line {lineno} is corrupt ({e}); only a torn last line can be "
                "recovered, so this journal cannot be resumed"
            ) from None
        why = _check_record(rec)
        if why is not None:
            raise ValueError(
                f"{path}: line {lineno} holds {why}; this journal cannot be resumed until that "
                "line is fixed or deleted (without its result line the trial is run again)"
            )
        records.append(rec)
        pos = end + 1
    return records, pos


def _holder(fd) -> str:
    """Who holds the lock on the open lock file ``fd``, from what the holder wrote in it."""
    # The holder writes its name right after taking the lock: give it a moment to do so.
    deadline = time.monotonic() + 1.0
    while True:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    try:
        who = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["time"]))
        return f"PID {who['pid']} on host {who['host']}, since {since}"
    except (ValueError, KeyError, TypeError, OverflowError, OSError):
        return "a process that has not written its PID and host"


def _lock(path: str) -> int:
    """Take the exclusive lock of journal ``path`` (or raise JournalLockedError naming its
    holder) and write our PID and host into the lock file; returns its descriptor."""
    lock_path = path + ".lock"
    # The lock file is never deleted: removing it while someone waits on it would let two
    # processes each lock a different file of the same name.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # flock, not fcntl/lockf: a POSIX lock is dropped when *any* descriptor of the file
        # in the process is closed, and is not held per open file (a second Study in this
        # process would not conflict). flock is released when the process dies (and its
        # children: a child forked by the objective would keep it; the process pool uses
        # forkserver/spawn, whose workers do not inherit it).
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd)
        os.close(fd)
        raise JournalLockedError(
            f"{path}: another study is writing this journal ({who}; lock file {lock_path}); a journal "
            "has one writer at a time. Wait for it to finish or stop it, then continue with "
            "hpo.Study.resume(journal); to only look at it, use hpo.Study.resume(journal, read_only=True)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode(), 0)
    return fd


def _unlock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # no stale name for the next writer's competitors to read
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


class JournalWriter:
    """Appends records to ``path`` while holding its lock (see the module doc).

    ``create=True``: a new journal (the path may exist only as an empty file: FileExistsError
    otherwise). ``create=False``: an existing one, continued after its last byte; ``cut``
    then drops a torn tail. ``close`` releases file and lock and remembers the journal's
    size and time; ``reopen`` takes them again and refuses if someone changed it since."""

    def __init__(self, path, create: bool):
        self.path = os.fspath(path)
        self._fd = self._lock_fd = None
        self._closed_state = None
        if create:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._open(create)

    def _open(self, create):
        if not create and not os.path.isfile(self.path):
            # checked before the lock, which would otherwise leave a stray .lock file
            raise FileNotFoundError(f"no journal at {self.path!r}")
        lock_fd = _lock(self.path)
        try:
            flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
            fd = os.open(self.path, flags, 0o644)
            # The lock is taken before this check, so two new studies cannot both find the
            # path free and then both write a header.
            if create and os.fstat(fd).st_size > 0:
                os.close(fd)
                raise FileExistsError(
                    f"journal {self.path!r} already exists: continue it with "
                    "hpo.Study.resume(journal) or choose another path"
                )
        except BaseException:
            _unlock(lock_fd)
            raise
        self._fd, self._lock_fd = fd, lock_fd

    def _state(self, st):
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def cut(self, keep: int) -> None:
        """Drop everything after the first ``keep`` bytes (a torn last line)."""
        if os.fstat(self._fd).st_size > keep:
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)

    def write(self, record: dict) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: the journal writer is closed")
        # to_json turns non-finite floats into null: an ok result's loss is checked after it,
        # or the journal would hold a line that read_journal refuses.
        payload = to_json(record)
        why = _check_record(payload)
        if why is not None:
            raise ValueError(f"{self.path}: refusing to write {why}: {record!r}")
        line = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode() + b"\n"
        n = os.write(self._fd, line)  # O_APPEND: one write() at the end of the file
        while n < len(line):  # a short write (disk full, signal) leaves a torn tail at worst
            n += os.write(self._fd, line[n:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self._closed_state = self._state(os.fstat(self._fd))
            os.close(self._fd)
        finally:
            self._fd = None
            _unlock(self._lock_fd)
            self._lock_fd = None

    def __del__(self):
        # Plain descriptors are not closed by the garbage collector as file objects are: a
        # study dropped without close() would keep the lock for the life of the process.
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- at interpreter exit os may be half torn down
            pass

    def reopen(self) -> None:
        """Take the lock again after ``close``; a ValueError if the journal changed since."""
        if self._fd is not None:
            return
        self._open(create=False)
        if self._state(os.fstat(self._fd)) != self._closed_state:
            expected = self._closed_state
            self.close()
            self._closed_state = expected  # so that every later reopen refuses too
            raise ValueError(
                f"{self.path}: the journal changed since this study last wrote it (another "
                "process continued it?); this study's state is out of date: continue with "
                "hpo.Study.resume(journal)"
            )
