"""Pure-PyTorch reference for the communication family: the specification every backend
matches. These are the per-rank pieces of a gradient all-reduce: packing gradients into
one buffer, compressing a buffer before it is sent and expanding what was received. The
transport itself is torch.distributed; nothing here talks to other ranks.

Conventions shared by every op:
- Buffers are 1-D. A compressor takes the gradient `grad` and, for error feedback, a
  `residual` of the same shape (fp32, or None for no feedback). It forms
  acc = grad + residual (in fp32), compresses acc, and overwrites residual with
  acc - decompress(compress(acc)): what was not sent this step is sent later, so
  sent + residual == acc after every step (exactly for top-k, whose sent values are
  elements of acc; to one fp32 rounding for sign and int8).
- Decompressors accept one payload (1-D) or the payloads of W ranks stacked on a leading
  dimension ([W, ...]) and return the element-wise mean over the ranks, in fp32, summed
  in rank order: the average gradient, which is what an all-reduce hook must return.
- Stochastic choices come from a counter-based hash of (seed, element index), so every
  backend draws the same numbers and results are reproducible.
- NaN and Inf are never hidden: a NaN gradient element reaches the decompressed result
  (so a GradScaler sees it), as spelled out per op.
"""

from __future__ import annotations

import math

import torch

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
    "uniform_hash",
]

_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- buckets


def bucket_flatten(tensors, dtype=None, divisor=None):
    """The tensors' elements, in order, in one contiguous 1-D tensor of `dtype` (default:
    the tensors' common dtype). With a divisor each element becomes
    (float32(x) / divisor) rounded once to `dtype`: the fused "divide by world size, then
    cast to bf16/fp16" that a compressed all-reduce starts with."""
    dtype = tensors[0].dtype if dtype is None else dtype
    if not tensors:
        return torch.empty(0, dtype=dtype)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if divisor is None:
        return flat.to(dtype)
    return (flat.float() / float(divisor)).to(dtype)


def bucket_unflatten_(flat, tensors, divisor=None):
    """Copies consecutive slices of the 1-D `flat` back into each tensor (in place),
    converted to that tensor's dtype; with a divisor, float32(v) / divisor first."""
    offset = 0
    for t in tensors:
        n = t.numel()
        part = flat[offset : offset + n].reshape(t.shape)
        if divisor is not None:
            part = part.float() / float(divisor)
        t.copy_(part)
        offset += n
    return tensors


def cast_div(x, divisor, dtype):
    """(float32(x) / divisor) rounded once to dtype (bf16 / fp16 / fp32)."""
    return (x.float() / float(divisor)).to(dtype)


# --------------------------------------------------------------------------- shared pieces


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for uint32 values held in int64, split so no product overflows.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _seed_key(seed: int) -> int:
    return (int(seed) * 0x9E3779B9 + 0x7F4A7C15) & _M32


def uniform_hash(seed: int, n: int, device=None) -> torch.Tensor:
    """n fp32 draws in [0, 1), the i-th a pure function of (seed, i): murmur3's 32-bit
    finalizer over (i mod 2^32) xor a key from the seed, keeping 24 bits so each draw is
    an exact fp32 multiple of 2^-24."""
    x = torch.arange(n, dtype=torch.int64, device=device) & _M32
    x = x ^ _seed_key(seed)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (2.0**-24)


def _accumulate(grad, residual):
    return grad.float() if residual is None else grad.float() + residual


def _chunks(n: int, chunk_size: int) -> int:
    return (n + chunk_size - 1) // chunk_size


def _padded(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """x [n] as [chunks, chunk_size], the tail padded with zeros."""
    n = x.numel()
    pad = _chunks(n, chunk_size) * chunk_size - n
    return torch.nn.functional.pad(x, (0, pad)).view(-1, chunk_size)


def _stack(payload: torch.Tensor) -> torch.Tensor:
    return payload.unsqueeze(0) if payload.dim() == 1 else payload


def _mean_over_ranks(per_rank: torch.Tensor) -> torch.Tensor:
    """[W, n] fp32 -> [n]: summed in rank order, then divided by W."""
    total = per_rank[0].clone()
    for r in range(1, per_rank.shape[0]):
        total += per_rank[r]
    return total / per_rank.shape[0] if per_rank.shape[0] > 1 else total


# --------------------------------------------------------------------------- top-k


def topk_compress_(grad, residual, k: int, method: str = "exact", sample_size: int = 4096, seed: int = 0):
    """Top-k sparsification with error feedback -> (values fp32 [k], indices int32 [k]).

    acc = grad + residual. 'exact' sends the k elements of largest |acc| (NaN counts as
    the largest; which of equal magnitudes at the boundary is sent is unspecified).
    'sampled' (Deep Gradient Compression) estimates the threshold from a strided sample
    of acc: sample = |acc|[offset::stride][:sample_size] with stride = max(1, n //
    sample_size), offset = seed mod stride; t = the ks-th largest of the sample with
    ks = max(1, ceil(k * len(sample) / n)). Elements with |acc| >= t are candidates; if
    more than k, the k largest are sent; if fewer, all are sent and the rest of the k
    slots are padding (value 0, index of an element that is sent anyway, so adding the
    padding changes nothing). Either way residual = acc with the sent elements zeroed.
    Indices are in ascending order.
    """
    acc = _accumulate(grad, residual).reshape(-1)
    n = acc.numel()
    mag = acc.abs()
    mag = torch.where(torch.isnan(mag), torch.full_like(mag, math.inf), mag)
    if method == "exact":
        chosen = torch.topk(mag, k, sorted=False).indices
        chosen, _ = torch.sort(chosen)
        count = k
    elif method == "sampled":
        stride = max(1, n // sample_size)
        sample = mag[seed % stride :: stride][:sample_size]
        ks = max(1, -(-k * sample.numel() // n))  # ceil in exact integer arithmetic
        threshold = torch.topk(sample, ks).values[-1]
        candidates = torch.nonzero(mag >= threshold).flatten()
        if candidates.numel() > k:
            keep = torch.topk(mag[candidates], k, sorted=False).indices
            candidates = candidates[keep]
        chosen, _ = torch.sort(candidates)
        count = chosen.numel()
    else:
        raise ValueError(f"method must be 'exact' or 'sampled', got {method!r}")
    values = torch.zeros(k, dtype=torch.float32, device=acc.device)
    indices = torch.zeros(k, dtype=torch.int64, device=acc.device)
    values[:count] = acc[chosen]
    indices[:count] = chosen
    if count < k:
        indices[count:] = chosen[0] if count > 0 else 0
    sent = torch.zeros_like(acc)
    sent[chosen] = acc[chosen]
    if residual is not None:
        residual.copy_((acc - sent).view_as(residual))
    return values, indices.to(torch.int32)


def topk_decompress(values, indices, numel: int):
    """Dense fp32 [numel]: each rank's values scattered (added) at its indices, the mean
    over ranks (see the module docstring). Padding slots add 0."""
    values, indices = _stack(values).float(), _stack(indices).long()
    per_rank = torch.zeros(values.shape[0], numel, dtype=torch.float32, device=values.device)
    per_rank.scatter_add_(1, indices, values)
    return _mean_over_ranks(per_rank)


# --------------------------------------------------------------------------- sign (1-bit)


def sign_compress_(grad, residual, chunk_size: int = 2048):
    """1-bit compression with a per-chunk scale and error feedback ->
    (bits uint8 [ceil(n / 8)], scales fp32 [ceil(n / chunk_size)]).

    acc = grad + residual; per chunk of chunk_size consecutive elements (the last may be
    shorter), scale = mean |acc| (summed in fp64, divided by the chunk's length, rounded to fp32); element i's bit
    is 1 when acc_i >= 0 or acc_i is NaN, stored in byte i // 8 at bit i % 8
    (least significant first); sent_i = +scale or -scale. residual = acc - sent.
    A chunk holding NaN or Inf gets a NaN scale, so its decompressed values are NaN.
    """
    acc = _accumulate(grad, residual).reshape(-1)
    n = acc.numel()
    chunks = _padded(acc, chunk_size)
    lengths = torch.full((chunks.shape[0],), float(chunk_size), device=acc.device)
    if n % chunk_size:
        lengths[-1] = n % chunk_size
    # Summed in fp64 and rounded once: every backend gets the same fp32 scale whatever
    # its summation order (fp64 error on a chunk stays far below fp32's half ulp).
    scales = (chunks.abs().double().sum(dim=1) / lengths.double()).float()
    scales = torch.where(torch.isfinite(scales), scales, torch.full_like(scales, math.nan))
    positive = ~(acc < 0)  # NaN -> 1
    sent = torch.where(positive, 1.0, -1.0) * scales.repeat_interleave(chunk_size)[:n]
    if residual is not None:
        residual.copy_((acc - sent).view_as(residual))
    bits = torch.nn.functional.pad(positive.to(torch.int64), (0, (-n) % 8)).view(-1, 8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int64, device=acc.device)
    packed = (bits * weights).sum(dim=1).to(torch.uint8)
    return packed, scales


def sign_decompress(bits, scales, numel: int, chunk_size: int = 2048):
    """fp32 [numel]: +-scale per element from the bits, the mean over ranks."""
    bits, scales = _stack(bits), _stack(scales).float()
    shifts = torch.arange(8, dtype=torch.int64, device=bits.device)
    unpacked = ((bits.long().unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :numel]
    per_rank = torch.where(unpacked.bool(), 1.0, -1.0) * scales.repeat_interleave(chunk_size, dim=1)[:, :numel]
    return _mean_over_ranks(per_rank)


# --------------------------------------------------------------------------- int8 stochastic


def int8_compress_(grad, residual, chunk_size: int = 2048, seed: int = 0):
    """INT8 with stochastic rounding (QSGD-like) and a per-chunk scale ->
    (q int8 [n], scales fp32 [ceil(n / chunk_size)]).

    acc = grad + residual; per chunk a = max |acc|, scale = a / 127, inv = 127 / a (fp32
    IEEE divisions; inv = 0 when a == 0); q_i = clamp(floor(acc_i * inv + u_i), -127, 127)
    with u = uniform_hash(seed, n), so E[q_i * scale] = acc_i. A chunk holding NaN or Inf
    gets q = 0 and a NaN scale. residual = acc - q * scale.
    """
    acc = _accumulate(grad, residual).reshape(-1)
    n = acc.numel()
    chunks = _padded(acc, chunk_size)
    amax = chunks.abs().amax(dim=1)
    finite = torch.isfinite(amax)
    qmax = torch.full_like(amax, 127.0)
    scales = torch.where(finite, amax / qmax, torch.full_like(amax, math.nan))
    inv = torch.where(finite & (amax > 0), qmax / amax, torch.zeros_like(amax))
    u = uniform_hash(seed, n, device=acc.device)
    v = acc * inv.repeat_interleave(chunk_size)[:n]
    q = torch.floor(v + u).clamp_(-127, 127)
    q = torch.where(finite.repeat_interleave(chunk_size)[:n], q, torch.zeros_like(q))
    if residual is not None:
        residual.copy_((acc - q * scales.repeat_interleave(chunk_size)[:n]).view_as(residual))
    return q.to(torch.int8), scales


def int8_decompress(q, scales, chunk_size: int = 2048):
    """fp32 [n]: q * scale per element, the mean over ranks."""
    q, scales = _stack(q), _stack(scales).float()
    n = q.shape[1]
    per_rank = q.float() * scales.repeat_interleave(chunk_size, dim=1)[:, :n]
    return _mean_over_ranks(per_rank)


# --------------------------------------------------------------------------- PowerSGD


def orthogonalize_(m, eps: float = 1e-8):
    """Gram-Schmidt over the columns of m [..., n, r] in place (PowerSGD's step between
    its two matrix products): column i is divided by (its norm + eps), then removed from
    every later column. Float path: judged by error against an fp64 run, not bitwise."""
    for i in range(m.shape[-1]):
        col = m[..., i : i + 1]
        col /= torch.linalg.vector_norm(col, dim=-2, keepdim=True) + eps
        if i + 1 < m.shape[-1]:
            rest = m[..., i + 1 :]
            rest -= (col * rest).sum(dim=-2, keepdim=True) * col
    return m
