"""strategy="zero1": `torch.distributed.optim.ZeroRedundancyOptimizer` over DDP. DDP for the
gradients (with its compression hooks, which ZeRO leaves alone: it only partitions the
optimizer step), ZeroRedundancyOptimizer for the optimizer state, sharded over the ranks.
The checkpoint consolidates the optimizer state on rank 0 into the ordinary checkpoint file."""

from __future__ import annotations

import inspect

from .base import TrainingSetup, check_fresh_optimizer
from .ddp import DDPStrategy

__all__ = ["Zero1Strategy"]


class Zero1Strategy(DDPStrategy):
    name = "zero1"

    def setup(self, ctx: TrainingSetup):
        old = super().setup(ctx)
        if not ctx.env.distributed:
            return old
        from torch.distributed.optim import ZeroRedundancyOptimizer

        check_fresh_optimizer(old, self.name)
        accepted = set(inspect.signature(type(old).__init__).parameters) - {"self", "params"}
        # a group also holds keys the constructor does not take (AdamW's decoupled_weight_decay,
        # a scheduler's initial_lr): those ride on the groups, not the constructor
        groups = [dict(g) for g in old.param_groups]
        zero = ZeroRedundancyOptimizer(
            groups[0]["params"], optimizer_class=type(old), **{k: v for k, v in groups[0].items() if k in accepted}
        )
        for k, v in groups[0].items():
            if k != "params":
                zero.param_groups[0].setdefault(k, v)
        for g in groups[1:]:
            zero.add_param_group(g)
        scheduler = ctx.scheduler
        if scheduler is not None:
            if getattr(scheduler, "optimizer", None) is not old:
                raise ValueError(
                    "strategy='zero1' replaces the optimizer with a ZeroRedundancyOptimizer: the "
                    "scheduler must be built on the optimizer passed to the Trainer"
                )
            scheduler.optimizer = zero
            step = zero.step

            def tracked(*args, **kwargs):  # what LRScheduler's own patch of optimizer.step records
                zero._opt_called = True
                return step(*args, **kwargs)

            tracked._wrapped_by_lr_sched = True
            zero.step = tracked
        self.optimizer = zero
        return zero

    def before_save(self) -> None:
        if self.env.distributed:
            self.optimizer.consolidate_state_dict(to=0)
