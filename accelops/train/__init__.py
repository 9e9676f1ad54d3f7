"""Training: Trainer (one process or torchrun/DDP, accumulation, autocast, accelops gradient
compression, atomic checksummed checkpoints that resume exactly) with its settings in a
TrainerConfig, character-level text data, TrainObjective (the trainer as an accelops.hpo
objective), ray_fit (Ray Train workers), load_model (a trained model and its vocabulary back
from a checkpoint), and the `accelops train CONFIG` / `torchrun -m accelops.train CONFIG`
entry point (ConfigError: a config it cannot use).

Layout: trainer.py (the loop) and trainer_config.py (its settings); parallel/ (the ddp,
fsdp, zero1 and pipeline strategies, behind the Strategy protocol of parallel/base.py);
checkpoint/ (checkpoint files, sharded checkpoint directories, the Checkpointer that saves
and resumes); dist_env.py (the processes and the collectives the glue needs); config.py (an
`accelops train` file: loading, checking, building); run.py (its command line);
hpo_objective.py, ray_train.py, load.py, lr_find.py, callbacks.py, losses.py, data.py,
batches.py (the trainer's resumable batch stream), rng.py (the generators' states),
metrics_files.py (metrics.csv and TensorBoard events), dirs.py, launch.py."""

from .callbacks import EarlyStopping
from .checkpoint import (
    CheckpointError,
    CheckpointWarning,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import ConfigError
from .data import CharVocab, TokenWindows, load_char_corpus, split_dataset
from .hpo_objective import TrainObjective
from .load import load_model
from .losses import WeightedLoss
from .lr_find import LRFindResult, lr_find
from .ray_train import ray_fit
from .trainer import Trainer
from .trainer_config import PRECISIONS, TrainerConfig

__all__ = [
    "Trainer",
    "TrainerConfig",
    "TrainObjective",
    "ray_fit",
    "PRECISIONS",
    "CharVocab",
    "TokenWindows",
    "load_char_corpus",
    "CheckpointError",
    "CheckpointWarning",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "lr_find",
    "LRFindResult",
    "EarlyStopping",
    "WeightedLoss",
    "split_dataset",
    "load_model",
    "ConfigError",
]
