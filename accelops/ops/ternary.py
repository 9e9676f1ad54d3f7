"""Ternary (BitNet b1.58) ops: absmean weight quantization, 2-bit packing and the fused
int8-activation x packed-ternary matmul. See accelops/reference/ternary.py for the spec
and the packed layout.
"""

from __future__ import annotations

import functools

import torch

from ..reference import ternary as ref
from ..reference import ternary_base3 as ref_b3
from ..reference import ternary_lut as ref_lut
from . import _tuning
from . import _validate as check
from ._backend import choose, choose_and_forced, extension, register_triton_kernels  # noqa: F401 (extension: tests)
from ._library import define

__all__ = [
    "quantize_weight_ternary",
    "pack_ternary",
    "unpack_ternary",
    "ternary_matmul",
    "packed_cols",
    "FORMATS",
    "lut_shape",
    "pack_ternary_lut",
    "unpack_ternary_lut",
    "convert_ternary_format",
    "ternary_matmul_lut",
    "base3_cols",
    "pack_ternary_base3",
    "unpack_ternary_base3",
    "ternary_matmul_base3",
]

packed_cols = ref.packed_cols
lut_shape = ref_lut.lut_shape
base3_cols = ref_b3.base3_cols

# Packed ternary weight formats: "i2" (2 bits a weight, reference/ternary.py; every M),
# "lut3" (lookup-table format, 16 bits for 9 weights, reference/ternary_lut.py; a GEMV kernel)
# and "base3" (5 weights a byte, 1.6 bits a weight, reference/ternary_base3.py; a GEMV kernel).
FORMATS = ("i2", "lut3", "base3")

# Four 2-bit codes of 1 (zero weights): what the packing writes into the padding.
_PACKED_ZEROS = 0x55


def _triton():
    from ..kernels import ternary as triton_ternary

    return triton_ternary


def _check_packed(w_packed, k: int) -> None:
    check.tensor("w_packed", w_packed)
    check.dtype("w_packed", w_packed, torch.uint8)
    check.ndim("w_packed", w_packed, 2, "[N, ceil(K/128)*32]")
    expected = ref.packed_cols(k)
    if w_packed.shape[1] != expected:
        raise ValueError(
            f"w_packed must have {expected} columns (ceil(K/128)*32) to hold K={k}, got shape "
            f"{tuple(w_packed.shape)}; was it packed for a different in_features?"
        )


def quantize_weight_ternary(w: torch.Tensor, per_channel: bool = False):
    """w [N, K] float -> (w_packed uint8 [N, ceil(K/128)*32], w_scale fp32 [1] or [N])."""
    check.float_tensor("w", w)
    check.ndim("w", w, 2, "[out_features, in_features]")
    check.finite_weight("w", w)
    backend = choose("quantize_weight_ternary", w.device)
    if backend == "reference":
        return ref.quantize_weight_ternary(w, per_channel)
    if backend == "triton":
        return _triton().quantize_weight_ternary(w, per_channel)
    return torch.ops.accelops.quantize_weight_ternary(w, per_channel)


def pack_ternary(wq: torch.Tensor) -> torch.Tensor:
    """wq int8 [N, K] in {-1, 0, 1} -> w_packed uint8 [N, ceil(K/128)*32]."""
    check.tensor("wq", wq)
    check.dtype("wq", wq, torch.int8)
    check.ndim("wq", wq, 2, "[N, K]")
    if wq.numel() and (int(wq.min()) < -1 or int(wq.max()) > 1):
        raise ValueError(f"wq must hold only -1, 0 and 1, got values in [{int(wq.min())}, {int(wq.max())}]")
    backend = choose("pack_ternary", wq.device)
    if backend == "reference":
        return ref.pack_ternary(wq)
    if backend == "triton":
        return _triton().pack_ternary(wq)
    return torch.ops.accelops.pack_ternary(wq)


def unpack_ternary(w_packed: torch.Tensor, k: int) -> torch.Tensor:
    """w_packed uint8 [N, ceil(K/128)*32] -> wq int8 [N, K] in {-1, 0, 1}."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    _check_packed(w_packed, k)
    backend = choose("unpack_ternary", w_packed.device)
    if backend == "reference":
        return ref.unpack_ternary(w_packed, k)
    if backend == "triton":
        return _triton().unpack_ternary(w_packed, k)
    return torch.ops.accelops.unpack_ternary(w_packed, k)


def _check_scale_and_bias(w_scale, bias, n: int) -> None:
    """w_scale fp32 with 1 (per tensor) or N (per channel) scales; bias None or [N]."""
    check.tensor("w_scale", w_scale)
    check.dtype("w_scale", w_scale, torch.float32)
    if w_scale.numel() not in (1, n):
        raise ValueError(
            f"w_scale must hold 1 (per tensor) or N={n} (per channel) scales, got shape {tuple(w_scale.shape)}"
        )
    check.bias(bias, n)


def _check_k(k) -> None:
    # SymInt: a K taken from a shape under torch.compile with dynamic shapes
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)) or k < 0:
        raise ValueError(f"k must be a non-negative int (the in_features w_packed was packed for), got {k!r}")


@functools.lru_cache(maxsize=None)
def _padding_mask(r: int, device: torch.device) -> torch.Tensor:
    """uint8 [32]: in each byte of a packed block, the 2-bit fields of the weights at
    in-block positions >= r (weight 32 j + i of a block sits in byte i, bits 2 j .. 2 j + 1).
    Built once per (r, device): on CUDA a fresh one would cost a host-to-device copy a call."""
    mask = [sum(3 << (2 * j) for j in range(4) if 32 * j + i >= r) for i in range(ref.BLOCK_BYTES)]
    return torch.tensor(mask, dtype=torch.uint8, device=device)


def _check_padding(w_packed: torch.Tensor, k: int) -> None:
    """Without k, w_packed's shape only says K <= ceil(K/128)*128: an x whose K stops inside
    the last 128-block would be read as zero-padded. The weights a packing for this x's K
    would pad are all zero (code 1), so any other code there means w_packed holds a larger K."""
    r = k % ref.BLOCK_K
    if r == 0 or w_packed.numel() == 0:
        return  # no padding to hold anything
    if w_packed.device.type == "meta" or torch.compiler.is_compiling():
        return  # no data to read / a data-dependent branch cannot be traced: pass k= there
    last = w_packed[:, -ref.BLOCK_BYTES :]  # the last block only: N x 32 bytes
    stray = (last ^ _PACKED_ZEROS) & _padding_mask(r, w_packed.device)
    if bool(stray.any()):  # the one host sync (on CUDA) that a call without k adds
        padded = ref.packed_cols(k) // ref.BLOCK_BYTES * ref.BLOCK_K
        raise ValueError(
            f"w_packed was packed for a larger K than x's: x has K={k}, but w_packed (shape "
            f"{tuple(w_packed.shape)}, padded K={padded}) holds nonzero weights among positions {k}..{padded - 1}, "
            f"which a packing for K={k} leaves zero; "
            f"pass k=<the in_features it was packed for> to ternary_matmul to check K exactly"
        )


def _check_base3_padding(w_b3: torch.Tensor, k: int) -> None:
    """_check_padding for the base3 format (blocks of 320): any weight of the last block at
    in-block position >= K mod 320 that is not zero (digit 1) means w_b3 holds a larger K."""
    r = k % ref_b3.BLOCK_K
    if r == 0 or w_b3.numel() == 0:
        return
    if w_b3.device.type == "meta" or torch.compiler.is_compiling():
        return
    digits = ref_b3.digits(w_b3[:, -ref_b3.BLOCK_BYTES :])  # the last block only: N x 320
    if bool((digits[:, r:] != 1).any()):
        padded = ref_b3.base3_cols(k) // ref_b3.BLOCK_BYTES * ref_b3.BLOCK_K
        raise ValueError(
            f"w_b3 was packed for a larger K than x's: x has K={k}, but w_b3 (shape {tuple(w_b3.shape)}, "
            f"padded K={padded}) holds nonzero weights among positions {k}..{padded - 1}, which a packing for "
            f"K={k} leaves zero; pass k=<the in_features it was packed for> to check K exactly"
        )


def ternary_matmul(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int | None = None,
    format: str = "i2",
    n: int | None = None,
):
    """y = ternary(W) @ int8(x) with exact int32 sums, dequantized: x [..., K] -> y [..., N] in x's dtype.

    `format`: the layout of w_packed, "i2" (2 bits a weight, from pack_ternary), "lut3"
    (from pack_ternary_lut; then `n`, the number of output rows, is required, and the call is
    ternary_matmul_lut's) or "base3" (from pack_ternary_base3; the call is
    ternary_matmul_base3's, `n` optional and checked against w_packed's rows). All give
    identical results for the same weights.

    `k`: the K (in_features) w_packed was packed for. w_packed's shape gives only
    ceil(K/128)*128, so an x of K=100 would fit a weight packed for K=128 and be read as
    zero-padded. With k, x.shape[-1] must equal k (ValueError naming both) and w_packed must
    have packed_cols(k) columns: shape checks only, nothing read. Without k, the weights of
    the last 128-block at positions >= x.shape[-1] must all be zero codes (as a packing for
    x's K pads them); otherwise ValueError. That reads N x 32 bytes and, on CUDA, waits for
    the device once; it is skipped under torch.compile, and cannot tell a larger K whose
    trailing weights all quantized to 0: callers that know K (layers) pass k=.
    """
    if format != "i2":
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if format == "base3":
            if n is not None:
                _check_n(n)
                if isinstance(w_packed, torch.Tensor) and w_packed.ndim == 2 and w_packed.shape[0] != n:
                    raise ValueError(
                        f"n={n} does not match w_packed's {w_packed.shape[0]} rows (base3: [N, ceil(K/320)*64])"
                    )
            return ternary_matmul_base3(x, w_packed, w_scale, bias, k=k)
        if n is None:
            raise ValueError(
                "format='lut3' needs n= (the number of output rows: the format pads N to a multiple of 32)"
            )
        return ternary_matmul_lut(x, w_packed, w_scale, bias, n=n, k=k)
    if n is not None:
        raise ValueError("n= applies to format='lut3' and 'base3' only (an i2 weight's shape gives N)")
    check.float_tensor("x", x)
    check.at_least_1d("x", x)
    if k is not None:
        _check_k(k)
        if x.shape[-1] != k:
            raise ValueError(
                f"x's last dim must equal k={k} (the in_features w_packed was packed for), got K={x.shape[-1]} "
                f"(x of shape {tuple(x.shape)})"
            )
    _check_packed(w_packed, x.shape[-1])
    n = w_packed.shape[0]
    _check_scale_and_bias(w_scale, bias, n)
    device = check.same_device(x=x, w_packed=w_packed, w_scale=w_scale, bias=bias)
    if k is None:
        _check_padding(w_packed, x.shape[-1])
    backend, forced = choose_and_forced("ternary_matmul", device)
    tuned = None
    if backend == "native" and not forced:
        kx = x.shape[-1]
        tuned = _tuning.choice_for(
            "ternary_matmul", device, (x.numel() // kx if kx else 0, n, kx), (x, w_packed, w_scale, bias)
        )
        if tuned is not None and tuned.backend == "reference":
            backend = "reference"
    if backend == "reference":
        return ref.ternary_matmul(x, w_packed, w_scale, bias)
    if backend == "triton":
        return _triton().ternary_matmul(x, w_packed, w_scale, bias)
    if tuned is not None and tuned.backend == "aten_int_mm" and device.type == "cpu":
        # The table measured ATen's int8 GEMM faster for this shape here (identical result).
        fn = torch.ops.accelops.ternary_matmul_int_mm
    else:
        fn = torch.ops.accelops.ternary_matmul
    return _tuning.call_with(tuned, fn, x, w_packed, w_scale, bias)


# --------------------------------------------------------------------------- lut3 format


def _check_n(n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 0:
        raise ValueError(f"n must be a non-negative int (the out_features of the weight), got {n!r}")


def _check_lut(w_lut, n: int, k: int) -> None:
    check.tensor("w_lut", w_lut)
    check.dtype("w_lut", w_lut, torch.int16)
    check.ndim("w_lut", w_lut, 3, "[ceil(N/32), ceil(K/9), 32]")
    expected = lut_shape(n, k)
    if tuple(w_lut.shape) != expected:
        raise ValueError(
            f"w_lut must have shape {expected} ([ceil(N/32), ceil(K/9), 32]) for N={n}, K={k}, got shape "
            f"{tuple(w_lut.shape)}; was it packed for a different in_features or out_features?"
        )


def pack_ternary_lut(wq: torch.Tensor) -> torch.Tensor:
    """wq int8 [N, K] in {-1, 0, 1} -> w_lut int16 [ceil(N/32), ceil(K/9), 32] (lut3 format)."""
    check.tensor("wq", wq)
    check.dtype("wq", wq, torch.int8)
    check.ndim("wq", wq, 2, "[N, K]")
    if wq.numel() and (int(wq.min()) < -1 or int(wq.max()) > 1):
        raise ValueError(f"wq must hold only -1, 0 and 1, got values in [{int(wq.min())}, {int(wq.max())}]")
    return ref_lut.pack_ternary_lut(wq)


def unpack_ternary_lut(w_lut: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """w_lut int16 [ceil(N/32), ceil(K/9), 32] -> wq int8 [N, K] in {-1, 0, 1}."""
    _check_n(n)
    _check_k(k)
    _check_lut(w_lut, n, k)
    return ref_lut.unpack_ternary_lut(w_lut, n, k)


def convert_ternary_format(w: torch.Tensor, src: str, dst: str, *, n: int, k: int) -> torch.Tensor:
    """The same ternary weights [N, K] from format `src` to format `dst` (see FORMATS):
    lossless both ways, the scales are shared."""
    for name, value in (("src", src), ("dst", dst)):
        if value not in FORMATS:
            raise ValueError(f"{name} must be one of {FORMATS}, got {value!r}")
    _check_n(n)
    _check_k(k)
    if src == "i2":
        _check_packed(w, k)
        if w.shape[0] != n:
            raise ValueError(f"w has {w.shape[0]} rows, n={n}")
        wq = unpack_ternary(w, k)
    elif src == "base3":
        _check_base3(w, k, n)
        wq = ref_b3.unpack_ternary_base3(w, k)
    else:
        wq = unpack_ternary_lut(w, n, k)
    if dst == "i2":
        return pack_ternary(wq)
    return pack_ternary_lut(wq) if dst == "lut3" else pack_ternary_base3(wq)


def ternary_matmul_lut(
    x: torch.Tensor,
    w_lut: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    n: int,
    k: int | None = None,
):
    """ternary_matmul on lut3-format weights (pack_ternary_lut): the same result as the 2-bit
    format for the same weights. `n`: the output rows (the format pads N to a multiple of 32);
    `k`, if given, must equal x.shape[-1]. The C++ kernel is a GEMV (weights read once per
    row of x): for M > 1 the 2-bit format's GEMM is the faster choice."""
    check.float_tensor("x", x)
    check.at_least_1d("x", x)
    _check_n(n)
    if k is not None:
        _check_k(k)
        if x.shape[-1] != k:
            raise ValueError(
                f"x's last dim must equal k={k} (the in_features w_lut was packed for), got K={x.shape[-1]} "
                f"(x of shape {tuple(x.shape)})"
            )
    _check_lut(w_lut, n, x.shape[-1])
    _check_scale_and_bias(w_scale, bias, n)
    device = check.same_device(x=x, w_lut=w_lut, w_scale=w_scale, bias=bias)
    # TODO(issue 26 item 1): the automatic dispatch (_tuning) could also choose the format
    # per layer; here the caller's format decides, and only reference vs native is chosen.
    backend = choose("ternary_matmul", device)
    if backend == "reference":
        return ref_lut.ternary_matmul_lut(x, w_lut, w_scale, n, bias)
    return torch.ops.accelops.ternary_matmul_lut(x, w_lut, w_scale, n, bias)


# --------------------------------------------------------------------------- base3 format


def _check_base3(w_b3, k: int, n: int | None = None) -> None:
    check.tensor("w_b3", w_b3)
    check.dtype("w_b3", w_b3, torch.uint8)
    check.ndim("w_b3", w_b3, 2, "[N, ceil(K/320)*64]")
    expected = base3_cols(k)
    if w_b3.shape[1] != expected:
        raise ValueError(
            f"w_b3 must have {expected} columns (ceil(K/320)*64) to hold K={k}, got shape "
            f"{tuple(w_b3.shape)}; was it packed for a different in_features?"
        )
    if n is not None and w_b3.shape[0] != n:
        raise ValueError(f"w_b3 has {w_b3.shape[0]} rows, n={n}")


def pack_ternary_base3(wq: torch.Tensor) -> torch.Tensor:
    """wq int8 [N, K] in {-1, 0, 1} -> w_b3 uint8 [N, ceil(K/320)*64] (base3 format)."""
    check.tensor("wq", wq)
    check.dtype("wq", wq, torch.int8)
    check.ndim("wq", wq, 2, "[N, K]")
    if wq.numel() and (int(wq.min()) < -1 or int(wq.max()) > 1):
        raise ValueError(f"wq must hold only -1, 0 and 1, got values in [{int(wq.min())}, {int(wq.max())}]")
    return ref_b3.pack_ternary_base3(wq)


def unpack_ternary_base3(w_b3: torch.Tensor, k: int) -> torch.Tensor:
    """w_b3 uint8 [N, ceil(K/320)*64] -> wq int8 [N, K] in {-1, 0, 1}."""
    _check_k(k)
    _check_base3(w_b3, k)
    return ref_b3.unpack_ternary_base3(w_b3, k)


def ternary_matmul_base3(
    x: torch.Tensor,
    w_b3: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int | None = None,
):
    """ternary_matmul on base3-format weights (pack_ternary_base3): the same result as the
    2-bit format for the same weights. N is w_b3's rows; `k`, if given, must equal
    x.shape[-1] (w_b3's shape gives only ceil(K/320)*320; without k, the last block's padding
    is checked to hold zero weights, as the i2 path does). The C++ kernel is a GEMV (weights read
    once per row of x): for M > 1 the 2-bit format's GEMM is the faster choice."""
    check.float_tensor("x", x)
    check.at_least_1d("x", x)
    if k is not None:
        _check_k(k)
        if x.shape[-1] != k:
            raise ValueError(
                f"x's last dim must equal k={k} (the in_features w_b3 was packed for), got K={x.shape[-1]} "
                f"(x of shape {tuple(x.shape)})"
            )
    _check_base3(w_b3, x.shape[-1])
    if k is None:
        _check_base3_padding(w_b3, x.shape[-1])
    _check_scale_and_bias(w_scale, bias, w_b3.shape[0])
    device = check.same_device(x=x, w_b3=w_b3, w_scale=w_scale, bias=bias)
    backend = choose("ternary_matmul", device)
    if backend == "reference":
        return ref_b3.ternary_matmul_base3(x, w_b3, w_scale, bias)
    return torch.ops.accelops.ternary_matmul_base3(x, w_b3, w_scale, bias)


# --------------------------------------------------------------------------- registration
# The family's ops: schema and default (reference) kernel, fake, autograd, CUDA kernels.
# The C++ CPU kernels are csrc/cpu/ternary.cpp and int_mm.cpp, registered in csrc/ops.cpp.


def _register() -> None:
    define("pack_ternary(Tensor wq) -> Tensor", ref.pack_ternary)
    define("unpack_ternary(Tensor w_packed, int k) -> Tensor", ref.unpack_ternary)
    define("quantize_weight_ternary(Tensor w, bool per_channel=False) -> (Tensor, Tensor)", ref.quantize_weight_ternary)
    define("ternary_matmul(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias=None) -> Tensor", ref.ternary_matmul)
    # The same results from the lut3 format (reference/ternary_lut.py; C++: ternary_lut.cpp).
    define(
        "ternary_matmul_lut(Tensor x, Tensor w_lut, Tensor w_scale, int n, Tensor? bias=None) -> Tensor",
        ref_lut.ternary_matmul_lut,
    )
    # The same results from the base3 format (reference/ternary_base3.py; C++: ternary_base3.cpp).
    define(
        "ternary_matmul_base3(Tensor x, Tensor w_b3, Tensor w_scale, Tensor? bias=None) -> Tensor",
        ref_b3.ternary_matmul_base3,
    )
    # The same results with ATen's int8 GEMM computing the sums (a tuned-dispatch candidate).
    define(
        "ternary_matmul_int_mm(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias=None) -> Tensor",
        ref.ternary_matmul,
    )

    @torch.library.register_fake("accelops::pack_ternary")
    def _(wq):
        return wq.new_empty((wq.shape[0], ref.packed_cols(wq.shape[1])), dtype=torch.uint8)

    @torch.library.register_fake("accelops::unpack_ternary")
    def _(w_packed, k):
        return w_packed.new_empty((w_packed.shape[0], k), dtype=torch.int8)

    @torch.library.register_fake("accelops::quantize_weight_ternary")
    def _(w, per_channel=False):
        packed = w.new_empty((w.shape[0], ref.packed_cols(w.shape[1])), dtype=torch.uint8)
        return packed, w.new_empty((w.shape[0] if per_channel else 1,), dtype=torch.float32)

    @torch.library.register_fake("accelops::ternary_matmul")
    def _(x, w_packed, w_scale, bias=None):
        return x.new_empty((*x.shape[:-1], w_packed.shape[0]))

    # Straight-through gradient for x: d(y)/d(x) is taken as the dequantized weight, so a
    # frozen ternary layer still passes gradients to what lies below it (adapters, inputs).
    def setup_context(ctx, inputs, output):
        x, w_packed, w_scale, bias = inputs
        ctx.save_for_backward(w_packed, w_scale)
        ctx.k = x.shape[-1]
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, grad_y):
        w_packed, w_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = torch.ops.accelops.unpack_ternary(w_packed, ctx.k).float() * w_scale.reshape(-1, 1)
            grad_x = (grad_y.float() @ w).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias

    # The same op with ATen's int8 GEMM for the sums (a tuned-dispatch candidate): same
    # schema, same result, so the same fake and the same gradient.
    torch.library.register_fake("accelops::ternary_matmul_int_mm")(
        lambda x, w, w_scale, bias=None: x.new_empty((*x.shape[:-1], w.shape[0]))
    )
    for name in ("accelops::ternary_matmul", "accelops::ternary_matmul_int_mm"):
        torch.library.register_autograd(name, backward, setup_context=setup_context)

    @torch.library.register_fake("accelops::ternary_matmul_lut")
    def _(x, w_lut, w_scale, n, bias=None):
        return x.new_empty((*x.shape[:-1], n))

    # The same straight-through gradient as ternary_matmul's.
    def setup_context_lut(ctx, inputs, output):
        x, w_lut, w_scale, n, bias = inputs
        ctx.save_for_backward(w_lut, w_scale)
        ctx.k, ctx.n = x.shape[-1], n
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward_lut(ctx, grad_y):
        w_lut, w_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ref_lut.unpack_ternary_lut(w_lut, ctx.n, ctx.k).float() * w_scale.reshape(-1, 1)
            grad_x = (grad_y.float() @ w).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, None, grad_bias

    torch.library.register_autograd("accelops::ternary_matmul_lut", backward_lut, setup_context=setup_context_lut)

    @torch.library.register_fake("accelops::ternary_matmul_base3")
    def _(x, w_b3, w_scale, bias=None):
        return x.new_empty((*x.shape[:-1], w_b3.shape[0]))

    # The same straight-through gradient as ternary_matmul's.
    def setup_context_b3(ctx, inputs, output):
        x, w_b3, w_scale, bias = inputs
        ctx.save_for_backward(w_b3, w_scale)
        ctx.k = x.shape[-1]
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward_b3(ctx, grad_y):
        w_b3, w_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ref_b3.unpack_ternary_base3(w_b3, ctx.k).float() * w_scale.reshape(-1, 1)
            grad_x = (grad_y.float() @ w).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias

    torch.library.register_autograd("accelops::ternary_matmul_base3", backward_b3, setup_context=setup_context_b3)

    register_triton_kernels("ternary", ("ternary_matmul", "pack_ternary", "unpack_ternary", "quantize_weight_ternary"))


_register()
