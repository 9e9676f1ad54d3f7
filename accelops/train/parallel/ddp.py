"""strategy="ddp" (the default): DistributedDataParallel over the whole model, with an
accelops.distributed gradient-compression hook on its all-reduce when `compression` asks
for one. Checkpoints are one file written by rank 0; each rank's hook state rides in it."""

from __future__ import annotations

import contextlib
import warnings

from ..batches import to_cpu
from .base import Strategy, TrainingSetup

__all__ = ["DDPStrategy", "compression_spec"]


def compression_spec(compression) -> tuple[str, dict]:
    """A hook name, or {"name": ..., **options} -> (name, options)."""
    if isinstance(compression, str):
        return compression, {}
    if isinstance(compression, dict) and isinstance(compression.get("name"), str):
        options = dict(compression)
        return options.pop("name"), options
    raise TypeError(f"compression must be a hook name or a dict {{'name': ..., **options}}, got {compression!r}")


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, ctx: TrainingSetup):
        optimizer = super().setup(ctx)
        if not ctx.env.distributed:
            return optimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = dict(ctx.ddp_kwargs or {})
        if ctx.env.device.type == "cuda":
            kw.setdefault("device_ids", [ctx.env.device.index])
        self.ddp = DDP(self.model, **kw)
        if ctx.compression is not None:
            from ...distributed import register_compression

            name, options = compression_spec(ctx.compression)
            self.hook_state = register_compression(self.ddp, name, **options)
        return optimizer

    @property
    def training_module(self):
        return self.ddp if self.ddp is not None else self.model

    def no_sync(self):
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def rank_state_dict(self) -> dict:
        return {"hook": None if self.hook_state is None else to_cpu(self.hook_state.state_dict())}

    def load_rank_state(self, state: dict, path: str) -> None:
        if self.hook_state is None:
            return
        if state.get("hook") is None:
            warnings.warn(
                f"checkpoint {path!r} has no communication-hook state (saved without compression): "
                "the hook starts afresh",
                stacklevel=4,
            )
        else:
            self.hook_state.load_state_dict(state["hook"])

    def release(self) -> None:
        # A DDP reducer still holding a destroyed gloo group could hang the process at exit.
        self.ddp = None
