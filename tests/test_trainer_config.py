"""TrainerConfig: the Trainer's settings as nested sections, and the keyword form as the same
config spelled flat (every keyword the Trainer took keeps working)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from accelops.train import Trainer, TrainerConfig
from accelops.train.trainer_config import (
    KEYWORDS,
    CheckpointConfig,
    FSDPConfig,
    ParallelConfig,
    ScheduleConfig,
    StepConfig,
)

from .test_train import TRAIN, VAL, losses, make_trainer, params, tiny_model


def test_keywords_map_onto_sections_and_back():
    config = TrainerConfig.from_keywords(
        max_steps=7,
        checkpoint_dir="ckpt",
        checkpoint_every=2,
        fsdp_units="submodule",
        pipeline_split=[1],
        seed=3,
        precision="bf16-mixed",
    )
    assert config.schedule.max_steps == 7 and config.checkpoint.dir == "ckpt" and config.checkpoint.every == 2
    assert config.parallel.fsdp.units == "submodule" and config.parallel.pipeline.split == [1]
    assert config.seed == 3 and config.step.precision == "bf16-mixed"
    nested = TrainerConfig(
        step=StepConfig(precision="bf16-mixed"),
        seed=3,
        schedule=ScheduleConfig(max_steps=7),
        checkpoint=CheckpointConfig(dir="ckpt", every=2),
        parallel=ParallelConfig(fsdp=FSDPConfig(units="submodule")),
    )
    nested.parallel.pipeline.split = [1]
    assert nested == config
    assert TrainerConfig.from_keywords(**config.to_keywords()) == config
    assert set(config.to_keywords()) == set(KEYWORDS)
    # replace: a copy, the untouched sections kept
    moved = config.replace(max_steps=9, keep_last=1)
    assert (moved.schedule.max_steps, moved.checkpoint.keep_last, moved.checkpoint.dir) == (9, 1, "ckpt")
    assert config.schedule.max_steps == 7 and moved.parallel == config.parallel


def test_every_section_checks_its_values_with_the_keywords_name():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_step'"):
        TrainerConfig.from_keywords(max_step=3)
    for keywords, message in (
        (dict(checkpoint_every=0), "checkpoint_every must be a positive int or None"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(grad_clip=float("inf")), "grad_clip must be a positive finite number"),
        (dict(seed=-1), "seed must be an int >= 0"),
        (dict(distributed="yes"), "distributed must be 'auto', True or False"),
        (dict(dist_timeout=0), "dist_timeout must be a positive number"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainerConfig.from_keywords(**keywords)
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        ScheduleConfig(max_steps=0)
    with pytest.raises(ValueError, match="keep_last must be a positive int"):  # through Trainer's keywords too
        make_trainer(2, keep_last=0)


def test_config_form_trains_exactly_as_the_keyword_form():
    full = make_trainer(4, eval_every=2, accumulate_grad_batches=2, grad_clip=0.5)
    full.fit()
    model = tiny_model(0, 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    config = TrainerConfig(
        step=StepConfig(accumulate_grad_batches=2, grad_clip=0.5),
        schedule=ScheduleConfig(max_steps=4, eval_every=2, log_every=2),
    )
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=4))
    config.logging.progress = False
    t = Trainer(model, optimizer, TRAIN, VAL, config=config, scheduler=scheduler)
    t.fit()
    assert t.config is config and t.max_steps == 4 and t.accumulate_grad_batches == 2
    assert losses(t) == losses(full) and t.evals == full.evals
    assert all(torch.equal(a, b) for a, b in zip(params(t.model).values(), params(full.model).values()))
    # keywords given with config= change that config (a copy: the caller's is left alone)
    other = tiny_model()
    t2 = Trainer(other, torch.optim.SGD(other.parameters(), lr=0.1), TRAIN, config=config, max_steps=1)
    assert t2.max_steps == 1 and config.schedule.max_steps == 4
    with pytest.raises(TypeError, match="config must be an accelops.train.TrainerConfig"):
        Trainer(model, optimizer, TRAIN, config={"max_steps": 3})
