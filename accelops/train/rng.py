"""The random number generators a training run draws from (torch, Python's random, numpy's
when numpy is installed, CUDA's on a GPU): their state in a form a checkpoint loads with
weights_only=True (tensors and plain types), set back, and seeded."""

from __future__ import annotations

import random

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional: its RNG is saved only when it is there
    np = None

__all__ = ["rng_state", "set_rng_state", "seed_everything"]


def rng_state(device: torch.device) -> dict:
    """The generators' states now (CUDA's for `device` when it is a GPU)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Sets the generators back to `state` (from rng_state, possibly through torch.save)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuplify(x):
    # torch.save keeps tuples, but be lenient with states that passed through lists (JSON).
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    """Seeds torch, Python's random and numpy's global generator with seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
