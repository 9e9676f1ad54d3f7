"""Checkpoints as directories, step-NNNNNNNN.<kind>: what the sharded strategies write
("dcp": fsdp's torch.distributed.checkpoint shards, which load on another world size; "pp":
a file per pipeline stage).

Every rank writes its part into step-NNNNNNNN.<kind>.tmp; rank 0 adds the trainer state
(TRAINER_FILE) and a manifest (MANIFEST: the size and SHA-256 of every file), fsyncs and
renames the directory into place (commit_dir_checkpoint), so a crash leaves either the
previous set of checkpoints or the new one. A directory without a good manifest is refused
(verify_dir_checkpoint) and the previous one used (latest_dir_checkpoint).

These functions work on one rank's file system view; accelops.train.checkpoint.manager
runs them across the ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from .files import CheckpointError, atomic_write, fsync_dir, newest_good

__all__ = [
    "DIR_NAME",
    "MANIFEST",
    "TRAINER_FILE",
    "dir_checkpoint_path",
    "list_dir_checkpoints",
    "verify_dir_checkpoint",
    "latest_dir_checkpoint",
    "start_dir_checkpoint",
    "commit_dir_checkpoint",
    "prune_dir_checkpoints",
]

DIR_NAME = re.compile(r"^step-(\d{8,})\.(dcp|pp)$")
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.ckpt"


def dir_checkpoint_path(directory, step: int, kind: str) -> str:
    return os.path.join(os.fspath(directory), f"step-{step:08d}.{kind}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_dir_checkpoints(directory, kind: str) -> list[tuple[int, str]]:
    """(step, path) of the `kind` ("dcp" | "pp") checkpoint directories, newest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = DIR_NAME.match(name)
        if m and m.group(2) == kind and os.path.isdir(os.path.join(directory, name)):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def verify_dir_checkpoint(path: str) -> dict:
    """The manifest of a checkpoint directory, after checking that every file it lists has its
    size and SHA-256; CheckpointError naming the directory and the problem otherwise."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: it has no {MANIFEST} (the write did not finish)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path!r} has an unreadable {MANIFEST}: {exc}") from exc
    for name, (size, digest) in files.items():
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise CheckpointError(f"checkpoint {path!r} is incomplete: {name!r} is missing")
        if os.path.getsize(fp) != size:
            raise CheckpointError(
                f"checkpoint {path!r} is truncated or corrupt: {name!r} has "
                f"{os.path.getsize(fp)} bytes, the manifest says {size}"
            )
        if _sha256(fp) != digest:
            raise CheckpointError(
                f"checkpoint {path!r} is corrupt: the SHA-256 of {name!r} does not match its "
                "manifest (the file changed after it was written)"
            )
    return manifest


def latest_dir_checkpoint(directory, kind: str, stacklevel: int = 3):
    """(path, manifest) of the newest good `kind` directory, warning about each newer bad
    one; (None, None) when there is none; CheckpointError when all are bad."""
    return newest_good(directory, list_dir_checkpoints(directory, kind), verify_dir_checkpoint, stacklevel=stacklevel)


def start_dir_checkpoint(tmp: str) -> None:
    """Rank 0, before any rank writes: makes `tmp` (dir_checkpoint_path(...) + ".tmp") empty,
    removing what a dead run left there; every rank then writes its part into it."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)


def commit_dir_checkpoint(tmp: str, step: int, world_size: int, kind: str) -> str:
    """Rank 0, once every rank has written its part into `tmp` (and the trainer state is
    there): writes the manifest, fsyncs, and renames `tmp` to its final name -> that path."""
    final = tmp[: -len(".tmp")]
    files = {}
    for root, _, names in os.walk(tmp):
        for name in names:
            fp = os.path.join(root, name)
            rel = os.path.relpath(fp, tmp)
            with open(fp, "rb") as f:  # the ranks' writers may not have fsynced
                os.fsync(f.fileno())
            files[rel] = (os.path.getsize(fp), _sha256(fp))
    atomic_write(
        os.path.join(tmp, MANIFEST),
        json.dumps({"step": step, "world_size": world_size, "kind": kind, "files": files}, indent=1).encode(),
    )
    fsync_dir(tmp)
    old = None
    if os.path.exists(final):  # a resumed run rewriting a step: swap, then drop the old one
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune_dir_checkpoints(directory, kind: str, keep: int, up_to: int) -> None:
    """Deletes all but the `keep` newest `kind` directories of steps <= up_to, and the .tmp /
    .old directories a dead run left. Steps above up_to: checkpoints this run did not resume
    from (bad ones); counting them among the newest would delete the ones just written. Only
    rank 0 of the run holding the directory's lock (accelops.train.dirs) calls this, so no
    other run is writing here."""
    found = [(step, path) for step, path in list_dir_checkpoints(directory, kind) if step <= up_to]
    for _, path in found[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(directory):
        if name.endswith((f".{kind}.tmp", f".{kind}.old")):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
