"""Batches as the Trainer, its strategies and lr_find handle them: the resumable stream the
Trainer reads them from, moving them to a device, counting their tokens, and the default
loss of a model on one."""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DistributedSampler, default_collate

__all__ = ["BatchStream", "to_device", "to_cpu", "tokens_in", "default_loss"]


class BatchStream:
    """Batches of a map-style dataset in DistributedSampler order (seeded by seed + epoch),
    the position (epoch, batch) saved and restored, so a resumed run reads the very batches
    the uninterrupted one would have. Every rank has the same number of batches an epoch
    (the sampler pads); an incomplete last batch is dropped."""

    def __init__(self, dataset, batch_size: int, rank: int, world: int, seed: int, shuffle: bool):
        self.dataset, self.batch_size = dataset, batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.n_batches = len(self.sampler) // batch_size
        if self.n_batches == 0:
            raise ValueError(
                f"train_data has {len(dataset)} samples: {len(self.sampler)} a rank over {world} "
                f"rank(s), fewer than one batch of batch_size={batch_size}"
            )
        self.epoch = 0
        self.index = 0
        self._order = None

    def next(self):
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        b = self.batch_size
        batch = default_collate([self.dataset[i] for i in self._order[self.index * b : (self.index + 1) * b]])
        self.index += 1
        if self.index == self.n_batches:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "batch_size": self.batch_size,
            "n_batches": self.n_batches,
            "dataset_len": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["dataset_len"] != len(self.dataset) or state["n_batches"] != self.n_batches:
            warnings.warn(
                f"the training data changed since the checkpoint ({state['dataset_len']} samples in "
                f"{state['n_batches']} batches then, {len(self.dataset)} in {self.n_batches} now): "
                "the data position is kept as (epoch, batch) but the run will not repeat the "
                "uninterrupted one",
                stacklevel=3,
            )
        self.epoch = int(state["epoch"])
        self.index = min(int(state["index"]), self.n_batches - 1)
        self._order = None


def to_device(batch, device):
    """A batch (a tensor, or a list / tuple / dict of them) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def to_cpu(obj):
    """A detached CPU copy of a (nested list / tuple / dict of) tensor(s), for a checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def tokens_in(batch) -> int:
    """Elements of a batch's first tensor: its tokens, for an LM's (tokens, targets)."""
    first = (
        batch[0]
        if isinstance(batch, (list, tuple))
        else next(iter(batch.values()))
        if isinstance(batch, dict)
        else batch
    )
    return first.numel() if isinstance(first, torch.Tensor) else 0


def default_loss(model, batch) -> torch.Tensor:
    """model(*batch) for a tuple/list batch (model(**batch) for a dict, model(batch) else);
    a (logits, loss) result gives its loss, a dict of named losses (or (output, dict)) is
    returned as it is for the Trainer's loss_weights. accelops.models' `model(tokens, targets)` fits."""
    if isinstance(batch, (list, tuple)):
        out = model(*batch)
    elif isinstance(batch, dict):
        out = model(**batch)
    else:
        out = model(batch)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if isinstance(out, dict):
        return out
    if not isinstance(out, torch.Tensor) or out.dim() != 0:
        raise TypeError(
            "the model must return a scalar loss or (output, loss) for a batch; got "
            f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}: "
            "pass loss_fn=(model, batch) -> loss"
        )
    return out
