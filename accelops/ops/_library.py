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

import inspect

import torch

# Imported for its side effect first: it loads accelops._C before the namespace is claimed
# below. Either order works for current builds (TORCH_LIBRARY_IMPL may precede the
# definitions; tests/test_registration.py loads the extension both ways), but only this one
# turns a stale build into a Python error (see _claim).
from . import _backend


def _claim() -> torch.library.Library:
    # "DEF": this module owns the namespace, as a TORCH_LIBRARY block would; a second
    # definition of any accelops op, in C++ or Python, is an error.
    try:
        return torch.library.Library("accelops", "DEF")
    except RuntimeError as exc:
        if _backend.extension()[0] is None:
            raise
        raise ImportError(
            "accelops._C still defines the accelops op schemas itself: it was built from sources older than "
            "accelops/ops/_library.py (the schemas now live in Python); rebuild it with `make build` or "
            "`python setup.py build_ext --inplace`"
        ) from exc


LIB = _claim()
# Every op defined, in definition order: what tests/test_registration.py checks.
OPS: list[str] = []


def _contiguous(out):
    if isinstance(out, torch.Tensor):
        return out.contiguous()
    if isinstance(out, tuple):
        return tuple(_contiguous(o) for o in out)
    return out


def _check_signature(schema: str, reference) -> None:
    """The reference must take the schema's arguments: same names, in order, with the
    schema's default exactly where it has one. The dispatcher calls a Python kernel with the
    arguments as the caller wrote them: defaults left out, keywords kept."""
    arguments = torch._C.parse_schema(f"accelops::{schema}").arguments
    params = list(inspect.signature(reference).parameters.values())
    want = [(a.name, a.default_value if a.has_default_value() else "<none>") for a in arguments]
    got = [(p.name, "<none>" if p.default is inspect.Parameter.empty else p.default) for p in params]
    if want != got:
        raise TypeError(f"the reference kernel of {schema!r} takes {got} (name, default); the schema wants {want}")


def define(schema: str, reference) -> str:
    """Defines accelops::<name> from `schema` with `reference` as its default kernel
    (CompositeExplicitAutograd: every device without a kernel of its own, autograd
    excluded, which the family registers separately). -> "accelops::<name>"."""
    name = schema.split("(", 1)[0].strip()
    _check_signature(schema, reference)

    def default_kernel(*args, **kwargs):
        # Contiguous outputs, as the fakes promise and the C++ kernels give: the reference's
        # follow its inputs' strides, and a compiled graph asserts the fake's strides. A
        # no-op (no copy) on outputs that are contiguous already.
        return _contiguous(reference(*args, **kwargs))

    default_kernel.__name__ = f"{name}_reference"
    LIB.define(schema)
    LIB.impl(name, default_kernel, "CompositeExplicitAutograd")
    OPS.append(name)
    return f"accelops::{name}"
