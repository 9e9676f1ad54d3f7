"""TrainerConfig: every setting of a Trainer, as plain data in nested sections.

    from accelops.train import Trainer, TrainerConfig
    from accelops.train.trainer_config import CheckpointConfig, ScheduleConfig

    config = TrainerConfig(schedule=ScheduleConfig(max_steps=2000, eval_every=100),
                           checkpoint=CheckpointConfig(dir="runs/ckpt"), seed=1)
    trainer = Trainer(model, optimizer, train_data, val_data, config=config, scheduler=scheduler)

Sections: data (batch_size, shuffle), step (what one optimizer step is: accumulation,
precision, clipping, loss weights), schedule (how long, how often to evaluate and log),
checkpoint, logging, parallel (the strategy and the processes; its fsdp and pipeline
sub-sections), and at the top the seed and early stopping. What is not plain data, the
scheduler, loss_fn and metadata, are the Trainer's own arguments.

The Trainer's keyword form, `Trainer(model, optimizer, data, max_steps=2000,
checkpoint_dir="runs/ckpt")`, is the same config spelled flat: KEYWORDS maps each keyword to
its place (checkpoint_dir -> checkpoint.dir), TrainerConfig.from_keywords builds one and
config.replace(**keywords) changes one. An `accelops train` file's [train] table holds those
keywords too.

Each section checks its values when it is made (ValueError naming the keyword); the checks
that need the model, the data or the strategy's combination with the others are the
Trainer's.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Literal

import torch

__all__ = [
    "TrainerConfig",
    "DataConfig",
    "StepConfig",
    "ScheduleConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "ParallelConfig",
    "FSDPConfig",
    "PipelineConfig",
    "KEYWORDS",
    "PRECISIONS",
]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


@dataclasses.dataclass
class DataConfig:
    """batch_size: samples a micro-batch, per rank. shuffle: a new order every epoch (seeded
    by seed + epoch), else the dataset's order."""

    batch_size: int = 32
    shuffle: bool = True

    def __post_init__(self):
        _positive_int("batch_size", self.batch_size)


@dataclasses.dataclass
class StepConfig:
    """One optimizer step: accumulate_grad_batches micro-batches (DDP synchronises only the
    last), in `precision` ("32", "bf16-mixed": autocast to bf16, "16-mixed": autocast to fp16
    with a GradScaler), gradients clipped to a global norm of grad_clip (None: not clipped),
    named losses weighed by loss_weights (accelops.train.WeightedLoss)."""

    accumulate_grad_batches: int = 1
    precision: str = "32"
    grad_clip: float | None = None
    loss_weights: dict[str, float] | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _positive_int("accumulate_grad_batches", self.accumulate_grad_batches)
        g = self.grad_clip
        if g is not None and (
            isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0 or not math.isfinite(g)
        ):
            raise ValueError(f"grad_clip must be a positive finite number or None, got {g!r}")


@dataclasses.dataclass
class ScheduleConfig:
    """max_steps: optimizer steps in all (a resumed run continues up to it). eval_every: steps
    between evaluations on the validation data (and at the end; None: only at the end);
    eval_batches: at most that many batches a rank an evaluation (evenly spaced). log_every:
    steps between metrics rows (and, on several processes, the checks for a stop)."""

    max_steps: int = 1000
    eval_every: int | None = 200
    eval_batches: int | None = None
    log_every: int = 10

    def __post_init__(self):
        _positive_int("max_steps", self.max_steps)
        _positive_int("log_every", self.log_every)
        _positive_int("eval_every", self.eval_every, allow_none=True)
        _positive_int("eval_batches", self.eval_batches, allow_none=True)


@dataclasses.dataclass
class CheckpointConfig:
    """dir: where checkpoints go (None: none are written), every `every` steps (None: every
    eval_every) and at the end, the newest keep_last kept. resume=True continues from the
    newest good one in dir; resume=False refuses a dir that holds any."""

    dir: str | os.PathLike | None = None
    every: int | None = None
    keep_last: int = 3
    resume: bool = True

    def __post_init__(self):
        _positive_int("keep_last", self.keep_last)
        _positive_int("checkpoint_every", self.every, allow_none=True)


@dataclasses.dataclass
class LoggingConfig:
    """dir: metrics.csv (and TensorBoard events when tensorboard is installed); progress: a
    tqdm bar on rank 0; mlflow: True or a table of MLflowLogger settings (None: off)."""

    dir: str | os.PathLike | None = None
    progress: bool = True
    mlflow: Any = None  # bool | dict | None: an accelops.train.callbacks.MLflowLogger spec


@dataclasses.dataclass
class FSDPConfig:
    """strategy="fsdp": cpu_offload (parameters and optimizer state in host memory), units
    ("block": one FSDP unit per block; "submodule": also one per large child of a block)
    and backward_prefetch (False: no all-gather of the next unit during a unit's backward)."""

    cpu_offload: bool = False
    units: str = "block"
    backward_prefetch: bool = True


@dataclasses.dataclass
class PipelineConfig:
    """strategy="pipeline": schedule ("gpipe" | "1f1b"), n_microbatches (None: the step's
    accumulate_grad_batches) and split (the block where each stage after the first starts;
    None: balanced on measured per-block time)."""

    schedule: str = "1f1b"
    n_microbatches: int | None = None
    split: list[int] | None = None


@dataclasses.dataclass
class ParallelConfig:
    """strategy: "ddp", "fsdp", "zero1" or "pipeline" (accelops.train.parallel). distributed:
    "auto" (torchrun's environment, or an initialised process group, decides), True (it must)
    or False (one process). device: this rank's device (None: its GPU, else the CPU).
    dist_timeout: seconds a collective waits (when the Trainer starts the process group).
    ddp_kwargs: DistributedDataParallel's arguments. compression: an accelops.distributed hook
    for DDP's all-reduce, a name or {"name": ..., **options}."""

    strategy: str = "ddp"
    distributed: bool | Literal["auto"] = "auto"
    device: str | torch.device | None = None
    dist_timeout: float | None = None
    ddp_kwargs: dict | None = None
    compression: Any = None  # str | dict | None (left unchecked here: the hook checks it)
    fsdp: FSDPConfig = dataclasses.field(default_factory=FSDPConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)

    def __post_init__(self):
        if self.distributed not in ("auto", True, False):
            raise ValueError(f"distributed must be 'auto', True or False, got {self.distributed!r}")
        t = self.dist_timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ValueError(f"dist_timeout must be a positive number of seconds or None, got {t!r}")


# The Trainer's keyword arguments and where each lives in a TrainerConfig.
KEYWORDS = {
    "batch_size": ("data", "batch_size"),
    "shuffle": ("data", "shuffle"),
    "accumulate_grad_batches": ("step", "accumulate_grad_batches"),
    "precision": ("step", "precision"),
    "grad_clip": ("step", "grad_clip"),
    "loss_weights": ("step", "loss_weights"),
    "max_steps": ("schedule", "max_steps"),
    "eval_every": ("schedule", "eval_every"),
    "eval_batches": ("schedule", "eval_batches"),
    "log_every": ("schedule", "log_every"),
    "checkpoint_dir": ("checkpoint", "dir"),
    "checkpoint_every": ("checkpoint", "every"),
    "keep_last": ("checkpoint", "keep_last"),
    "resume": ("checkpoint", "resume"),
    "log_dir": ("logging", "dir"),
    "progress": ("logging", "progress"),
    "mlflow": ("logging", "mlflow"),
    "strategy": ("parallel", "strategy"),
    "distributed": ("parallel", "distributed"),
    "device": ("parallel", "device"),
    "dist_timeout": ("parallel", "dist_timeout"),
    "ddp_kwargs": ("parallel", "ddp_kwargs"),
    "compression": ("parallel", "compression"),
    "fsdp_cpu_offload": ("parallel", "fsdp", "cpu_offload"),
    "fsdp_units": ("parallel", "fsdp", "units"),
    "fsdp_backward_prefetch": ("parallel", "fsdp", "backward_prefetch"),
    "pipeline_schedule": ("parallel", "pipeline", "schedule"),
    "n_microbatches": ("parallel", "pipeline", "n_microbatches"),
    "pipeline_split": ("parallel", "pipeline", "split"),
    "seed": ("seed",),
    "early_stopping": ("early_stopping",),
}


@dataclasses.dataclass
class TrainerConfig:
    """Every setting of a Trainer (see the module doc). seed: seeds torch, numpy and random
    (rank r: seed + r) and the data order. early_stopping: None, an
    accelops.train.EarlyStopping or a dict of its arguments (monitor, patience, min_delta,
    mode), checked at each evaluation."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    step: StepConfig = dataclasses.field(default_factory=StepConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    seed: int = 0
    early_stopping: Any = None

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    @classmethod
    def from_keywords(cls, **keywords) -> "TrainerConfig":
        """The config of Trainer(..., **keywords): the defaults, with each keyword set."""
        return cls().replace(**keywords)

    def replace(self, **keywords) -> "TrainerConfig":
        """A copy with the given Trainer keywords set (max_steps=..., checkpoint_dir=...); each
        section changed is made anew, so its checks run. TypeError for an unknown keyword."""
        for name in keywords:
            if name not in KEYWORDS:
                raise TypeError(f"Trainer() got an unexpected keyword argument {name!r}")
        return _replace(self, {KEYWORDS[name]: value for name, value in keywords.items()})

    def to_keywords(self) -> dict:
        """{keyword: value} of every setting: Trainer(..., **config.to_keywords()) is this config."""
        out = {}
        for name, path in KEYWORDS.items():
            value = self
            for part in path:
                value = getattr(value, part)
            out[name] = value
        return out

    @staticmethod
    def keyword_annotation(name: str) -> str:
        """The type annotation (its text) of the field a keyword sets: what a config file's
        [train] value is checked against."""
        cls = TrainerConfig
        for part in KEYWORDS[name][:-1]:
            cls = _SECTIONS[cls][part]
        field = next(f for f in dataclasses.fields(cls) if f.name == KEYWORDS[name][-1])
        return field.type


def _replace(obj, changes: dict):
    """dataclasses.replace along paths: {(section, ..., field): value}."""
    own = {path[0]: value for path, value in changes.items() if len(path) == 1}
    nested = {}
    for path, value in changes.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, sub in nested.items():
        own[name] = _replace(getattr(obj, name), sub)
    return dataclasses.replace(obj, **own) if own else obj


# {section class: {field name: the class of the section it holds}}, for keyword_annotation
_SECTIONS = {
    TrainerConfig: {
        "data": DataConfig,
        "step": StepConfig,
        "schedule": ScheduleConfig,
        "checkpoint": CheckpointConfig,
        "logging": LoggingConfig,
        "parallel": ParallelConfig,
    },
    ParallelConfig: {"fsdp": FSDPConfig, "pipeline": PipelineConfig},
}
