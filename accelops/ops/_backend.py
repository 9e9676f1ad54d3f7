"""Backend choice for every op: the C++ extension on CPU tensors, Triton on CUDA tensors,
and the pure-PyTorch reference as the spec and the fallback.

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
# Python with no import machinery in it.
_EXTENSION = _load_extension()
_TRITON = _probe_triton()


def extension():
    """(module or None, reason it is missing or None)."""
    return _EXTENSION


def _load_cuda_extension():
    # The Triton kernels are the CUDA implementations whenever triton is installed: they
    # are the ones tested (under the interpreter) on every commit. accelops._C_cuda, whose
    # import registers its own CUDA kernels, is the backend for GPU machines without triton.
    if _TRITON or _EXTENSION[0] is None:
        return None
    try:
        return importlib.import_module("accelops._C_cuda")
    except ImportError:  # torch without CUDA: the module is not built
        return None


_CUDA_EXTENSION = _load_cuda_extension()


def cuda_extension_ops() -> frozenset:
    """Ops whose CUDA kernel comes from accelops._C_cuda (empty when it is not in use)."""
    return frozenset(_CUDA_EXTENSION.ops()) if _CUDA_EXTENSION is not None else frozenset()


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
    if op not in _warned:
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
    and the Triton one (registered for CUDA) on GPUs; 'triton' calls the Triton launcher
    directly, which also runs CPU tensors under TRITON_INTERPRET=1 (used by the tests).
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
        if device.type == "cuda" and extension()[0] is not None:
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
        ok, why = triton_status()
        ext, ext_why = extension()
        if ext is None:
            return _fallback(op, ext_why)
        if ok or op in cuda_extension_ops():
            return "native"
        return _fallback(op, why)
    return _fallback(op, f"no accelops kernel for device type {device.type!r}")
