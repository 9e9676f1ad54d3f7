"""Checkpoint files that are either whole or refused (one file: step-NNNNNNNN.ckpt).

A file is the payload, a torch.save of the trainer's state, followed by an 88-byte ASCII
trailer: b"ACCKPT02", the payload length (16 hex digits) and its SHA-256 (64 hex digits).
The payload comes first so that torch.load(mmap=True) can map the file as it is: the state
is streamed into the file on save (hashed as it is written, no copy in memory) and mapped
on load (hashed by reading the file in chunks first), so neither needs a second copy of
the state in memory. Files of the previous format (a 48-byte header b"ACCKPT01", length,
binary SHA-256, then the payload) still load.

A file is written to a temporary file in the same directory, fsynced, renamed over its
final name and the directory fsynced, so a crash at any point leaves either the previous
set of checkpoints or the new one, never a torn file under a checkpoint's name. A file
whose length or hash disagrees with its trailer (truncated by a full disk, bit rot, a copy
cut short) raises CheckpointError naming the file and what is wrong; latest_checkpoint()
then falls back to the newest good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import struct
import warnings

import torch

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "checkpoint_path",
    "newest_good",
    "atomic_write",
    "fsync_dir",
]

MAGIC = b"ACCKPT01"
_HEADER = struct.Struct("<8sQ32s")  # the previous format's header: magic, payload bytes, sha256(payload)
TRAILER_MAGIC = b"ACCKPT02"
# ASCII on purpose: a zip reader finds the archive's end record by scanning back from the end
# of the file for b"PK\x05\x06", which hex digits and this magic cannot contain.
_TRAILER = struct.Struct("<8s16s64s")  # magic, payload bytes (hex), sha256(payload) (hex)
_ZIP_MAGIC = b"PK\x03\x04"  # what torch.save's zip archive starts with
_CHUNK = 1 << 20
_NAME = re.compile(r"^step-(\d{8,})\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: truncated, corrupt or not a checkpoint."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt) and an older one used instead."""


def checkpoint_path(directory, step: int) -> str:
    return os.path.join(os.fspath(directory), f"step-{step:08d}.ckpt")


def fsync_dir(directory: str) -> None:
    """fsync a directory, so that a rename into it survives a crash (where the platform can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): rename is what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path):
    """A binary file to write `path` through: a temporary file in the same directory, fsynced
    and renamed over `path` when the block ends, removed if it raises."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def atomic_write(path, data: bytes) -> None:
    """Writes `data` to `path` so that `path` holds either its old content or all of `data`."""
    with _atomic_file(path) as f:
        f.write(data)


class _HashingWriter:
    """The file object torch.save writes through: hashes and counts the bytes on their way to
    the file. torch.save hands over memoryviews of the tensors' own memory, so the state is
    never copied into a buffer (the former io.BytesIO + header + payload held it twice more)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path, state: dict) -> str:
    """torch.save(state) into `path`, atomically, followed by a length and SHA-256 trailer;
    streamed: no copy of the state is made in memory."""
    with _atomic_file(path) as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
        f.write(_TRAILER.pack(TRAILER_MAGIC, b"%016x" % writer.size, writer.sha.hexdigest().encode()))
    return os.fspath(path)


def _sha256_of(f, start: int, size: int) -> bytes:
    """SHA-256 of `size` bytes of the open file `f` from `start`, read in chunks (the file is
    never held in memory whole)."""
    sha = hashlib.sha256()
    f.seek(start)
    left = size
    while left:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        sha.update(chunk)
        left -= len(chunk)
    return sha.digest()


class _Slice(io.RawIOBase):
    """The bytes of an open file from `start` on, as a file of their own: torch.load reads the
    zip archive of a previous-format checkpoint in place, after its 48-byte header."""

    def __init__(self, f, start: int):
        self.f, self.start = f, start
        f.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            offset += self.start
        return self.f.seek(offset, whence) - self.start

    def tell(self) -> int:
        return self.f.tell() - self.start

    def readinto(self, buffer) -> int:
        return self.f.readinto(buffer)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The state saved by save_checkpoint; CheckpointError when the file is truncated,
    corrupt or not a checkpoint (the message says which and names the file).

    The tensors are mapped from the file (torch.load mmap=True, copy-on-write), not read into
    memory: loading them into a model copies each once, from the page cache."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    with f:
        try:
            total = os.fstat(f.fileno()).st_size
            head = f.read(len(MAGIC))
            if head == MAGIC:
                return _load_headed(f, path, total, map_location)
            _check_trailed(f, path, total, head)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:  # a valid hash over bytes torch cannot read: written by something else
        raise CheckpointError(f"checkpoint {path!r} passed its checksum but torch.load failed: {exc}") from exc


def _check_trailed(f, path: str, total: int, head: bytes) -> None:
    """Checks a file of the current format (payload, then trailer) against its trailer."""
    if not head.startswith(_ZIP_MAGIC):
        raise CheckpointError(
            f"{path!r} is not an accelops checkpoint (it starts with {head!r}, expected a "
            f"torch.save archive followed by a {TRAILER_MAGIC!r} trailer)"
        )
    trailer = b""
    if total >= _TRAILER.size:
        f.seek(total - _TRAILER.size)
        trailer = f.read(_TRAILER.size)
    if not trailer.startswith(TRAILER_MAGIC):
        if trailer[-22:].startswith(b"PK\x05\x06"):  # ends with a zip's end record: torch.save alone wrote it
            raise CheckpointError(
                f"{path!r} is not an accelops checkpoint: a plain torch.save file (no {TRAILER_MAGIC!r} trailer)"
            )
        raise CheckpointError(
            f"checkpoint {path!r} is truncated: {total} bytes with no {TRAILER_MAGIC!r} trailer "
            "at its end (the write or a copy was cut short, or bytes were appended)"
        )
    _, size_hex, digest_hex = _TRAILER.unpack(trailer)
    try:
        size, digest = int(size_hex, 16), bytes.fromhex(digest_hex.decode("ascii"))
    except ValueError:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its trailer {trailer!r} is unreadable") from None
    payload = total - _TRAILER.size
    if payload != size:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt: {payload} payload bytes before its trailer, which declares {size}"
        )
    if _sha256_of(f, 0, size) != digest:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt: its SHA-256 does not match the trailer "
            "(the file changed after it was written)"
        )


def _load_headed(f, path: str, total: int, map_location) -> dict:
    """A file of the previous format (header, then payload): checked, then read in place."""
    if total < _HEADER.size:
        raise CheckpointError(
            f"checkpoint {path!r} is truncated: {total} bytes, shorter than its {_HEADER.size}-byte header"
        )
    f.seek(0)
    _, size, digest = _HEADER.unpack(f.read(_HEADER.size))
    payload = total - _HEADER.size
    if payload < size:
        raise CheckpointError(f"checkpoint {path!r} is truncated: {payload} of {size} payload bytes")
    if payload > size:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt: {payload - size} bytes past the {size}-byte payload its header declares"
        )
    if _sha256_of(f, _HEADER.size, size) != digest:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt: its SHA-256 does not match the header "
            "(the file changed after it was written)"
        )
    try:  # mmap needs the archive at the start of the file: these read each tensor once instead
        return torch.load(io.BufferedReader(_Slice(f, _HEADER.size)), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path!r} passed its checksum but torch.load failed: {exc}") from exc


def list_checkpoints(directory) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint file in `directory`, newest (highest step) first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def latest_checkpoint(directory, map_location="cpu"):
    """(path, state) of the newest checkpoint in `directory` that loads, or (None, None)
    when there is none. Each newer file that fails is reported by a CheckpointWarning
    saying why and which one is used instead; CheckpointError when files exist but none
    loads (starting afresh over them would lose the run)."""
    return newest_good(
        directory, list_checkpoints(directory), lambda path: load_checkpoint(path, map_location), stacklevel=2
    )


_AFRESH = ". Move the directory away (or pass resume=False with an empty directory) to start afresh"


def newest_good(
    directory, candidates, open_checkpoint, stacklevel: int = 2, using: str = "resuming from", advice: str = _AFRESH
):
    """(path, open_checkpoint(path)) of the first of `candidates` (newest first) that opens,
    warning about each newer bad one ("skipping it and <using> <path> instead"); (None, None)
    when there are none; CheckpointError (ending with `advice`) when every one is bad
    (starting afresh over them would lose the run). Shared by the file checkpoints here, the
    directory checkpoints of the sharded strategies and load_model."""
    failures = []
    for _, path in candidates:
        try:
            opened = open_checkpoint(path)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        for reason in failures:
            warnings.warn(
                f"{reason}; skipping it and {using} {path!r} instead", CheckpointWarning, stacklevel=stacklevel + 1
            )
        return path, opened
    if failures:
        raise CheckpointError(f"no usable checkpoint in {os.fspath(directory)!r}: " + "; ".join(failures) + advice)
    return None, None


def prune_checkpoints(directory, keep: int, up_to: int | None = None) -> list[str]:
    """Deletes all but the `keep` newest checkpoints of steps <= `up_to` (all steps when None)
    -> the deleted paths.

    Only checkpoint files are touched, never a temporary file: one may belong to a run
    writing at this moment (the Trainer's directory lock rules that out, then removes the
    ones a crash left behind: see accelops.train.dirs). A checkpoint of a later step than
    `up_to` is not this run's to judge: it is one the run did not resume from (it failed its
    checksum), and counting it among the newest would delete the checkpoints just written."""
    removed = []
    found = [(step, path) for step, path in list_checkpoints(directory) if up_to is None or step <= up_to]
    for _, path in found[keep:]:
        os.unlink(path)
        removed.append(path)
    return removed
