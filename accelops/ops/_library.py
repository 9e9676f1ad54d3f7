"""The accelops op library: where every torch.ops.accelops op is defined.

Each op family registers its ops in its own module (accelops/ops/<family>.py, section
"registration") through `define` below: the schema, with the pure-PyTorch reference
(accelops/reference) as the default kernel, then the fake (output shapes, for
torch.compile and meta tensors) and the autograd formula. So every op exists, runs and
traces with no extension built.

The extensions only add device kernels, which the dispatcher prefers to the default on
their device: accelops._C registers the C++ CPU kernels with
TORCH_LIBRARY_IMPL(accelops, CPU, m) (csrc/ops.cpp); on CUDA either the Triton kernels
(_backend.register_triton_kernels) or accelops._C_cuda's TORCH_LIBRARY_IMPL(accelops,
CUDA, m) (csrc/cuda_ops.cpp), a choice made once in _backend.
"""
from __future__ import annotations

import torch

# Imported for its side effect first: it loads accelops._C before the namespace is claimed
# below. Either order works for current builds (TORCH_LIBRARY_IMPL may precede the
# definitions; tests/test_registration.py loads the extension both ways), but only this one
# turns a stale build into a Python error (see _claim).
from . import _backend


def _claim() -> torch.library.Library:
    # FRAGMENT while csrc/ops.cpp still defines the other families' schemas in its
    # TORCH_LIBRARY block, which owns the namespace.
    return torch.library.Library("accelops", "FRAGMENT")


LIB = _claim()
# Every op defined, in definition order: what tests/test_registration.py checks.
OPS: list[str] = []


def define(schema: str, reference) -> str:
    """Defines accelops::<name> from `schema` with `reference` as its default kernel
    (CompositeExplicitAutograd: every device without a kernel of its own, autograd
    excluded, which the family registers separately). -> "accelops::<name>"."""
    name = schema.split("(", 1)[0].strip()
    LIB.define(schema)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    OPS.append(name)
    return f"accelops::{name}"
