"""The checkpoints of accelops.train, in one component:

- files: one checkpoint file (step-NNNNNNNN.ckpt), a torch.save payload with a length and
  SHA-256 trailer, written atomically, refused whole when it does not check out
  (save_checkpoint, load_checkpoint, list_checkpoints, latest_checkpoint, prune_checkpoints);
- sharded: a checkpoint directory (step-NNNNNNNN.dcp / .pp) that every rank writes its
  shards into, with a manifest of sizes and SHA-256s, renamed into place by rank 0;
- manager: Checkpointer, the Trainer's save / resume / prune in its checkpoint_dir for any
  parallel strategy (which takes part only through its write_shards / read_shards).

Nothing here imports the Trainer or a strategy.
"""

from .files import (
    CheckpointError,
    CheckpointWarning,
    atomic_write,
    checkpoint_path,
    fsync_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_good,
    prune_checkpoints,
    save_checkpoint,
)
from .manager import CHECKPOINT_FORMAT, LAYOUTS, Checkpointer
from .sharded import (
    DIR_NAME,
    MANIFEST,
    TRAINER_FILE,
    latest_dir_checkpoint,
    list_dir_checkpoints,
    verify_dir_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "checkpoint_path",
    "newest_good",
    "atomic_write",
    "fsync_dir",
    "Checkpointer",
    "CHECKPOINT_FORMAT",
    "LAYOUTS",
    "DIR_NAME",
    "MANIFEST",
    "TRAINER_FILE",
    "list_dir_checkpoints",
    "verify_dir_checkpoint",
    "latest_dir_checkpoint",
]
