"""Shared test helpers: inputs with known quantization, error bounds from eager's own error,
forked multi-rank runs, and the tiny Hugging Face config."""

import os
import pickle
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp


def tiny_hf_config(config_cls, vocab_size: int, **overrides):
    """config_cls (transformers' LlamaConfig, BitNetConfig, ...) at the tiny shape the
    Hugging Face tests share: hidden 32, FFN 48, 2 layers of 4 heads over 2 key/value heads,
    64 positions, BOS 1, no EOS, PAD 0; overrides change any of it."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    return config_cls(**{**settings, **overrides})


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


def grads_after_backward(model, x):
    """-> (output, [grad of x, grads of every parameter]) after one backward of a fixed
    weighting of the output; the model's gradients are zeroed again."""
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y.detach(), grads


def compiled_matches(model, x, backend: str = "eager", tol: float | None = None):
    """torch.compile(model, fullgraph=True, backend=backend) gives the model's own output and
    gradients (grads_after_backward): bit for bit, or within rtol 1e-5 / atol `tol` when tol
    is given -> the compiled model."""
    y, grads = grads_after_backward(model, x)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y_c, grads_c = grads_after_backward(compiled, x)
    for a, b in zip([y_c, *grads_c], [y, *grads]):
        if tol is None:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=tol)
    return compiled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_forked_ranks(worker, *args, nprocs: int = 2, timeout_s: float = 120) -> None:
    """Runs worker(rank, nprocs, port, *args) in `nprocs` forked processes and waits for them,
    failing the test (and killing them) past `timeout_s`. Fork, not spawn: a spawned child
    spends 5-10 s importing torch on a 2-core machine. Workers must set their thread count
    before any op (OpenMP pools do not survive a fork); the parent holds no process group."""
    ctx = mp.start_processes(worker, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs}-rank run did not finish in {timeout_s:g} s")


def rank_results(directory, nprocs: int = 2) -> list:
    """The rank<r>.pkl dicts that forked workers wrote into `directory`, failing the test
    with the worker's traceback when a rank recorded an "error"."""
    out = []
    for r in range(nprocs):
        with open(os.path.join(directory, f"rank{r}.pkl"), "rb") as f:
            res = pickle.load(f)
        if "error" in res:
            pytest.fail(f"rank {r}:\n{res['error']}")
        out.append(res)
    return out
