"""Pure-PyTorch reference for the INT8 family: the specification every backend matches.

Symmetric absmax quantization to [-127, 127] (never -128, so negation is exact and the
ternary kernels can use unsigned x signed multiplies without overflow):

    a     = max(max|row|, EPS)                       (fp32)
    q     = clamp(round_half_even(x * (127 / a)), -127, 127)
    scale = a / 127                                  (fp32, x ~= q * scale)

All arithmetic is in fp32 with IEEE division, so every backend produces bit-identical
`q` and `scale`. A row holding NaN or +-Inf quantizes to zeros with scale NaN: its output
row becomes NaN and no other row is touched.
"""

import torch

EPS = 1e-5  # floor on a row's absmax: an all-zero row gets zeros and a finite scale
QMAX = 127.0
# The largest K whose int8 x int8 sums fit int32 for any int8 codes: K * 128 * 128 < 2^31.
# Beyond it a sum can wrap (K = 140000 of 127 * 127 gave -16,038,640 for 2,258,060,000),
# so every backend, this reference included, refuses larger K instead of answering wrongly.
MAX_K = 2**31 // (128 * 128) - 1  # 131071


def check_k(k: int) -> None:
    if k > MAX_K:
        raise ValueError(
            f"K={k} exceeds the int8 GEMM's exact-accumulation limit K <= {MAX_K} (int32 sums of "
            "up to K * 128 * 128 must stay below 2^31); split the reduction into chunks of at most "
            f"{MAX_K} and add the float results"
        )


def _absmax_quantize(x: torch.Tensor, dim: int):
    xf = x.float()
    amax = xf.abs().amax(dim=dim, keepdim=True)
    finite = torch.isfinite(amax)
    a = amax.clamp_min(EPS)
    # Tensor / tensor: torch turns `scalar / tensor` into a multiply by a reciprocal, which
    # is 1 ulp off IEEE division for ~1 row in 4 and would break bit-exactness.
    qmax = torch.full_like(a, QMAX)
    inv = qmax / a
    q = torch.round(xf * inv).clamp_(-QMAX, QMAX)
    q = torch.where(finite, q, torch.zeros_like(q)).to(torch.int8)
    scale = torch.where(finite, a / qmax, torch.full_like(a, float("nan")))
    return q, scale


def quantize_activation_int8(x: torch.Tensor):
    """Per-token (row of the last dim) absmax -> (x_q int8 [..., K], x_scale fp32 [..., 1])."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape, dtype=torch.int8, device=x.device), torch.full(
            (*x.shape[:-1], 1), EPS / QMAX, dtype=torch.float32, device=x.device
        )
    return _absmax_quantize(x, dim=-1)


def quantize_weight_int8(w: torch.Tensor):
    """Per output channel (row) symmetric -> (w_q int8 [N, K], w_scale fp32 [N])."""
    if w.shape[1] == 0:
        return torch.zeros(w.shape, dtype=torch.int8, device=w.device), torch.full(
            (w.shape[0],), EPS / QMAX, dtype=torch.float32, device=w.device
        )
    q, scale = _absmax_quantize(w, dim=1)
    return q, scale.reshape(-1)


def int_dot(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 a_q [M, K] @ b_q[N, K]^T.

    fp64 is exact here: every partial sum is an integer below 2^53 (|a|, |b| <= 127), so the
    result does not depend on summation order, and fp64 GEMM is far faster than int64.
    """
    return (a_q.double() @ b_q.double().t()).to(torch.int32)


def dequantize_epilogue(acc, x_scale, w_scale, bias, out_dtype):
    """y = (acc * x_scale) * w_scale + bias, in fp32, then cast: the shared epilogue."""
    y = (acc.float() * x_scale.reshape(-1, 1)) * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_matmul(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.float32):
    """W8A8: x_q [..., K] int8 with x_scale [..., 1], w_q [N, K] int8 with w_scale [N]."""
    check_k(x_q.shape[-1])
    lead = x_q.shape[:-1]
    acc = int_dot(x_q.reshape(lead.numel(), x_q.shape[-1]), w_q)
    y = dequantize_epilogue(acc, x_scale.reshape(-1), w_scale, bias, out_dtype)
    return y.reshape(*lead, w_q.shape[0])


def int8_linear(x, w_q, w_scale, bias=None):
    """Dynamic per-token activation quantization + int8_matmul; y in x's dtype."""
    x_q, x_scale = quantize_activation_int8(x)
    return int8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype)
