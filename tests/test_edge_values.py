"""Numerical edge values that used to give silently wrong answers (issue 23, items 7, 8):
int8 GEMMs past the int32 accumulation limit, and fake-quant scales with no fp32 inverse."""

from __future__ import annotations

import pytest
import torch

from accelops import ops
from accelops.reference import int8 as R


def test_int8_k_limit_is_the_largest_exact_k():
    assert R.MAX_K == 131071
    assert R.MAX_K * 128 * 128 < 2**31 <= (R.MAX_K + 1) * 128 * 128


@pytest.mark.parametrize("k", [131072, 140000])
def test_int8_linear_refuses_k_beyond_exact_accumulation(backend, k):
    """Before: K=140000 of x=1, w=127 returned -16,038,640 (C++) / -16,909,320 (reference)
    instead of 17,780,000: the int32 sums wrapped."""
    x = torch.ones(1, k)
    w_q = torch.full((2, k), 127, dtype=torch.int8)
    w_scale = torch.ones(2)
    with pytest.raises(ValueError, match=rf"K={k} exceeds the int8 GEMM's exact-accumulation limit K <= 131071"):
        ops.int8_linear(x, w_q, w_scale)
    x_q = torch.ones(1, k, dtype=torch.int8)
    with pytest.raises(ValueError, match=rf"K={k} exceeds"):
        ops.int8_matmul(x_q, torch.ones(1, 1), w_q, w_scale)
    with pytest.raises(ValueError, match=rf"K={k} exceeds"):
        R.int8_matmul(x_q, torch.ones(1, 1), w_q, w_scale)


def test_int8_linear_at_the_limit_is_exact(backend):
    k = R.MAX_K
    x_q = torch.full((1, k), -128, dtype=torch.int8)
    w_q = torch.full((1, k), -128, dtype=torch.int8)
    y = ops.int8_matmul(x_q, torch.ones(1, 1), w_q, torch.ones(1))
    assert y.item() == float(k * 128 * 128)  # 2^14 * (2^17 - 1): exact in int32 and in fp32


@pytest.mark.parametrize("scale", [1e-39, 1e-45, 2.0e-39])
def test_fake_quantize_refuses_a_scale_without_a_finite_reciprocal(backend, scale):
    """Before: a subnormal scale passed validation and 0.0 / -0.0 came out NaN on every backend."""
    x = torch.tensor([0.0, -0.0, 1.0])
    with pytest.raises(ValueError, match=r"scale .* is too small: its fp32 reciprocal is infinite"):
        ops.fake_quantize(x, scale, 0, -128, 127)
    with pytest.raises(ValueError, match=r"is too small"):
        ops.fake_quantize(
            x.reshape(3, 1), torch.tensor([1.0, scale, 1.0]), torch.zeros(3, dtype=torch.int32), -128, 127, axis=0
        )
    with pytest.raises(ValueError, match=r"is too small"):
        ops.fake_quantize_learnable(x, torch.tensor([scale]), torch.zeros(1), -128, 127)


def test_fake_quantize_smallest_usable_scale_is_finite(backend):
    s = 1.0 / torch.finfo(torch.float32).max * 1.01
    y = ops.fake_quantize(torch.tensor([0.0, -0.0]), s, 0, -128, 127)
    assert torch.isfinite(y).all() and (y == 0).all()
