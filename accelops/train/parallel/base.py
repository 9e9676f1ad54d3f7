"""Strategy: the protocol between the Trainer and a parallel strategy.

A strategy never sees the Trainer. The Trainer hands it a TrainingSetup once the process
group and the device exist (setup), then calls it at a few points of the run:

    optimizer = strategy.setup(TrainingSetup(...))   shard / wrap / split the model (zero1:
                                                     a new optimizer, which the Trainer uses)
    strategy.training_module                         what the micro-batch loop calls
    with strategy.no_sync(): ...                     every micro-batch of a step but the last
    strategy.runs_step, forward_backward(batches)    the strategy runs all the micro-batches
                                                     of a step itself (the pipeline schedule)
    strategy.clip_grad_norm(max_norm)                -> the gradients' global norm
    strategy.eval_totals(val_data, indices, evaluate_shard)
    strategy.rank_state_dict() / load_rank_state()   this rank's own state in a checkpoint
    checkpoint_layout, describe(), before_save(),    what accelops.train.checkpoint's
    reshards_on_load, write_shards / read_shards     Checkpointer asks of it
    strategy.full_model_state_dict()                 the whole model on rank 0
    strategy.release()                               before the process group goes

The base class is what a strategy that changes nothing at a given point does: one process,
or several that each run the whole model without synchronising anything (no shipped
strategy does the latter; "ddp" is the default).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch

from ..dist_env import DistEnv

__all__ = ["Strategy", "TrainingSetup", "names_by_group", "check_fresh_optimizer"]


@dataclasses.dataclass
class TrainingSetup:
    """What a strategy is given to set itself up: the processes, the model (on its device),
    the optimizer and scheduler over it, the training data (for a strategy that measures
    the model on it: the pipeline's split), the step's shape, autocast (() -> the context the
    Trainer runs forwards in) and, for DDP, its keyword arguments and the compression spec."""

    env: DistEnv
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    train_data: Any = None
    batch_size: int = 1
    accumulate_grad_batches: int = 1
    autocast: Callable[[], Any] = contextlib.nullcontext
    ddp_kwargs: dict | None = None
    compression: Any = None


class Strategy:
    name = "single"
    reshards_on_load = False  # a sharded checkpoint written by another world size loads (fsdp)
    ddp = None  # the DistributedDataParallel wrapper, for the strategies that use one
    hook_state = None  # the state of DDP's gradient-compression hook, when there is one

    def __init__(self):
        self.dp_rank, self.dp_world = 0, 1  # this rank among the data-parallel ranks (batches differ)
        self.env: DistEnv | None = None
        self.model = self.optimizer = None
        self.batch_size, self.accumulate_grad_batches = 1, 1
        self.autocast = contextlib.nullcontext

    def setup(self, ctx: TrainingSetup):
        """Once, before the first step -> the optimizer the Trainer steps (ctx.optimizer, or
        the one the strategy put in its place)."""
        self.env, self.model, self.optimizer = ctx.env, ctx.model, ctx.optimizer
        self.batch_size, self.accumulate_grad_batches = ctx.batch_size, ctx.accumulate_grad_batches
        self.autocast = ctx.autocast
        self.dp_rank, self.dp_world = ctx.env.rank, ctx.env.world_size
        return self.optimizer

    def describe(self) -> dict:
        """What the checkpoints record of the strategy (its name and layout-relevant options)."""
        return {"name": self.name}

    # ------------------------------------------------------------------ the step

    @property
    def training_module(self) -> torch.nn.Module:
        return self.model

    def no_sync(self):
        return contextlib.nullcontext()

    @property
    def runs_step(self) -> bool:
        """True: forward_backward runs the step's micro-batches, not the Trainer's loop."""
        return False

    def forward_backward(self, batches: list):
        """The forward and backward of a step's micro-batches (on the CPU, as the data gives
        them) -> (mean loss over them as a 0-dim tensor on every rank, tokens this rank read)."""
        raise NotImplementedError(f"strategy={self.name!r} leaves the step to the Trainer's loop")

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clips the gradients to a global norm of max_norm -> the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    # ------------------------------------------------------------------ evaluation

    def eval_totals(self, val_data, indices: list, evaluate_shard) -> torch.Tensor:
        """This rank's part of the validation totals over val_data[indices] (the Trainer sums
        them over ranks). evaluate_shard(mine, n_batches=None) -> the totals over the samples
        `mine` in forwards of the Trainer's batch size (n_batches: that many forwards)."""
        return evaluate_shard(indices[self.env.rank :: self.env.world_size])

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_layout(self) -> str:
        """How its checkpoints are laid out (accelops.train.checkpoint): "file", "dcp" or "pp"."""
        return "file"

    def before_save(self) -> None:
        """Called on every rank before rank 0 reads optimizer.state_dict() for a checkpoint file."""

    def write_shards(self, directory: str) -> None:
        """A sharded layout: writes this rank's part of a checkpoint into directory."""
        raise NotImplementedError(f"strategy={self.name!r} writes checkpoint files, not shards")

    def read_shards(self, directory: str, trainer_state: dict) -> None:
        """A sharded layout: loads this rank's part of the checkpoint in directory."""
        raise NotImplementedError(f"strategy={self.name!r} reads checkpoint files, not shards")

    def rank_state_dict(self) -> dict:
        """This rank's own state for a checkpoint (beside the Trainer's RNG state)."""
        return {}

    def load_rank_state(self, state: dict, path: str) -> None:
        """Restores what rank_state_dict saved ({} when the checkpoint has nothing of this rank)."""

    def full_model_state_dict(self) -> dict | None:
        """The whole model's state_dict on rank 0 (None on the others); every rank must call it
        (a sharded strategy gathers: for inspection and tests, not for checkpoints)."""
        if not self.env.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def release(self) -> None:
        """Drops what holds the process group (before the Trainer destroys it)."""


# --------------------------------------------------------------------------- helpers of the sharding strategies


def names_by_group(model, optimizer) -> list[list[str]]:
    """The parameter names of each of optimizer's groups, to rebuild the groups over the
    parameters a strategy replaces (fsdp's DTensors) or keeps (a pipeline stage's)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def check_fresh_optimizer(optimizer, strategy: str) -> None:
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError(
            f"strategy={strategy!r} rebuilds the optimizer's parameter lists: pass an optimizer that "
            "has not stepped yet (its state is restored from checkpoints by the Trainer)"
        )
