"""Checkpoint files that are either whole or refused.

A file is a 48-byte header (magic, payload length, SHA-256 of the payload) followed by the
payload, a torch.save of the trainer's state. It is written to a temporary file in the
same directory, fsynced, renamed over its final name and the directory fsynced, so a crash
at any point leaves either the previous set of checkpoints or the new one, never a torn
file under a checkpoint's name. A file whose length or hash disagrees with its header
(truncated by a full disk, bit rot, a copy cut short) raises CheckpointError naming the
file and what is wrong; latest_checkpoint() then falls back to the newest good one.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import warnings

import torch

__all__ = ["CheckpointError", "CheckpointWarning", "save_checkpoint", "load_checkpoint", "list_checkpoints",
           "latest_checkpoint", "prune_checkpoints", "checkpoint_path"]

MAGIC = b"ACCKPT01"
_HEADER = struct.Struct("<8sQ32s")  # magic, payload bytes, sha256(payload)
_NAME = re.compile(r"^step-(\d{8,})\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: truncated, corrupt or not a checkpoint."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt) and an older one used instead."""


def checkpoint_path(directory, step: int) -> str:
    return os.path.join(os.fspath(directory), f"step-{step:08d}.ckpt")


def _fsync_dir(directory: str) -> None:
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


def atomic_write(path, data: bytes) -> None:
    """Writes `data` to `path` so that `path` holds either its old content or all of `data`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def save_checkpoint(path, state: dict) -> str:
    """torch.save(state) into `path`, atomically, with a length and SHA-256 header."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest())
    atomic_write(path, header + payload)
    return os.fspath(path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The state saved by save_checkpoint; CheckpointError when the file is truncated,
    corrupt or not a checkpoint (the message says which and names the file)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    if len(data) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path!r} is truncated: {len(data)} bytes, shorter than its "
                              f"{_HEADER.size}-byte header")
    magic, size, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{path!r} is not an accelops checkpoint (header {magic!r}, expected {MAGIC!r})")
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) < size:
        raise CheckpointError(f"checkpoint {path!r} is truncated: {len(payload)} of {size} payload bytes")
    if len(payload) > size:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: {len(payload) - size} bytes past the "
                              f"{size}-byte payload its header declares")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its SHA-256 does not match the header "
                              "(the file changed after it was written)")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # a valid hash over bytes torch cannot read: written by something else
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
    return newest_good(directory, list_checkpoints(directory), lambda path: load_checkpoint(path, map_location),
                       stacklevel=2)


_AFRESH = ". Move the directory away (or pass resume=False with an empty directory) to start afresh"


def newest_good(directory, candidates, open_checkpoint, stacklevel: int = 2, using: str = "resuming from",
                advice: str = _AFRESH):
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
            warnings.warn(f"{reason}; skipping it and {using} {path!r} instead", CheckpointWarning,
                          stacklevel=stacklevel + 1)
        return path, opened
    if failures:
        raise CheckpointError(f"no usable checkpoint in {os.fspath(directory)!r}: " + "; ".join(failures) + advice)
    return None, None


def prune_checkpoints(directory, keep: int) -> list[str]:
    """Deletes all but the `keep` newest checkpoints and any temporary files that a crash
    left behind -> the deleted paths."""
    directory = os.fspath(directory)
    removed = []
    for _, path in list_checkpoints(directory)[keep:]:
        os.unlink(path)
        removed.append(path)
    for name in os.listdir(directory):
        if ".ckpt.tmp-" in name and name.split(".tmp-")[-1] != str(os.getpid()):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except OSError:
                pass
    return removed
