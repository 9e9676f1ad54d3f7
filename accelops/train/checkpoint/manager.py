"""Checkpointer: a Trainer's checkpoints in its checkpoint_dir, whatever the strategy.

A checkpoint holds the trainer state (the step, data position, scheduler, ... : a dict the
Trainer makes and reads back; CHECKPOINT_FORMAT is its version), each rank's own state (its
RNG, a DDP communication hook's) and the model and optimizer, laid out as the strategy says:

- "file" (ddp, zero1, one-process runs but fsdp's): one file step-NNNNNNNN.ckpt that rank 0
  writes (accelops.train.checkpoint.files), the model and optimizer state in it;
- "dcp" (fsdp) and "pp" (pipeline on several processes): a directory step-NNNNNNNN.<kind>
  in which every rank writes its shards through the strategy (accelops.train.checkpoint.sharded).

The strategy is reached only through what every strategy has (accelops.train.parallel.Strategy):
name, checkpoint_layout, describe(), before_save(), reshards_on_load, write_shards(directory)
and read_shards(directory, trainer_state). Every method here is called on every rank: rank 0
chooses, writes, renames and prunes (it holds the directory's lock); the others follow
through the collectives of DistEnv.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

from .files import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .sharded import (
    MANIFEST,
    TRAINER_FILE,
    commit_dir_checkpoint,
    dir_checkpoint_path,
    latest_dir_checkpoint,
    list_dir_checkpoints,
    prune_dir_checkpoints,
    start_dir_checkpoint,
)

__all__ = ["Checkpointer", "CHECKPOINT_FORMAT", "LAYOUTS"]

log = logging.getLogger("accelops.train")

CHECKPOINT_FORMAT = 1
LAYOUTS = ("file", "dcp", "pp")
# Which strategies write each layout, for the error about a directory of another run's.
_OWNERS = {"file": "'ddp' or 'zero1' (or 'pipeline' on one process)", "dcp": "'fsdp'", "pp": "'pipeline'"}
_ERRORS = {"ValueError": ValueError, "CheckpointError": CheckpointError}


class Checkpointer:
    """Saves and resumes the checkpoints in `directory`, keeping the newest `keep_last`.
    strategy: the run's accelops.train.parallel.Strategy, set up; env: its DistEnv."""

    def __init__(self, directory, keep_last: int, strategy, env):
        self.directory, self.keep_last = os.fspath(directory), keep_last
        self.strategy, self.env = strategy, env

    @property
    def layout(self) -> str:
        return self.strategy.checkpoint_layout

    @property
    def every_rank_writes(self) -> bool:
        """Every rank writes into the directory (its shards), not only rank 0."""
        return self.layout != "file"

    # ------------------------------------------------------------------ saving

    def save(self, step: int, model, optimizer, trainer_state, rank_state: dict) -> str | None:
        """Writes the checkpoint of `step` (every rank calls it) -> its path on rank 0, None on
        the others. trainer_state: () -> the trainer's state dict (called on rank 0 only);
        rank_state: this rank's own state (gathered to rank 0)."""
        if self.layout != "file":
            return self._save_dir(step, trainer_state, rank_state)
        self.strategy.before_save()  # zero1: consolidates the optimizer state on rank 0
        ranks = self.env.gather(rank_state)
        path = None
        if self.env.is_main:
            state = trainer_state()
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict(), rank_states=ranks)
            path = save_checkpoint(checkpoint_path(self.directory, step), state)
            prune_checkpoints(self.directory, self.keep_last, up_to=step)
            log.info("saved %s", path)
        self.env.barrier()
        return path

    def _save_dir(self, step: int, trainer_state, rank_state: dict) -> str | None:
        env, kind = self.env, self.layout
        tmp = dir_checkpoint_path(self.directory, step, kind) + ".tmp"
        if env.is_main:
            start_dir_checkpoint(tmp)
        env.barrier()  # the others write into the directory rank 0 made
        self.strategy.write_shards(tmp)
        ranks = env.gather(rank_state)
        final = None
        if env.is_main:
            state = trainer_state()
            state.update(rank_states=ranks, strategy=self.strategy.describe())
            save_checkpoint(os.path.join(tmp, TRAINER_FILE), state)
            final = commit_dir_checkpoint(tmp, step, env.world_size, kind)
            prune_dir_checkpoints(self.directory, kind, self.keep_last, up_to=step)
            log.info("saved %s", final)
        env.barrier()
        return final

    # ------------------------------------------------------------------ resuming

    def resume(self, resume: bool, model, optimizer):
        """The checkpoint this run continues from, loaded into model, optimizer (and, for a
        sharded layout, the strategy's shards) -> (path, trainer state, this rank's state or
        None when it was not saved (fsdp on another world size)), or None to start afresh.

        resume=True: the newest good checkpoint (CheckpointWarning for each newer bad one);
        resume=False: ValueError when the directory holds any. Rank 0 chooses and tells the
        others, so every rank loads the same one; an error there is raised on every rank (the
        others would wait in the next collective otherwise)."""
        path, state = self._choose(resume)
        if path is None:
            return None
        if self.layout == "file":
            return self._load_file(path, state, model, optimizer)
        return self._load_dir(path)

    def _choose(self, resume: bool):
        choice = opened = None
        if self.env.is_main:
            try:
                self.check_foreign()  # a directory of another strategy's checkpoints
                if not resume:
                    found = self._list()
                    if found:
                        raise ValueError(
                            f"checkpoint_dir {self.directory!r} already holds checkpoints (newest: "
                            f"step {found[0][0]}) and resume=False: pass resume=True to continue that "
                            "run, or use an empty directory"
                        )
                    choice = ("fresh", None)
                else:
                    path, opened = (
                        latest_checkpoint(self.directory)
                        if self.layout == "file"
                        else latest_dir_checkpoint(self.directory, self.layout)
                    )
                    choice = ("fresh", None) if path is None else ("resume", path)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                choice = ("error", (type(exc).__name__, str(exc)))
        kind, value = self.env.broadcast(choice)
        if kind == "error":
            raise _ERRORS.get(value[0], RuntimeError)(value[1])
        if kind == "fresh":
            return None, None
        # rank 0 has the file's state already (opening it checked it): the others read it
        state = opened if self.env.is_main and self.layout == "file" else None
        return value, state

    def _list(self) -> list[tuple[int, str]]:
        if self.layout == "file":
            return list_checkpoints(self.directory)
        return list_dir_checkpoints(self.directory, self.layout)

    def _load_file(self, path: str, state, model, optimizer):
        if state is None:
            state = load_checkpoint(path)
        self._check_format(state, path)
        if state["world_size"] != self.env.world_size:
            raise ValueError(
                f"checkpoint {path!r} was written by a run of {state['world_size']} process(es), this "
                f"run has {self.env.world_size}: the data position, RNG and communication-hook states "
                "are per rank. Resume with the same number of processes"
            )
        self._check_strategy(state, path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return path, state, state["rank_states"][self.env.rank]

    def _load_dir(self, path: str):
        env = self.env
        state = load_checkpoint(os.path.join(path, TRAINER_FILE))
        self._check_format(state, path)
        self._check_strategy(state, path)
        if state["world_size"] != env.world_size:
            if not self.strategy.reshards_on_load:
                raise ValueError(
                    f"checkpoint {path!r} was written by a run of {state['world_size']} process(es), "
                    f"this run has {env.world_size}: strategy={self.strategy.name!r} resumes on the same "
                    "number of processes only"
                )
            if env.is_main:
                warnings.warn(
                    f"checkpoint {path!r} was written by {state['world_size']} process(es), this run has "
                    f"{env.world_size}: the model and optimizer are resharded; the data position is kept "
                    "as (epoch, batch), which repeats the uninterrupted run when batch_size x world size is "
                    "unchanged; the RNG states are per rank, so every rank starts from fresh seeds (dropout "
                    "masks differ)",
                    stacklevel=5,
                )
        ranks = state["rank_states"]
        # On another world size this rank's state was not saved (fsdp): the trainer seeds it afresh.
        rank_state = ranks[env.rank] if env.rank < len(ranks) and len(ranks) == env.world_size else None
        self.strategy.read_shards(path, state)
        return path, state, rank_state

    @staticmethod
    def _check_format(state, path: str) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"checkpoint {path!r} has format {found!r}, this trainer reads {CHECKPOINT_FORMAT}")

    def _check_strategy(self, state: dict, path: str) -> None:
        saved = state.get("strategy", {"name": "ddp"})
        saved = saved.get("name") if isinstance(saved, dict) else saved
        if saved != self.strategy.name:
            raise ValueError(
                f"checkpoint {path!r} was written with strategy={saved!r}, this run has strategy="
                f"{self.strategy.name!r}: the optimizer (and model) state is laid out differently. "
                f"Resume with strategy={saved!r}"
            )

    def check_foreign(self) -> None:
        """ValueError when the directory holds checkpoints of another layout (another strategy,
        or the pipeline on another number of processes): resuming would silently start afresh."""
        d, mine = self.directory, self.layout
        for kind in LAYOUTS:
            if kind == mine:
                continue
            found = list_checkpoints(d) if kind == "file" else list_dir_checkpoints(d, kind)
            if not found:
                continue
            world = "?"
            try:
                world = (
                    load_checkpoint(found[0][1])
                    if kind == "file"
                    else json.load(open(os.path.join(found[0][1], MANIFEST)))
                )["world_size"]
            except Exception:  # noqa: BLE001 - only for the message
                pass
            raise ValueError(
                f"checkpoint_dir {d!r} holds checkpoints of strategy={_OWNERS[kind]} (newest "
                f"{os.path.basename(found[0][1])!r}, written by a run of {world} process(es)); this run "
                f"(strategy={self.strategy.name!r}) has {self.env.world_size} process(es) and reads "
                f"{'its own ' + mine if mine != 'file' else 'checkpoint files'}: resume with the "
                "strategy and number of processes that wrote them, or use another directory"
            )
