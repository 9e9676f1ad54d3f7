"""Communication family: bucket packing and gradient compression, the per-rank pieces of
a (compressed) all-reduce. accelops/reference/comm.py is the spec; this module validates
the inputs and dispatches to torch.ops.accelops.<op> (C++ on CPU, CUDA kernels on GPU)
or to the reference.

The op schemas, default (reference) kernels and fakes are registered at the bottom (_register).
"""

from __future__ import annotations

import math

import torch

from ..reference import comm as ref
from . import _validate as check
from ._backend import choose
from ._library import define

__all__ = [
    "bucket_flatten",
    "bucket_unflatten_",
    "cast_div",
    "topk_compress_",
    "topk_decompress",
    "sign_compress_",
    "sign_decompress",
    "int8_compress_",
    "int8_decompress",
    "orthogonalize_",
    "METHODS",
]

METHODS = ("exact", "sampled")
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _backend(name: str, device: torch.device):
    """The callable to run: the registered op, or None to call the reference directly.
    The family has no Triton kernels: on a GPU the op runs accelops._C_cuda's kernel when
    that module is in use (GPU builds without triton), else its default kernel, the
    reference."""
    if choose(name, device) == "reference":
        return None
    return getattr(torch.ops.accelops, name)


# --------------------------------------------------------------------------- validation


def _int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _divisor(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"divisor must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"divisor must be a finite number > 0 (e.g. the world size), got {value}")
    return float(value)


def _grad(name: str, value) -> torch.Tensor:
    check.tensor(name, value)
    if value.dtype not in GRAD_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")
    if not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a gradient bucket), got strides {value.stride()}")
    return value


def _residual(residual, grad: torch.Tensor):
    if residual is None:
        return None
    check.tensor("residual", residual)
    check.dtype("residual", residual, torch.float32)
    if residual.numel() != grad.numel():
        raise ValueError(f"residual must have grad's {grad.numel()} elements, got {residual.numel()}")
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous")
    check.same_device(grad=grad, residual=residual)
    return residual


def _payload_rows(name: str, value, dtype: torch.dtype, what: str) -> torch.Tensor:
    check.tensor(name, value)
    check.dtype(name, value, dtype)
    if value.dim() not in (1, 2):
        raise ValueError(f"{name} must be 1-D ({what}) or 2-D [ranks, ...], got shape {tuple(value.shape)}")
    return value


def _same_rows(**payloads) -> None:
    shapes = {n: tuple(t.shape[:-1]) for n, t in payloads.items()}
    dims = {n: t.dim() for n, t in payloads.items()}
    if len(set(dims.values())) != 1 or len(set(shapes.values())) != 1:
        desc = ", ".join(f"{n} {tuple(t.shape)}" for n, t in payloads.items())
        raise ValueError(f"payloads must be all 1-D or all [ranks, ...] with the same rank count, got {desc}")


def _chunk_count(name: str, scales: torch.Tensor, numel: int, chunk_size: int) -> None:
    chunks = (numel + chunk_size - 1) // chunk_size
    if scales.shape[-1] != chunks:
        raise ValueError(
            f"{name} must hold {chunks} scales (ceil({numel} / chunk_size {chunk_size})), got "
            f"{scales.shape[-1]}; was the payload compressed with another chunk_size?"
        )


# --------------------------------------------------------------------------- buckets


def bucket_flatten(tensors, dtype: torch.dtype | None = None, divisor=None) -> torch.Tensor:
    """The tensors' elements in order in one contiguous 1-D buffer (multi-threaded copy).
    dtype: the buffer's dtype (default: the tensors' common dtype); divisor: each element
    becomes float32(x) / divisor rounded once to dtype (divide by world size + cast, fused)."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    if not tensors and dtype is None:
        raise ValueError("tensors is empty: pass dtype= to get an empty buffer")
    for i, t in enumerate(tensors):
        _grad(f"tensors[{i}]", t)
    if tensors:
        check.same_device(**{f"tensors[{i}]": t for i, t in enumerate(tensors)})
    if dtype is None:
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise TypeError(
                f"tensors have mixed dtypes {sorted(map(str, dtypes))}; pass dtype= or bucket them by dtype"
            )
        dtype = tensors[0].dtype
    if dtype not in GRAD_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    divisor = None if divisor is None else _divisor(divisor)
    if not tensors:
        return torch.empty(0, dtype=dtype)
    op = _backend("bucket_flatten", tensors[0].device)
    if op is None:
        return ref.bucket_flatten(list(tensors), dtype, divisor)
    return op(list(tensors), dtype, divisor)


def bucket_unflatten_(flat: torch.Tensor, tensors, divisor=None):
    """Copies consecutive slices of the 1-D flat buffer back into the tensors in place
    (converting to each one's dtype; with a divisor, float32(v) / divisor first).
    Returns the tensors."""
    _grad("flat", flat)
    check.ndim("flat", flat, 1, "[numel]")
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        _grad(f"tensors[{i}]", t)
    total = sum(t.numel() for t in tensors)
    if total != flat.numel():
        raise ValueError(f"flat has {flat.numel()} elements but the tensors hold {total}")
    if not tensors:
        return tensors
    check.same_device(flat=flat, **{f"tensors[{i}]": t for i, t in enumerate(tensors)})
    divisor = None if divisor is None else _divisor(divisor)
    op = _backend("bucket_unflatten_", flat.device)
    if op is None:
        ref.bucket_unflatten_(flat, tensors, divisor)
    else:
        op(flat, list(tensors), divisor)
    return tensors


def cast_div(x: torch.Tensor, divisor, dtype: torch.dtype) -> torch.Tensor:
    """(float32(x) / divisor) rounded once to dtype (float32, bfloat16 or float16)."""
    _grad("x", x)
    divisor = _divisor(divisor)
    if dtype not in WIRE_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    op = _backend("cast_div", x.device)
    return ref.cast_div(x, divisor, dtype) if op is None else op(x, divisor, dtype)


# --------------------------------------------------------------------------- top-k


def topk_compress_(
    grad: torch.Tensor,
    residual: torch.Tensor | None,
    k: int,
    method: str = "exact",
    sample_size: int = 4096,
    seed: int = 0,
):
    """Top-k of acc = grad + residual -> (values fp32 [k], indices int32 [k], ascending);
    residual (fp32, updated in place) keeps what was not sent. method 'exact' or
    'sampled' (threshold from a strided sample, Deep Gradient Compression)."""
    _grad("grad", grad)
    residual = _residual(residual, grad)
    n = grad.numel()
    if n == 0:
        raise ValueError("grad is empty: nothing to select")
    if n >= 2**31:
        raise ValueError(f"grad has {n} elements; int32 indices address at most 2^31 - 1: split the bucket")
    k = _int("k", k, 1, n)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sample_size = _int("sample_size", sample_size, 1)
    seed = _int("seed", seed, 0)
    op = _backend("topk_compress_", grad.device)
    if op is None:
        return ref.topk_compress_(grad, residual, k, method, sample_size, seed)
    return op(grad, residual, k, method, sample_size, seed)


def topk_decompress(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    """fp32 [numel]: the values scattered at their indices; for [ranks, k] payloads, the
    mean over ranks."""
    _payload_rows("values", values, torch.float32, "[k]")
    _payload_rows("indices", indices, torch.int32, "[k]")
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have one shape")
    numel = _int("numel", numel, 1)
    check.same_device(values=values, indices=indices)
    if (
        not torch.compiler.is_compiling()
        and indices.numel()
        and (int(indices.min()) < 0 or int(indices.max()) >= numel)
    ):
        raise ValueError(f"indices must lie in [0, {numel}); got [{int(indices.min())}, {int(indices.max())}]")
    op = _backend("topk_decompress", values.device)
    return ref.topk_decompress(values, indices, numel) if op is None else op(values, indices, numel)


# --------------------------------------------------------------------------- sign


def sign_compress_(grad: torch.Tensor, residual: torch.Tensor | None, chunk_size: int = 2048):
    """1-bit sign of acc = grad + residual, 8 per byte, with a per-chunk mean-|acc| scale
    -> (bits uint8 [ceil(n/8)], scales fp32 [ceil(n/chunk_size)]); residual updated in place."""
    _grad("grad", grad)
    residual = _residual(residual, grad)
    if grad.numel() == 0:
        raise ValueError("grad is empty: nothing to compress")
    chunk_size = _int("chunk_size", chunk_size, 1)
    op = _backend("sign_compress_", grad.device)
    if op is None:
        return ref.sign_compress_(grad, residual, chunk_size)
    return op(grad, residual, chunk_size)


def sign_decompress(bits: torch.Tensor, scales: torch.Tensor, numel: int, chunk_size: int = 2048) -> torch.Tensor:
    """fp32 [numel]: +-scale per element; for [ranks, ...] payloads, the mean over ranks."""
    _payload_rows("bits", bits, torch.uint8, "[ceil(numel / 8)]")
    _payload_rows("scales", scales, torch.float32, "[chunks]")
    _same_rows(bits=bits, scales=scales)
    numel = _int("numel", numel, 1)
    chunk_size = _int("chunk_size", chunk_size, 1)
    if bits.shape[-1] != (numel + 7) // 8:
        raise ValueError(f"bits must hold {(numel + 7) // 8} bytes for {numel} elements, got {bits.shape[-1]}")
    _chunk_count("scales", scales, numel, chunk_size)
    check.same_device(bits=bits, scales=scales)
    op = _backend("sign_decompress", bits.device)
    return ref.sign_decompress(bits, scales, numel, chunk_size) if op is None else op(bits, scales, numel, chunk_size)


# --------------------------------------------------------------------------- int8


def int8_compress_(grad: torch.Tensor, residual: torch.Tensor | None, chunk_size: int = 2048, seed: int = 0):
    """INT8 with stochastic rounding (unbiased) and a per-chunk absmax scale ->
    (q int8 [n], scales fp32 [ceil(n/chunk_size)]); residual updated in place."""
    _grad("grad", grad)
    residual = _residual(residual, grad)
    if grad.numel() == 0:
        raise ValueError("grad is empty: nothing to compress")
    chunk_size = _int("chunk_size", chunk_size, 1)
    seed = _int("seed", seed, 0)
    op = _backend("int8_compress_", grad.device)
    if op is None:
        return ref.int8_compress_(grad, residual, chunk_size, seed)
    return op(grad, residual, chunk_size, seed)


def int8_decompress(q: torch.Tensor, scales: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """fp32 [n]: q * scale per element; for [ranks, n] payloads, the mean over ranks."""
    _payload_rows("q", q, torch.int8, "[n]")
    _payload_rows("scales", scales, torch.float32, "[chunks]")
    _same_rows(q=q, scales=scales)
    chunk_size = _int("chunk_size", chunk_size, 1)
    if q.shape[-1] == 0:
        raise ValueError("q is empty")
    _chunk_count("scales", scales, q.shape[-1], chunk_size)
    check.same_device(q=q, scales=scales)
    op = _backend("int8_decompress", q.device)
    return ref.int8_decompress(q, scales, chunk_size) if op is None else op(q, scales, chunk_size)


# --------------------------------------------------------------------------- PowerSGD


def orthogonalize_(m: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt over the columns of m [..., n, r] in place; returns m."""
    check.tensor("m", m)
    if m.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"m must be float32 or float64, got {m.dtype}")
    if m.dim() < 2:
        raise ValueError(f"m must be [..., n, r], got shape {tuple(m.shape)}")
    if not m.is_contiguous():
        raise ValueError("m must be contiguous")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    op = _backend("orthogonalize_", m.device)
    if op is None:
        ref.orthogonalize_(m, float(eps))
    else:
        op(m, float(eps))
    return m


# --------------------------------------------------------------------------- registration

# The family's ops: schema and default (reference) kernel, fake. The C++ CPU kernels are
# csrc/cpu/comm.cpp, registered in csrc/ops.cpp; the CUDA ones csrc/cuda/comm.cu,
# registered in csrc/cuda_ops.cpp (used when triton is missing, see _backend).


def _bucket_unflatten_reference(flat, tensors, divisor=None):
    ref.bucket_unflatten_(flat, tensors, divisor)  # the schema returns nothing


def _orthogonalize_reference(m, eps=1e-8):
    ref.orthogonalize_(m, eps)  # the schema returns nothing


def _register() -> None:
    """Schemas and fake (meta) kernels, so the ops trace under torch.compile: every
    output's shape follows from the inputs' shapes and the int arguments (top-k returns
    exactly k slots). The compressors update their error-feedback residual in place."""
    define(
        "bucket_flatten(Tensor[] tensors, ScalarType? dtype=None, float? divisor=None) -> Tensor", ref.bucket_flatten
    )
    define(
        "bucket_unflatten_(Tensor flat, Tensor(a!)[] tensors, float? divisor=None) -> ()", _bucket_unflatten_reference
    )
    define("cast_div(Tensor x, float divisor, ScalarType dtype) -> Tensor", ref.cast_div)
    define(
        'topk_compress_(Tensor grad, Tensor(a!)? residual, int k, str method="exact", int sample_size=4096, '
        "int seed=0) -> (Tensor values, Tensor indices)",
        ref.topk_compress_,
    )
    define("topk_decompress(Tensor values, Tensor indices, int numel) -> Tensor", ref.topk_decompress)
    define(
        "sign_compress_(Tensor grad, Tensor(a!)? residual, int chunk_size=2048) -> (Tensor bits, Tensor scales)",
        ref.sign_compress_,
    )
    define("sign_decompress(Tensor bits, Tensor scales, int numel, int chunk_size=2048) -> Tensor", ref.sign_decompress)
    define(
        "int8_compress_(Tensor grad, Tensor(a!)? residual, int chunk_size=2048, int seed=0) -> "
        "(Tensor q, Tensor scales)",
        ref.int8_compress_,
    )
    define("int8_decompress(Tensor q, Tensor scales, int chunk_size=2048) -> Tensor", ref.int8_decompress)
    define("orthogonalize_(Tensor(a!) m, float eps=1e-8) -> ()", _orthogonalize_reference)

    @torch.library.register_fake("accelops::bucket_flatten")
    def _(tensors, dtype=None, divisor=None):
        total = sum(t.numel() for t in tensors)
        return tensors[0].new_empty((total,), dtype=tensors[0].dtype if dtype is None else dtype)

    @torch.library.register_fake("accelops::bucket_unflatten_")
    def _(flat, tensors, divisor=None):
        return None

    @torch.library.register_fake("accelops::cast_div")
    def _(x, divisor, dtype):
        return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)

    @torch.library.register_fake("accelops::topk_compress_")
    def _(grad, residual, k, method="exact", sample_size=4096, seed=0):
        return grad.new_empty((k,), dtype=torch.float32), grad.new_empty((k,), dtype=torch.int32)

    @torch.library.register_fake("accelops::topk_decompress")
    def _(values, indices, numel):
        return values.new_empty((numel,), dtype=torch.float32)

    @torch.library.register_fake("accelops::sign_compress_")
    def _(grad, residual, chunk_size=2048):
        n = grad.numel()
        return (
            grad.new_empty(((n + 7) // 8,), dtype=torch.uint8),
            grad.new_empty(((n + chunk_size - 1) // chunk_size,), dtype=torch.float32),
        )

    @torch.library.register_fake("accelops::sign_decompress")
    def _(bits, scales, numel, chunk_size=2048):
        return scales.new_empty((numel,), dtype=torch.float32)

    @torch.library.register_fake("accelops::int8_compress_")
    def _(grad, residual, chunk_size=2048, seed=0):
        n = grad.numel()
        return (
            grad.new_empty((n,), dtype=torch.int8),
            grad.new_empty(((n + chunk_size - 1) // chunk_size,), dtype=torch.float32),
        )

    @torch.library.register_fake("accelops::int8_decompress")
    def _(q, scales, chunk_size=2048):
        return scales.new_empty((q.shape[-1],), dtype=torch.float32)

    @torch.library.register_fake("accelops::orthogonalize_")
    def _(m, eps=1e-8):
        return None


_register()
