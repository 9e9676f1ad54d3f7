"""Shared test helpers: inputs with known quantization, and error bounds from eager's own error."""
import torch


def integer_rows(m: int, k: int, *, lead=(), dtype=torch.float32) -> torch.Tensor:
    """Integer-valued activations in [-127, 127] whose every row holds a +-127, so the
    per-token scale is exactly 1 and x_q == x: the matmul output is then the raw int32 sum."""
    x = torch.randint(-127, 128, (*lead, m, k)).float()
    if k:
        x[..., 0] = torch.where(torch.rand(x[..., 0].shape) < 0.5, -127.0, 127.0)
    return x.to(dtype)


def assert_close_to_reference(y, y_ref, *, rel_ulps: int = 4):
    """Backends run the same fp32 epilogue as the reference; they may differ only by a few
    rounding steps of the output dtype."""
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    nan = torch.isnan(y_ref)
    assert torch.equal(torch.isnan(y), nan)
    eps = torch.finfo(y.dtype).eps
    a, b = y.float()[~nan], y_ref.float()[~nan]
    tol = rel_ulps * eps * b.abs() + 1e-30
    assert bool(((a - b).abs() <= tol).all()), f"max diff {(a - b).abs().max().item()} (dtype {y.dtype})"
