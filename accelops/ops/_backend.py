"""Backend choice for every op: the C++ extension on CPU tensors, Triton on CUDA tensors,
and the pure-PyTorch reference as the spec and the fallback.

Every op exists in torch.ops.accelops whatever is installed: its schema, fake and
autograd are defined in Python (accelops/ops/<family>.py, through ops/_library.py) with
the reference as its default kernel. The extensions only add per-device kernels:
accelops._C the CPU ones (TORCH_LIBRARY_IMPL in csrc/ops.cpp); on CUDA, the Triton
kernels when triton is installed, else accelops._C_cuda's (decided once, below).

`ACCELOPS_BACKEND=reference|cpu|triton` forces one. A forced backend that cannot run
raises and says why; the automatic choice falls back to the reference with one warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "triton")


def _load_extension():
    try:
        return importlib.import_module("accelops._C"), None
    except ImportError as exc:  # not built, or built against another torch
        return None, (
            f"accelops._C could not be imported ({exc}); build it with `make build` "
            "or `pip install --no-build-isolation -e .`"
        )


def _probe_triton():
    return importlib.util.find_spec("triton") is not None


# Probed once at import (not inside choose()), so torch.compile traces choose() as plain
# Python with no import machinery in it. The extension is loaded before ops/_library.py
# defines the schemas (it imports this module first): its TORCH_LIBRARY_IMPL may come
# before the definitions, and an extension built from older sources, which still defines
# the schemas itself, is then caught there with a clear error rather than aborting the
# process inside the extension's static initialisers.
_EXTENSION = _load_extension()
_TRITON = _probe_triton()


def extension():
    """(module or None, reason it is missing or None)."""
    return _EXTENSION


# --------------------------------------------------------------------------- CUDA kernels
# The one place that decides where the CUDA kernels come from. The Triton kernels are the
# CUDA implementations whenever triton is installed: they are the ones tested (under the
# interpreter) on every commit. accelops._C_cuda, whose import registers its own CUDA
# kernels (TORCH_LIBRARY_IMPL in csrc/cuda_ops.cpp), is the backend for GPU machines
# without triton. An op with neither runs its default (reference) kernel on CUDA tensors.


def _load_cuda_extension():
    if _TRITON:
        return None
    try:
        return importlib.import_module("accelops._C_cuda")
    except ImportError:  # torch without CUDA: the module is not built
        return None


_CUDA_EXTENSION = _load_cuda_extension()


def cuda_extension_ops() -> frozenset:
    """Ops whose CUDA kernel comes from accelops._C_cuda (empty when it is not in use)."""
    return frozenset(_CUDA_EXTENSION.ops()) if _CUDA_EXTENSION is not None else frozenset()


def register_triton_kernels(family: str, names) -> None:
    """Registers accelops.kernels.<family>.<name> as the CUDA kernel of accelops::<name>,
    for each name, when Triton provides the CUDA kernels (see above) and a GPU is present.
    Called by each family's registration; nothing is imported without a GPU, so triton is
    not imported at `import accelops` (TRITON_INTERPRET must be set before it is)."""
    if not _TRITON or not torch.cuda.is_available():
        return
    kernels = importlib.import_module(f"accelops.kernels.{family}")
    for name in names:
        torch.library.register_kernel(f"accelops::{name}", "cuda", getattr(kernels, name))


def triton_status():
    """(available, reason it is not)."""
    return (True, None) if _TRITON else (False, "triton is not installed (pip install triton)")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    value = os.environ.get("ACCELOPS_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"ACCELOPS_BACKEND must be one of {BACKENDS} or 'auto', got {value!r}")
    return value


_warned: set[str] = set()


def _fallback(op: str, reason: str) -> str:
    # Not while torch.compile traces: dynamo cannot trace warnings.warn, so fullgraph=True
    # would fail where the reference runs fine; the first eager call warns instead.
    if op not in _warned and not torch.compiler.is_compiling():
        _warned.add(op)
        warnings.warn(f"accelops.{op}: falling back to the PyTorch reference: {reason}", RuntimeWarning, stacklevel=3)
    return "reference"


def choose_and_forced(op: str, device: torch.device) -> tuple[str, bool]:
    """choose(), and whether ACCELOPS_BACKEND forced it (read once: an environment read
    costs ~0.7 us, a third of the tuned dispatch's budget per call)."""
    forced = forced_backend()
    return _choose(op, device, forced), forced is not None


def choose(op: str, device: torch.device) -> str:
    """The backend that runs `op` for tensors on `device` (see _choose)."""
    return _choose(op, device, forced_backend())


def _choose(op: str, device: torch.device, forced: str | None) -> str:
    """The backend that runs `op` for tensors on `device`: 'reference', 'cpu', 'triton' or 'native'.

    'native' means torch.ops.accelops.<op>, whose per-device kernel is the C++ one on CPU
    and the Triton (or accelops._C_cuda) one on GPUs, the reference where a device has
    none; 'triton' calls the Triton launcher directly, which also runs CPU tensors under
    TRITON_INTERPRET=1 (used by the tests); 'reference' calls the Python reference
    directly (its own autograd, not the op's).
    """
    if forced == "reference":
        return "reference"
    if forced == "cpu":
        ext, why = extension()
        if ext is None:
            raise RuntimeError(f"ACCELOPS_BACKEND=cpu but {why}")
        if device.type != "cpu":
            raise RuntimeError(f"ACCELOPS_BACKEND=cpu but the tensors are on {device}")
        return "native"
    if forced == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"ACCELOPS_BACKEND=triton but {why}")
        if device.type == "cuda":
            return "native"  # torch.ops, whose CUDA kernel is Triton: keeps autograd and fakes
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(
                "ACCELOPS_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return "triton"
    if device.type == "cpu":
        ext, why = extension()
        return "native" if ext is not None else _fallback(op, why)
    if device.type == "cuda":
        # The CPU extension plays no part here: the schemas are Python's, the CUDA kernels
        # Triton's or accelops._C_cuda's.
        ok, why = triton_status()
        if ok or op in cuda_extension_ops():
            return "native"
        return _fallback(op, why)
    return _fallback(op, f"no accelops kernel for device type {device.type!r}")
