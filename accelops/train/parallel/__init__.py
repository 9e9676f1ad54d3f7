"""Parallelism strategies of the Trainer: "ddp" (the default), "fsdp", "zero1", "pipeline",
one module each. accelops adds glue and checks around PyTorch's own engines and never a
transport of its own:

- ddp.py: DistributedDataParallel (with an accelops.distributed compression hook), one
  checkpoint file.
- fsdp.py: FSDP2 (`fully_shard`) per model block (or per large child of a block), sharded
  DCP checkpoint directories that load on another world size.
- zero1.py: ZeroRedundancyOptimizer over DDP: the optimizer state is sharded, parameters and
  gradients are replicated; the checkpoint consolidates the optimizer state on rank 0.
- pipeline.py: `torch.distributed.pipelining`, one stage per rank, the model cut at block
  boundaries; checkpoints hold a file per stage.

A strategy talks to the Trainer only through the Strategy protocol of base.py (set-up with a
TrainingSetup, no_sync, the step, evaluation, its part of the checkpoints); none of these
modules imports the Trainer. make_strategy checks a strategy's options and their
combination with the other Trainer settings.
"""

from __future__ import annotations

from .base import Strategy, TrainingSetup
from .ddp import DDPStrategy
from .fsdp import FSDP_UNITS, FSDPStrategy, large_children
from .pipeline import PIPELINE_SCHEDULES, PipelineStrategy, balance_stages
from .zero1 import Zero1Strategy

__all__ = [
    "STRATEGIES",
    "PIPELINE_SCHEDULES",
    "FSDP_UNITS",
    "make_strategy",
    "full_model_state_dict",
    "Strategy",
    "TrainingSetup",
    "DDPStrategy",
    "FSDPStrategy",
    "Zero1Strategy",
    "PipelineStrategy",
    "balance_stages",
    "large_children",
]

STRATEGIES = ("ddp", "fsdp", "zero1", "pipeline")


def make_strategy(
    strategy,
    *,
    compression=None,
    precision="32",
    loss_fn=None,
    pipeline_schedule="1f1b",
    n_microbatches=None,
    pipeline_split=None,
    fsdp_cpu_offload=False,
    loss_weights=None,
    fsdp_units="block",
    fsdp_backward_prefetch=True,
):
    """Validates the strategy and its combination with the other Trainer options -> a Strategy
    (not yet set up: the Trainer calls its setup once the process group exists)."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if pipeline_schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"pipeline_schedule must be one of {PIPELINE_SCHEDULES}, got {pipeline_schedule!r}")
    if n_microbatches is not None and (
        isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1
    ):
        raise ValueError(f"n_microbatches must be a positive int or None, got {n_microbatches!r}")
    if not isinstance(fsdp_cpu_offload, bool):
        raise ValueError(f"fsdp_cpu_offload must be True or False, got {fsdp_cpu_offload!r}")
    if not isinstance(fsdp_units, str) or fsdp_units not in FSDP_UNITS:
        raise ValueError(f"fsdp_units must be one of {FSDP_UNITS}, got {fsdp_units!r}")
    if not isinstance(fsdp_backward_prefetch, bool):
        raise ValueError(f"fsdp_backward_prefetch must be True or False, got {fsdp_backward_prefetch!r}")
    if strategy != "pipeline":
        for name, value, default in (
            ("pipeline_split", pipeline_split, None),
            ("n_microbatches", n_microbatches, None),
            ("pipeline_schedule", pipeline_schedule, "1f1b"),
        ):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to strategy='pipeline', not strategy={strategy!r}")
    if strategy != "fsdp":
        for name, value, default in (
            ("fsdp_cpu_offload", fsdp_cpu_offload, False),
            ("fsdp_units", fsdp_units, "block"),
            ("fsdp_backward_prefetch", fsdp_backward_prefetch, True),
        ):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to strategy='fsdp', not strategy={strategy!r}")
    if compression is not None and strategy in ("fsdp", "pipeline"):
        what = (
            "FSDP reduce-scatters the gradients itself"
            if strategy == "fsdp"
            else "the pipeline sends activations between stages, it all-reduces no gradients"
        )
        raise ValueError(
            f"compression={compression!r} is a DDP communication hook and cannot be combined with "
            f"strategy={strategy!r}: {what}. Use strategy='ddp' or 'zero1' for compression"
        )
    if strategy in ("fsdp", "pipeline") and precision == "16-mixed":
        raise ValueError(
            f"precision='16-mixed' (fp16 with a GradScaler) is not supported with strategy="
            f"{strategy!r}: use precision='bf16-mixed' or '32'"
        )
    if strategy == "pipeline" and loss_fn is not None:
        raise ValueError(
            "strategy='pipeline' computes the loss on the last stage with the model's own loss "
            "(cross-entropy of accelops.models): loss_fn cannot be combined with it"
        )
    if strategy == "pipeline" and loss_weights is not None:
        raise ValueError(
            f"loss_weights={loss_weights!r} weighs named losses of a loss_fn / model returning a dict; "
            "strategy='pipeline' computes the model's single cross-entropy on the last stage"
        )
    if strategy == "fsdp":
        return FSDPStrategy(precision, fsdp_cpu_offload, fsdp_units, fsdp_backward_prefetch)
    if strategy == "zero1":
        return Zero1Strategy()
    if strategy == "pipeline":
        return PipelineStrategy(pipeline_schedule, n_microbatches, pipeline_split)
    return DDPStrategy()


def full_model_state_dict(trainer) -> dict | None:
    """The whole model's state_dict on rank 0 (None on the others) whatever the strategy;
    every rank must call it (it gathers: for inspection and tests, not for checkpoints)."""
    return trainer.parallel.full_model_state_dict()
