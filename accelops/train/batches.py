"""Batches as the Trainer, its strategies and lr_find handle them: moving them to a device,
counting their tokens, and the default loss of a model on one."""

from __future__ import annotations

import torch

__all__ = ["to_device", "to_cpu", "tokens_in", "default_loss"]


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
