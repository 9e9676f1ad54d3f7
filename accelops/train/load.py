"""load_model: a language model trained by `accelops train` (or run / build / ray_fit), back
from its checkpoint, with the vocabulary it was trained on, ready to sample from.

    from accelops.train import load_model

    model, vocab = load_model("runs/shakespeare/ckpt")        # the newest good checkpoint there
    ids = vocab.encode("ROMEO:")[None]                          # [1, len] token ids
    next_id = model(ids)[0, -1].argmax()
    print(vocab.decode([next_id]))

What it reads is what the trainer wrote: the model's state dict and, in the checkpoint's
metadata, the config (its [model] and [sharing] sections rebuild the architecture, data
seq_len its default max_len) and the vocabulary as a plain string. Nothing is unpickled
beyond torch's weights_only loader (and, for fsdp's DCP directories, a metadata file read
with an unpickler that admits only DCP's own metadata classes).
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings

import torch

from .checkpoint import (
    CHECKPOINT_FORMAT,
    DIR_NAME,
    MANIFEST,
    TRAINER_FILE,
    CheckpointError,
    list_checkpoints,
    list_dir_checkpoints,
    load_checkpoint,
    newest_good,
    verify_dir_checkpoint,
)

__all__ = ["load_model"]

log = logging.getLogger("accelops.train")


def load_model(checkpoint, device="cpu"):
    """-> (model, vocab): the accelops.models language model of `checkpoint`, in eval mode on
    `device`, and its CharVocab (vocab.encode(str) -> token ids, vocab.decode(ids) -> str).

    checkpoint: a checkpoint file (step-NNNNNNNN.ckpt), a sharded checkpoint directory
    (step-NNNNNNNN.dcp of strategy="fsdp", step-NNNNNNNN.pp of strategy="pipeline"), or a run's
    checkpoint_dir, where the newest checkpoint that is complete and passes its checksums is
    taken, as a resume would (a CheckpointWarning names each newer one skipped).

    FileNotFoundError when the path does not exist; CheckpointError (naming the file and the
    reason) for a truncated, corrupt or foreign file, a directory without checkpoints, or a
    checkpoint written by a Trainer outside `accelops train` (no config and vocabulary in its
    metadata: rebuild that model yourself and load load_checkpoint(path)["model"])."""
    path = os.fspath(checkpoint)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path) and not _is_dir_checkpoint(path):
        path = _newest_in(path)
    if os.path.isdir(path):  # sharded: the trainer state in one file, the weights in the parts
        state, load_weights = _open_dir_checkpoint(path)
    else:
        state = load_checkpoint(path)
        _check_trainer_state(state, path)
        load_weights = lambda model: model.load_state_dict(state["model"])  # noqa: E731
    model, vocab = _build(state, path)
    try:
        load_weights(model)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError) as exc:  # load_state_dict's missing / unexpected / mis-sized
        raise CheckpointError(
            f"checkpoint {path!r}: its weights do not fit the model its config builds: {' '.join(str(exc).split())}"
        ) from exc
    log.info("loaded %s (step %s)", path, state.get("step"))
    return model.to(device).eval(), vocab


# --------------------------------------------------------------------------- finding the checkpoint


def _is_dir_checkpoint(path: str) -> bool:
    """One sharded checkpoint (by its name, or by its manifest when it was renamed), not a
    directory of checkpoints."""
    return DIR_NAME.match(os.path.basename(os.path.normpath(path))) is not None or os.path.isfile(
        os.path.join(path, MANIFEST)
    )


def _newest_in(directory: str) -> str:
    """The newest checkpoint of a run's checkpoint_dir (file or directory, whatever the
    strategy) that opens, as the Trainer's resume picks it."""
    candidates = sorted(
        list_checkpoints(directory) + list_dir_checkpoints(directory, "dcp") + list_dir_checkpoints(directory, "pp"),
        reverse=True,
    )
    if not candidates:
        raise CheckpointError(
            f"{directory!r} holds no checkpoints (files step-NNNNNNNN.ckpt or directories "
            "step-NNNNNNNN.dcp / .pp): pass a run's checkpoint_dir or one checkpoint"
        )
    # A file is opened whole to check it; a directory by its manifest (sizes and SHA-256).
    path, _ = newest_good(
        directory,
        candidates,
        lambda p: verify_dir_checkpoint(p) if os.path.isdir(p) else load_checkpoint(p),
        stacklevel=3,
        using="loading",
        advice="",
    )
    return path


def _check_trainer_state(state, path: str) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path!r} is not a Trainer checkpoint: it holds a {type(state).__name__}")
    if "stage" in state and "split" in state:
        raise CheckpointError(
            f"{path!r} is one stage of a pipeline checkpoint: pass its step-NNNNNNNN.pp "
            "directory (or the run's checkpoint_dir)"
        )
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path!r} is not a Trainer checkpoint of format {CHECKPOINT_FORMAT} (format {state.get('format')!r})"
        )
    if "model" not in state:
        raise CheckpointError(
            f"{path!r} holds the trainer state of a sharded checkpoint, not the model: pass its "
            "step-NNNNNNNN.dcp / .pp directory (or the run's checkpoint_dir)"
        )


# --------------------------------------------------------------------------- the model and vocabulary


def _build(state: dict, path: str):
    from ..sharing import share_parameters
    from .config import ConfigError, build_model, section
    from .data import CharVocab

    meta = state.get("metadata")
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict) and isinstance(meta.get("vocab"), str)):
        raise CheckpointError(
            f"checkpoint {path!r} has no config and vocabulary in its metadata: it was written by "
            "a Trainer outside `accelops train` (run / build / ray_fit); rebuild that model "
            "yourself and load accelops.train.load_checkpoint(path)['model'] into it"
        )
    config = meta["config"]
    try:
        vocab = CharVocab(meta["vocab"])
        seq_len = section(config, "data").get("seq_len", 128)
        model = build_model(section(config, "model"), len(vocab), seq_len)
        sharing = section(config, "sharing")
        if sharing:  # the shared (tied) parameters are part of the architecture the weights fit
            share_parameters(model, sharing.pop("pattern"), **sharing)
    except (ConfigError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path!r}: the model its config describes cannot be built here: {exc}"
        ) from exc
    return model, vocab


# --------------------------------------------------------------------------- sharded directories


def _open_dir_checkpoint(path: str):
    """(trainer state, a function loading the weights into a freshly built model) of a
    step-NNNNNNNN.dcp / .pp directory, after checking its manifest."""
    manifest = verify_dir_checkpoint(path)  # every file there has the size and SHA-256 its manifest says
    state = load_checkpoint(os.path.join(path, TRAINER_FILE))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path!r}: {TRAINER_FILE} holds a {type(state).__name__}, not a trainer state")
    if manifest.get("kind") == "pp":
        return state, lambda model: model.load_state_dict(_pipeline_weights(path, state))
    if manifest.get("kind") == "dcp":
        return state, lambda model: _load_dcp(model, os.path.join(path, "dcp"), path)
    raise CheckpointError(
        f"checkpoint {path!r} is of kind {manifest.get('kind')!r}; this accelops reads 'dcp' "
        "(fsdp) and 'pp' (pipeline) directories"
    )


def _pipeline_weights(path: str, state: dict) -> dict:
    """The whole model's state dict from the stage files: stage r holds blocks [lo, hi) as
    blocks.0.. (and the embeddings on the first, the norm and head on the last)."""
    split = (state.get("strategy") or {}).get("split")
    if not isinstance(split, list):
        raise CheckpointError(f"pipeline checkpoint {path!r} does not record its pipeline_split")
    out = {}
    for r, lo in enumerate([0, *split]):
        stage = load_checkpoint(os.path.join(path, f"stage-{r}.ckpt"))
        for key, value in stage["model"].items():
            if key.startswith("blocks."):
                i, rest = key[len("blocks.") :].split(".", 1)
                key = f"blocks.{lo + int(i)}.{rest}"
            out[key] = value
    return out


class _DCPMetadataUnpickler(pickle.Unpickler):
    # DCP writes its .metadata with pickle and reads it with pickle.load, which would run
    # whatever a crafted file names. Only DCP's metadata records and the plain values in them
    # (torch dtypes and sizes, paths) are admitted here.
    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _PLAIN = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self._PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in self._MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):  # classes (dataclasses, enums), not functions
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


def _load_dcp(model, dcp_dir: str, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    class SafeReader(dcp.FileSystemReader):
        # FileSystemReader.read_metadata with the restricted unpickler; the rest (the tensors,
        # read with torch.load(weights_only=True)) is torch's own.
        def read_metadata(self, *args, **kwargs):
            meta_path = os.path.join(dcp_dir, ".metadata")  # what dcp.save writes (no per-rank metadata)
            try:
                with open(meta_path, "rb") as f:
                    metadata = _DCPMetadataUnpickler(f).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
                raise CheckpointError(f"checkpoint {path!r}: its DCP metadata {meta_path!r} is refused: {exc}") from exc
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    # The same key layout the fsdp strategy saved (its get_state_dict), read into this
    # unsharded model; DCP reshards whatever world size wrote it.
    weights = get_model_state_dict(model)
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint {path!r}: the model has non-tensor state, which DCP would unpickle")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": weights}, storage_reader=SafeReader(dcp_dir), no_dist=True)
    except CheckpointException as exc:  # a BaseException holding each rank's (exception, traceback)
        first = next(iter(exc.failures.values()), (None, None))[0]
        if isinstance(first, CheckpointError):
            raise first from None
        raise CheckpointError(
            f"checkpoint {path!r}: DCP cannot load the model from it: "
            f"{' '.join(str(first).split()) if first is not None else exc}"
        ) from None
    set_model_state_dict(model, weights)
