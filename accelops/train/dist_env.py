"""The processes of a training run as the Trainer, its parallel strategies and its
checkpoints see them: this process's rank, the world size, the device, and the few object
collectives their glue needs (broadcast from rank 0, gather to rank 0, barrier). One process
is the degenerate case: every collective is then the identity, so no caller branches on it.

Nothing here starts or owns a process group (the Trainer does that); DistEnv only describes
the one in use.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "collective_failure"]


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """distributed: torch.distributed is initialised and this run uses it (rank and
    world_size are then the process group's); device: where this rank's model lives."""

    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's obj, on every rank (every rank must call it)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [obj]
        ranks = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, ranks, dst=0)
        return ranks

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


# What the errors of a failed collective say (gloo and NCCL word them differently, and a
# dead peer shows as a socket error as often as a timeout).
_COMM_MARKERS = (
    "gloo",
    "nccl",
    "connection",
    "timed out",
    "timeout",
    "closed by peer",
    "reset by peer",
    "broken pipe",
    "socket",
)


def collective_failure(
    exc: BaseException, env: DistEnv, strategy: str, step: int, last_saved: int | None, checkpoint_dir
) -> RuntimeError | None:
    """A clearer error for `exc` when it is a failed collective (a peer died or timed out)
    during step `step` + 1: which rank, which strategy, and whether the last checkpoint
    (`last_saved`, None for none) can be resumed; None when exc is something else."""
    if not env.distributed:
        return None
    text = f"{type(exc).__name__}: {exc}"
    if not (
        isinstance(exc, getattr(dist, "DistError", ()))
        or (isinstance(exc, (RuntimeError, OSError)) and any(m in str(exc).lower() for m in _COMM_MARKERS))
    ):
        return None
    where = (
        "no checkpoint was written yet"
        if last_saved is None or checkpoint_dir is None
        else f"the last checkpoint (step {last_saved}) in {checkpoint_dir!r} is intact: run again to resume"
    )
    return RuntimeError(
        f"rank {env.rank}/{env.world_size}: a collective failed during step {step + 1} under "
        f"strategy={strategy!r} (a peer rank died, or did not answer within the process group's "
        f"timeout); {where}. Cause: {text.splitlines()[0][:400]}"
    )
