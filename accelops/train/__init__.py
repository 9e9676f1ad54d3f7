"""Training: Trainer (one process or torchrun/DDP, accumulation, autocast, accelops gradient
compression, atomic checksummed checkpoints that resume exactly), character-level text
data, TrainObjective (the trainer as an accelops.hpo objective), ray_fit (Ray Train workers),
load_model (a trained model and its vocabulary back from a checkpoint), and the
`accelops train CONFIG` / `torchrun -m accelops.train CONFIG` entry point (ConfigError: a
config it cannot use)."""
from .checkpoint import (CheckpointError, CheckpointWarning, latest_checkpoint, list_checkpoints, load_checkpoint,
                         save_checkpoint)
from .callbacks import EarlyStopping
from .data import CharVocab, TokenWindows, load_char_corpus, split_dataset
from .load import load_model
from .losses import WeightedLoss
from .lr_find import LRFindResult, lr_find
from .trainer import PRECISIONS, Trainer
from .ray_train import ray_fit
from .config import ConfigError
from .hpo_objective import TrainObjective

__all__ = ["Trainer", "TrainObjective", "ray_fit", "PRECISIONS", "CharVocab", "TokenWindows", "load_char_corpus", "CheckpointError",
           "CheckpointWarning", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "lr_find", "LRFindResult", "EarlyStopping", "WeightedLoss", "split_dataset", "load_model", "ConfigError"]
