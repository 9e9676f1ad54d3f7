"""Pure-PyTorch reference for the 8-bit optimizer family: the specification that the C++
(csrc/cpu/optim.cpp) and Triton (kernels/optim.py) kernels match bit for bit.

Numerical contract
------------------
States (AdamW's first and second moment, SGD's momentum buffer) are stored per block of
`block_size` consecutive elements (a power of two, default 256) of the flattened
parameter: one uint8 code per element and one fp32 scale per block, the block's absmax.
A code indexes a 256-entry fp32 quantization map (sorted ascending); the state value is
    value = map[code] * absmax          (one fp32 multiply)

The maps are dynamic-exponent maps in the spirit of Dettmers et al. (8-bit optimizers via
block-wise quantization): the values are split into decades 10^-k .. 10^-(k-1), and the
decade closest to 1 holds the most codes (linearly spaced), each decade further down holds
half as many, so small magnitudes keep a relative, not an absolute, resolution.
  - signed map (first moment, momentum): 7 decades down to 1e-7, 127 magnitudes below 1,
    +1.0, their negatives except the smallest, and 0: -1 and +1 are both exact.
  - unsigned map (second moment, >= 0): 8 decades down to 1e-8, 0 and 1.0 exact.

Quantizing a block: absmax = max |value| (NaN propagates), the divisor is absmax when
absmax > 0 and 1.0 otherwise (an all-zero block, or a NaN one), x = value / divisor (IEEE
fp32 division), and the code is the nearest map entry in this exact sense:
    thresholds t_i = fl(fl(map[i] + map[i+1]) * 0.5), i = 0..254   (fp32 ops)
    code = #{i : t_i < x}
so a value exactly on a threshold takes the lower code, and a NaN x takes code 0.

The fused step works element by element in fp32 with every operation rounded on its own
(no FMA), in this order; the per-step scalars are computed in Python floats (double) and
rounded once to fp32:
  AdamW (b1, b2, c1 = 1 - b1, c2 = 1 - b2, decay = 1 - lr * wd, step_size = lr / (1 - b1^t),
         bc2_sqrt = sqrt(1 - b2^t), eps):
    g = float(grad); p = float(param)
    m = b1 * m_old + c1 * g
    v = b2 * v_old + (c2 * g) * g
    p = p * decay
    denom = sqrt(v) / bc2_sqrt + eps     (sqrt correctly rounded)
    p = p - step_size * (m / denom)
  The parameter takes the fp32 m and v of this step; the stored states are their requantized
  codes with the new block absmax. bf16/fp16 params are computed in fp32 and rounded once
  (to nearest even) on the store.
  SGD with momentum (mu, damp_c = 1 - dampening, wd, lr; `first`: the state is empty):
    g = g + wd * p                      (when wd != 0)
    buf = g if first else mu * buf_old + damp_c * g
    d = g + mu * buf if nesterov else buf
    p = p - lr * d

NaN: a NaN gradient element makes its own parameter NaN at this step and the absmax of its
blocks NaN, so from the next step on that whole block (and only that block) is NaN. Other
blocks and other parameters are untouched.

The fp8 maps (AdamW8bit(state_map="fp8"), op accelops::adamw8bit_fp8_step_)
---------------------------------------------------------------------------
A second contract for AdamW's states whose code <-> value conversion is bit arithmetic on
fp32, no table and no search: a code is a tiny float relative to the block absmax.
  - first moment m, signed "E4M3": bit 7 sign, bits 6-3 exponent field e, bits 2-0
    mantissa f; magnitude code c = code & 0x7F, value 0 when c == 0, else
    2^(e - 15) * (1 + f / 8). 1.0 is c = 120; c = 121..127 (above 1) are never produced.
  - second moment v, unsigned "E5M3": bits 7-3 exponent field e, bits 2-0 mantissa f,
    c = code, value 0 when c == 0, else 2^(e - 31) * (1 + f / 8). 1.0 is c = 248; 249..255
    are never produced.
So m spans 15 binades below 1 (smallest nonzero 2^-15 * 1.125 = 3.4e-5) with 3 mantissa bits
(relative error <= 1/16), v 31 binades (smallest nonzero 2^-31 * 1.125 = 5.2e-10): v covers
the square of m's range, so a coordinate whose m survives has a v that does too. No
subnormals: the bottom binade's first code is zero (flush to zero at the bottom).
Decoding (FP8_BIAS = 112 << 23 for m, 96 << 23 for v): bits = (c << 20) + FP8_BIAS when
c != 0, else 0; m's sign bit then becomes the float's (code 0x80 is -0.0); value =
float(bits) * absmax (one fp32 multiply).
Quantizing a block: absmax = max |value| (NaN propagates), divisor = absmax if absmax > 0
else 1, r = fl(1 / divisor) (one fp32 division per block), x = fl(value * r) (an fp32
multiply, not a division: |x| may exceed 1 by an ulp), then on x's bits u (int32):
    a = u & 0x7FFFFFFF (m)  or  a = max(u, 0) as a signed int (v: negative x -> 0)
    NaN (a > 0x7F800000) -> code 0
    a = min(a, 0x3F800000)              (|x| > 1, inf -> 1.0)
    a = max(a - FP8_BIAS, 0)            (below 2^-15 / 2^-31 -> 0)
    c = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20
    code = c | (0x80 if u < 0 else 0)  (m)  or  c  (v)
which is round-to-nearest-even of |x| to 3 mantissa bits (a carry out of the mantissa moves
up one binade), saturating at 1.0; a value that rounds to the bottom binade's first grid point
2^-15 (2^-31) or below becomes 0. A block whose absmax is fp32-subnormal (below 2^-126) has
r = inf: its nonzero values take code +-1.0 and its zeros NaN -> code 0 (values of 1e-38 in
an optimizer state; nothing else is affected). The step itself is the AdamW step above,
bit for bit, with these decoded states.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "dynamic_map",
    "signed_map",
    "unsigned_map",
    "thresholds",
    "quantize_blockwise",
    "dequantize_blockwise",
    "adamw_scalars",
    "adamw8bit_step_",
    "sgd8bit_step_",
    "fp8_encode",
    "fp8_decode",
    "fp8_map",
    "quantize_fp8_blockwise",
    "dequantize_fp8_blockwise",
    "adamw8bit_fp8_step_",
    "STATE_MAPS",
    "adamw_fp32_step_",
    "sgd_fp32_step_",
    "DEFAULT_BLOCK",
]

DEFAULT_BLOCK = 256
# AdamW8bit's state maps: "dynamic" (the table maps above) or "fp8" (E4M3 / E5M3, bit arithmetic)
STATE_MAPS = ("dynamic", "fp8")
_MAPS: dict[bool, torch.Tensor] = {}


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256-entry fp32 dynamic-exponent quantization map, sorted ascending (see the module
    docstring). Built in float64, rounded once to fp32."""
    decades = 7 if signed else 8
    magnitudes = []
    for e in range(decades):
        # decade e spans [0.1, 1] * 10^(e - decades + 1) with 2^e codes at the midpoints of
        # 2^e equal steps: the top decade (just below 1) is the finest
        count = 2**e
        scale = 10.0 ** (e - decades + 1)
        for j in range(count):
            lo = 0.1 + 0.9 * j / count
            hi = 0.1 + 0.9 * (j + 1) / count
            magnitudes.append(scale * (lo + hi) / 2)
    magnitudes.sort()
    if signed:
        # 127 magnitudes + 1.0 on the positive side; the negative side mirrors all but the
        # smallest, so +-1 are exact and 0 is exact: 128 + 127 + 1 = 256
        positive = magnitudes + [1.0]
        values = [-m for m in positive[1:]] + [0.0] + positive
    else:
        # 255 magnitudes: drop the smallest for 1.0, add 0 -> 256
        values = [0.0] + magnitudes[1:] + [1.0]
    assert len(values) == 256 and len(set(values)) == 256
    out = torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)
    assert bool((out[1:] > out[:-1]).all())
    return out


def signed_map() -> torch.Tensor:
    if True not in _MAPS:
        _MAPS[True] = dynamic_map(True)
    return _MAPS[True]


def unsigned_map() -> torch.Tensor:
    if False not in _MAPS:
        _MAPS[False] = dynamic_map(False)
    return _MAPS[False]


def thresholds(qmap: torch.Tensor) -> torch.Tensor:
    """t_i = fl(fl(map[i] + map[i+1]) * 0.5) in fp32: the boundaries between codes."""
    q = qmap.to(torch.float32)
    return (q[:-1] + q[1:]) * torch.tensor(0.5, dtype=torch.float32)


def _codes(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """#{i : t_i < x} as uint8 (NaN -> 0)."""
    t = thresholds(qmap).to(x.device)
    codes = torch.searchsorted(t, x.contiguous(), right=False)  # count of t < x
    codes = torch.where(torch.isnan(x), torch.zeros_like(codes), codes)
    return codes.to(torch.uint8)


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """x flattened and zero-padded to whole blocks, as [nblocks, block_size]."""
    flat = x.reshape(-1)
    n = flat.numel()
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(nb, block_size), n


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, block_size: int = DEFAULT_BLOCK):
    """fp32 x -> (codes uint8 [n], absmax fp32 [ceil(n / block_size)])."""
    xb, n = _blocks(x.to(torch.float32), block_size)
    absmax = xb.abs().amax(dim=1)  # NaN propagates (torch.amax)
    div = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = _codes(xb / div[:, None], qmap)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block_size: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """fp32 [n]: map[code] * absmax of the code's block."""
    n = codes.numel()
    q = qmap.to(torch.float32).to(codes.device)[codes.reshape(-1).long()]
    idx = torch.arange(n, device=codes.device) // block_size
    return q * absmax[idx]


def _f32(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def adamw_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> dict:
    """The per-step scalars of the AdamW update, in Python floats (rounded to fp32 by the kernels)."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return {
        "beta1": beta1,
        "c1": 1.0 - beta1,
        "beta2": beta2,
        "c2": 1.0 - beta2,
        "decay": 1.0 - lr * weight_decay,
        "step_size": lr / bc1,
        "bc2_sqrt": math.sqrt(bc2),
        "eps": eps,
    }


def _adamw_math(p, g, m_old, v_old, s: dict):
    dev = p.device
    b1, c1, b2, c2 = (_f32(s[k], dev) for k in ("beta1", "c1", "beta2", "c2"))
    decay, step_size, bc2_sqrt, eps = (_f32(s[k], dev) for k in ("decay", "step_size", "bc2_sqrt", "eps"))
    m = b1 * m_old + c1 * g
    v = b2 * v_old + (c2 * g) * g
    p = p * decay
    denom = _sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    return p, m, v


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    # The correctly rounded fp32 square root (as sqrtps / sqrt_rn give): torch's CPU sqrt is
    # vectorized through SLEEF and may be 1 ulp off. sqrt in fp64 rounded to fp32 is exact
    # (53 >= 2 * 24 + 2 bits, so the double rounding never changes the result).
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def adamw8bit_step_(
    param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, v_map, scalars: dict, block_size: int = DEFAULT_BLOCK
) -> None:
    """One fused AdamW step on a parameter with block-wise 8-bit states, all in place.
    param: fp32/bf16/fp16 (contiguous); grad: same shape, any float dtype; m_codes/v_codes
    uint8 [n]; m_absmax/v_absmax fp32 [ceil(n / block_size)]; scalars from adamw_scalars()."""
    p = param.reshape(-1).to(torch.float32)
    g = grad.reshape(-1).to(torch.float32)
    m_old = dequantize_blockwise(m_codes, m_absmax, m_map, block_size)
    v_old = dequantize_blockwise(v_codes, v_absmax, v_map, block_size)
    p, m, v = _adamw_math(p, g, m_old, v_old, scalars)
    mc, ma = quantize_blockwise(m, m_map, block_size)
    vc, va = quantize_blockwise(v, v_map, block_size)
    m_codes.copy_(mc)
    m_absmax.copy_(ma)
    v_codes.copy_(vc)
    v_absmax.copy_(va)
    param.copy_(p.view(param.shape))  # one round-to-nearest-even for bf16/fp16


def adamw_fp32_step_(param, grad, m, v, scalars: dict) -> None:
    """The same update with fp32 states m, v (small tensors below min_8bit_size)."""
    p = param.reshape(-1).to(torch.float32)
    g = grad.reshape(-1).to(torch.float32)
    p, m_new, v_new = _adamw_math(p, g, m.reshape(-1), v.reshape(-1), scalars)
    m.copy_(m_new.view(m.shape))
    v.copy_(v_new.view(v.shape))
    param.copy_(p.view(param.shape))


def _sgd_math(p, g, buf_old, lr, momentum, dampening, weight_decay, nesterov, first):
    dev = p.device
    if weight_decay != 0:
        g = g + _f32(weight_decay, dev) * p
    mu = _f32(momentum, dev)
    buf = g if first else mu * buf_old + _f32(1.0 - dampening, dev) * g
    d = g + mu * buf if nesterov else buf
    p = p - _f32(lr, dev) * d
    return p, buf


def sgd8bit_step_(
    param,
    grad,
    codes,
    absmax,
    qmap,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first: bool,
    block_size: int = DEFAULT_BLOCK,
) -> None:
    """One fused SGD-with-momentum step with a block-wise 8-bit momentum buffer, in place."""
    p = param.reshape(-1).to(torch.float32)
    g = grad.reshape(-1).to(torch.float32)
    buf_old = dequantize_blockwise(codes, absmax, qmap, block_size)
    p, buf = _sgd_math(p, g, buf_old, lr, momentum, dampening, weight_decay, nesterov, first)
    c, a = quantize_blockwise(buf, qmap, block_size)
    codes.copy_(c)
    absmax.copy_(a)
    param.copy_(p.view(param.shape))


def sgd_fp32_step_(param, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first) -> None:
    p = param.reshape(-1).to(torch.float32)
    g = grad.reshape(-1).to(torch.float32)
    p, b = _sgd_math(p, g, buf.reshape(-1), lr, momentum, dampening, weight_decay, nesterov, first)
    buf.copy_(b.view(buf.shape))
    param.copy_(p.view(param.shape))


# --------------------------------------------------------------------------- fp8 maps

FP8_BIAS_SIGNED = 112 << 23  # E4M3: exponent field 15 is 2^0
FP8_BIAS_UNSIGNED = 96 << 23  # E5M3: exponent field 31 is 2^0
_ONE_BITS = 0x3F800000
_INF_BITS = 0x7F800000


def _fp8_bias(signed: bool) -> int:
    return FP8_BIAS_SIGNED if signed else FP8_BIAS_UNSIGNED


def fp8_encode(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 x (already divided by the block scale) -> uint8 codes, by the integer rule in the
    module docstring (round to nearest even on 3 mantissa bits, saturate at 1, NaN -> 0)."""
    u = x.to(torch.float32).contiguous().view(torch.int32)
    a = u & 0x7FFFFFFF if signed else torch.clamp_min(u, 0)
    nan = a > _INF_BITS
    a = torch.clamp_max(a, _ONE_BITS)
    a = torch.clamp_min(a - _fp8_bias(signed), 0)
    c = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20
    if signed:
        c = c | torch.where(u < 0, 0x80, 0).to(torch.int32)
    return torch.where(nan, 0, c).to(torch.uint8)


def fp8_decode(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 codes -> their fp32 values in [-1, 1] (m) or [0, 1] (v), no scale."""
    c = codes.to(torch.int32)
    mag = c & 0x7F if signed else c
    bits = torch.where(mag == 0, 0, (mag << 20) + _fp8_bias(signed)).to(torch.int32)
    value = bits.view(torch.float32)
    if signed:
        value = torch.where(c >= 0x80, -value, value)  # -(+0.0) = -0.0 for code 0x80
    return value


def fp8_map(signed: bool) -> torch.Tensor:
    """The 256 code values (index = code) of the signed (m) or unsigned (v) fp8 map: not sorted
    (sign-magnitude codes); codes the encoder never produces (above 1) included."""
    return fp8_decode(torch.arange(256, dtype=torch.int32).to(torch.uint8), signed)


def quantize_fp8_blockwise(x: torch.Tensor, signed: bool, block_size: int = DEFAULT_BLOCK):
    """fp32 x -> (codes uint8 [n], absmax fp32 [ceil(n / block_size)]) on the fp8 map."""
    xb, n = _blocks(x.to(torch.float32), block_size)
    absmax = xb.abs().amax(dim=1)  # NaN propagates (torch.amax)
    div = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    r = torch.ones_like(div) / div  # one IEEE fp32 division per block
    codes = fp8_encode(xb * r[:, None], signed)
    return codes.reshape(-1)[:n], absmax


def dequantize_fp8_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block_size: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """fp32 [n]: decode(code) * absmax of the code's block."""
    n = codes.numel()
    q = fp8_decode(codes.reshape(-1), signed)
    idx = torch.arange(n, device=codes.device) // block_size
    return q * absmax[idx]


def adamw8bit_fp8_step_(
    param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars: dict, block_size: int = DEFAULT_BLOCK
) -> None:
    """adamw8bit_step_ with the fp8 maps (m: signed E4M3, v: unsigned E5M3), all in place."""
    p = param.reshape(-1).to(torch.float32)
    g = grad.reshape(-1).to(torch.float32)
    m_old = dequantize_fp8_blockwise(m_codes, m_absmax, True, block_size)
    v_old = dequantize_fp8_blockwise(v_codes, v_absmax, False, block_size)
    p, m, v = _adamw_math(p, g, m_old, v_old, scalars)
    mc, ma = quantize_fp8_blockwise(m, True, block_size)
    vc, va = quantize_fp8_blockwise(v, False, block_size)
    m_codes.copy_(mc)
    m_absmax.copy_(ma)
    v_codes.copy_(vc)
    v_absmax.copy_(va)
    param.copy_(p.view(param.shape))
