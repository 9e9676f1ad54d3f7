"""Learning-rate range test (Smith, "Cyclical Learning Rates", 2017; the behaviour of
Lightning's Tuner.lr_find): train for num_steps optimizer steps while the learning rate
grows exponentially from min_lr to max_lr, record the exponentially smoothed (and
bias-corrected) loss, stop when it passes diverge_threshold x the best seen, and suggest
the learning rate where the smoothed loss falls fastest against log(lr).

The model's weights, the optimizer's state and every RNG are put back afterwards, so a
fit() that follows is the fit() that would have run without the test. One process only."""

from __future__ import annotations

import contextlib
import copy
import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from .losses import WeightedLoss
from .rng import rng_state, set_rng_state

__all__ = ["lr_find", "LRFindResult"]


class LRFindResult:
    """lrs[i], losses[i] (smoothed, bias-corrected) and raw_losses[i] of each step run;
    suggestion: the lr of steepest descent, or None, then `reason` says why (the loss was
    not finite, diverged before enough points, or never fell); stopped_early: the
    divergence that ended the sweep, if any."""

    def __init__(self, lrs, losses, raw_losses, suggestion, reason, stopped_early, settings):
        self.lrs, self.losses, self.raw_losses = lrs, losses, raw_losses
        self.suggestion, self.reason, self.stopped_early, self.settings = suggestion, reason, stopped_early, settings
        self.suggestion_index = None if suggestion is None else lrs.index(suggestion)

    def __repr__(self) -> str:
        s = f"{self.suggestion:.3g}" if self.suggestion is not None else f"None ({self.reason})"
        return (
            f"LRFindResult({len(self.lrs)} steps, lr {self.lrs[0]:.3g}..{self.lrs[-1]:.3g}, suggestion {s})"
            if self.lrs
            else f"LRFindResult(no steps, suggestion None ({self.reason}))"
        )

    def plot(self, path) -> str:
        """Writes the smoothed loss against lr (log axis), the suggestion marked, as a PNG -> path."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                f"LRFindResult.plot needs matplotlib, which is not installed ({exc}): pip install matplotlib"
            ) from None
        # A Figure on its own Agg canvas: no pyplot, no global backend switch, works headless.
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        finite = [(lr, v) for lr, v in zip(self.lrs, self.losses) if math.isfinite(v)]
        if finite:
            ax.plot([a for a, _ in finite], [b for _, b in finite], label="smoothed loss")
        if self.suggestion is not None:
            i = self.suggestion_index
            ax.plot([self.lrs[i]], [self.losses[i]], "o", color="red", label=f"suggestion {self.suggestion:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title(
            "lr range test" + ("" if self.suggestion is not None else f": no suggestion ({self.reason})"), fontsize=9
        )
        ax.legend(loc="best")
        fig.tight_layout()
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fig.savefig(path, format="png")
        return path


def _suggest(lrs, losses, skip_start, skip_end):
    """Index of the steepest descent of losses against log(lr) after skipping the ends, or
    (None, why)."""
    end = len(losses) - skip_end
    idx = [i for i in range(skip_start, end) if math.isfinite(losses[i])]
    if len(idx) < 3:
        return None, (
            f"only {len(idx)} usable point(s) after skipping the first {skip_start} and last "
            f"{skip_end} of {len(losses)}: the loss diverged too early (lower min_lr or max_lr, or "
            "raise num_steps)"
        )
    x = torch.tensor([math.log(lrs[i]) for i in idx], dtype=torch.float64)
    y = torch.tensor([losses[i] for i in idx], dtype=torch.float64)
    grad = torch.gradient(y, spacing=(x,))[0]
    k = int(torch.argmin(grad))
    if not grad[k] < 0:
        return None, "the smoothed loss never decreased over the sweep (lower min_lr, or check the model)"
    return idx[k], None


def lr_find(
    model,
    optimizer,
    train_data,
    *,
    loss_fn=None,
    loss_weights=None,
    batch_size: int = 32,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_steps: int = 100,
    beta: float = 0.98,
    diverge_threshold: float | None = 4.0,
    skip_start: int = 10,
    skip_end: int = 1,
    precision: str = "32",
    grad_clip: float | None = None,
    device=None,
    seed: int = 0,
    shuffle: bool = True,
) -> LRFindResult:
    """Runs the range test on `model` / `optimizer` over batches of `train_data` (a map-style
    dataset, like the Trainer's) -> LRFindResult. Every param group gets the same lr at a
    step: lr_i = min_lr * (max_lr / min_lr) ** (i / (num_steps - 1)). beta smooths the loss
    (avg = beta avg + (1 - beta) loss, divided by 1 - beta^(i+1)); the sweep stops once the
    smoothed loss exceeds diverge_threshold x its minimum (None: never) or a loss is NaN/inf.
    The suggestion skips the first skip_start and last skip_end points.

    Runs in this process only: under torch.distributed with several ranks it raises
    RuntimeError (run it before launching, or on one rank before init_process_group)."""
    from .batches import default_loss, to_device
    from .trainer import PRECISIONS

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"lr_find runs on one process; this one is rank {dist.get_rank()} of "
            f"{dist.get_world_size()}: run it without torchrun (accelops train CONFIG --lr-find)"
        )
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not min_lr < max_lr:
        raise ValueError(f"min_lr must be below max_lr, got {min_lr!r} >= {max_lr!r}")
    for name, value, low in (("num_steps", num_steps, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, value in (("skip_start", skip_start), ("skip_end", skip_end)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if diverge_threshold is not None and (
        isinstance(diverge_threshold, bool)
        or not isinstance(diverge_threshold, (int, float))
        or not diverge_threshold > 1.0
    ):
        raise ValueError(f"diverge_threshold must be a number > 1 or None, got {diverge_threshold!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if len(train_data) < batch_size:
        raise ValueError(f"train_data has {len(train_data)} samples, fewer than one batch of {batch_size}")

    device = torch.device(device) if device is not None else next(model.parameters()).device
    loss = loss_fn if isinstance(loss_fn, WeightedLoss) else WeightedLoss(loss_fn or default_loss, loss_weights)
    autocast_dtype = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    # What comes back afterwards: weights (and buffers), optimizer state and lrs, RNGs, mode.
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_rng = rng_state(device)
    was_training = model.training
    original_device = next(model.parameters()).device

    gen = torch.Generator().manual_seed(seed)
    n = len(train_data)
    order: list[int] = []
    lrs, smoothed, raw = [], [], []
    avg, best, stopped_early = 0.0, math.inf, None
    try:
        model.to(device)
        model.train()
        for i in range(num_steps):
            lr = min_lr * (max_lr / min_lr) ** (i / (num_steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            if len(order) < batch_size:
                order += (torch.randperm(n, generator=gen) if shuffle else torch.arange(n)).tolist()
            picked, order = order[:batch_size], order[batch_size:]
            batch = to_device(default_collate([train_data[j] for j in picked]), device)
            ctx = (
                torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype
                else contextlib.nullcontext()
            )
            with ctx:
                value = loss(model, batch)
            loss.pop()
            if scaler is not None:
                scaler.scale(value).backward()
            else:
                value.backward()
            if grad_clip is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            v = float(value.detach())
            lrs.append(lr)
            raw.append(v)
            if not math.isfinite(v):
                smoothed.append(v)
                stopped_early = f"the loss is {v} at step {i} (lr {lr:.3g})"
                break
            avg = beta * avg + (1.0 - beta) * v
            s = avg / (1.0 - beta ** (i + 1))
            smoothed.append(s)
            if diverge_threshold is not None and i > 0 and s > diverge_threshold * best:
                stopped_early = (
                    f"the smoothed loss {s:.4g} passed {diverge_threshold:g} x its best {best:.4g} "
                    f"at step {i} (lr {lr:.3g})"
                )
                break
            best = min(best, s)
    finally:
        model.load_state_dict(saved_model)
        model.to(original_device)
        optimizer.load_state_dict(saved_opt)
        set_rng_state(saved_rng, device)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)

    index, reason = _suggest(lrs, smoothed, skip_start, skip_end)
    if index is None and stopped_early is not None:
        reason = f"{reason}; the sweep stopped because {stopped_early}"
    settings = {
        "min_lr": min_lr,
        "max_lr": max_lr,
        "num_steps": num_steps,
        "beta": beta,
        "diverge_threshold": diverge_threshold,
        "batch_size": batch_size,
        "precision": precision,
        "skip_start": skip_start,
        "skip_end": skip_end,
    }
    return LRFindResult(lrs, smoothed, raw, None if index is None else lrs[index], reason, stopped_early, settings)
