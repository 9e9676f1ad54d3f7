"""Input checks shared by the ops: each error names the argument, what was expected and what came."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def float_tensor(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {value.dtype}")
    return value


def dtype(name: str, value: torch.Tensor, expected: torch.dtype) -> None:
    if value.dtype != expected:
        raise TypeError(f"{name} must be {expected}, got {value.dtype}")


def ndim(name: str, value: torch.Tensor, expected: int, what: str = "") -> None:
    if value.dim() != expected:
        shape = f" {what}" if what else ""
        raise ValueError(f"{name} must be {expected}-D{shape}, got shape {tuple(value.shape)}")


def at_least_1d(name: str, value: torch.Tensor) -> None:
    if value.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension [..., K], got a 0-D tensor")


def same_device(**tensors) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")
    return first.device


def bias(value, n: int):
    if value is None:
        return None
    tensor("bias", value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"bias must be float32, bfloat16 or float16, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"bias must have shape ({n},) to match N={n}, got {tuple(value.shape)}")
    return value


def finite_weight(name: str, value: torch.Tensor) -> None:
    # A data-dependent check cannot be traced; under torch.compile the kernels' own checks
    # (TORCH_CHECK in csrc/cpu) still reject NaN/Inf weights at run time.
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite: it holds NaN or Inf, which would poison the quantization scale")
