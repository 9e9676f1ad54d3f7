"""Fused FFN: y = act(x Wg^T + bg, x Wu^T + bu) Wd^T + bd for swiglu / geglu / gelu, with
a memory-lean backward. See accelops/reference/ffn.py for the spec.

What is saved for backward: x (the caller's tensor, no copy), the weights, and the two
pre-activation projections g = x Wg^T + bg and u = x Wu^T + bu ([..., H] each, in x's
dtype). The activation act(g), the product h and every gradient of the hidden width are
recomputed from g and u, never saved: eager PyTorch keeps four [..., H] tensors alive
(g, act(g), u, h) and then allocates three more in backward. In inference (no input
requires grad, or grad mode off) nothing is saved.

The registered ops (torch.ops.accelops):
    fused_ffn(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, save, act_quant) -> (y, g, u)
    fused_ffn_backward(dy, x, g, u, w_gate, w_up, w_down, activation, has_b_gate, has_b_up,
                       has_b_down, act_quant, need_dx, need_dw) -> (dx, dWg, dWu, dWd, dbg, dbu, dbd)
    ffn_activation(g, u, activation) -> h
"""

from __future__ import annotations

import os

import torch

from ..reference import ffn as ref
from . import _validate as check
from ._backend import choose, register_triton_kernels
from ._library import define

__all__ = ["fused_ffn", "ffn_activation", "ACTIVATIONS"]

ACTIVATIONS = ref.ACTIVATIONS


def _triton():
    from ..kernels import ffn as triton_ffn

    return triton_ffn


# --------------------------------------------------------------------------- validation


def _check_activation(activation) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _check_same_dtype(name: str, t: torch.Tensor, x: torch.Tensor, x_name: str = "x") -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have {x_name}'s dtype {x.dtype}, got {t.dtype}")


def _check_weight(name: str, w, shape: tuple, layout: str, x: torch.Tensor) -> None:
    check.tensor(name, w)
    check.float_tensor(name, w)
    if w.dim() != 2 or tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {layout}, got {tuple(w.shape)}")
    _check_same_dtype(name, w, x)


def _split_bias(bias, gated: bool, h: int, d: int, x: torch.Tensor):
    if bias is None:
        return None, None, None
    if isinstance(bias, torch.Tensor) or not isinstance(bias, (list, tuple)) or len(bias) != 3:
        got = f"a tensor of shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else repr(bias)[:80]
        raise TypeError(
            f"bias must be None or a sequence of three (b_gate, b_up, b_down), each None or a tensor, got {got}"
        )
    out = []
    for name, b, n in zip(("b_gate", "b_up", "b_down"), bias, (h, h, d)):
        if b is None:
            out.append(None)
            continue
        check.tensor(f"bias {name}", b)
        check.float_tensor(f"bias {name}", b)
        if b.dim() != 1 or b.shape[0] != n:
            raise ValueError(f"bias {name} must have shape ({n},), got {tuple(b.shape)}")
        _check_same_dtype(f"bias {name}", b, x)
        out.append(b)
    if not gated and out[0] is not None:
        raise ValueError("bias b_gate must be None for activation 'gelu', which has no gate projection")
    return tuple(out)


def _validate(x, w_gate, w_up, w_down, bias, activation):
    activation = _check_activation(activation)
    gated = ref.gated(activation)
    check.float_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., D], got a 0-D tensor")
    d = x.shape[-1]
    check.tensor("w_up", w_up)
    if w_up.dim() != 2 or w_up.shape[1] != d:
        raise ValueError(
            f"w_up must have shape (H, D={d}) [hidden, dim] to match x's last dim, got {tuple(w_up.shape)}"
        )
    h = w_up.shape[0]
    _check_weight("w_up", w_up, (h, d), "[hidden, dim]", x)
    if gated:
        if w_gate is None:
            raise ValueError(f"w_gate is required for the gated activation {activation!r}")
        _check_weight("w_gate", w_gate, (h, d), "[hidden, dim], like w_up", x)
    elif w_gate is not None:
        raise ValueError(
            "w_gate must be None for activation 'gelu' (not gated); use 'swiglu' or 'geglu' for a gated FFN"
        )
    _check_weight("w_down", w_down, (d, h), "[dim, hidden]", x)
    b_gate, b_up, b_down = _split_bias(bias, gated, h, d, x)
    device = check.same_device(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, b_gate=b_gate, b_up=b_up, b_down=b_down)
    return activation, (b_gate, b_up, b_down), device


# --------------------------------------------------------------------------- public API


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _TritonFusedFFN(torch.autograd.Function):
    """The Triton launchers with the same autograd as the registered op, for the direct
    'triton' backend (CPU tensors under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, act_quant, save):
        y, g, u = _triton().fused_ffn(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, save, act_quant)
        ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)
        ctx.meta = (activation, act_quant, save, tuple(None if b is None else b.dtype for b in (b_gate, b_up, b_down)))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        activation, act_quant, save, bias_dtypes = ctx.meta
        grads = _backward(
            _triton().fused_ffn_backward,
            ctx.needs_input_grad,
            dy,
            x,
            g,
            u,
            w_gate,
            w_up,
            w_down,
            activation,
            act_quant,
            save,
            bias_dtypes,
        )
        return (*grads, None, None, None)


def fused_ffn(x, w_gate, w_up, w_down, bias=None, activation: str = "swiglu", *, act_quant: bool = False):
    """y = act(x Wg^T + bg, x Wu^T + bu) Wd^T + bd; x [..., D] -> y [..., D] in x's dtype.

    w_gate / w_up [H, D], w_down [D, H] (nn.Linear layout); w_gate is None for 'gelu'.
    bias: None or (b_gate, b_up, b_down), each None or 1-D. activation: 'swiglu'
    (silu(g) * u), 'geglu' (gelu(g) * u, exact erf) or 'gelu' (gelu(u), not gated).
    act_quant: BitNet per-token int8 fake-quant (straight-through) of x and of h before
    their GEMMs, as three BitLinear layers apply to their inputs.
    Differentiable in x, the weights and the biases; backward recomputes the activation
    from the saved pre-activations (see the module docstring).
    """
    activation, (b_gate, b_up, b_down), device = _validate(x, w_gate, w_up, w_down, bias, activation)
    if not isinstance(act_quant, bool):
        raise TypeError(f"act_quant must be a bool, got {act_quant!r}")
    backend = choose("fused_ffn", device)
    if backend == "reference":
        return ref.fused_ffn(x, w_gate, w_up, w_down, (b_gate, b_up, b_down), activation, act_quant)
    save = _needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    if backend == "triton":
        return _TritonFusedFFN.apply(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, act_quant, save)
    y, _, _ = torch.ops.accelops.fused_ffn(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, save, act_quant)
    return y


def ffn_activation(g, u, activation: str = "swiglu"):
    """h = act(g) * u ('swiglu', 'geglu') or gelu(u) ('gelu', g None), in one pass; u's dtype.

    The FFN's elementwise middle on its own, for callers that do the projections
    themselves (accelops.nn.FusedFFN with quant='int8'). Differentiable in g and u."""
    activation = _check_activation(activation)
    check.float_tensor("u", u)
    if ref.gated(activation):
        if g is None:
            raise ValueError(f"g is required for the gated activation {activation!r}")
        check.float_tensor("g", g)
        if g.shape != u.shape:
            raise ValueError(f"g must have u's shape {tuple(u.shape)}, got {tuple(g.shape)}")
        _check_same_dtype("g", g, u, "u")
    elif g is not None:
        raise ValueError("g must be None for activation 'gelu' (not gated)")
    device = check.same_device(g=g, u=u)
    backend = choose("ffn_activation", device)
    if backend == "reference":
        return ref.ffn_activation(g, u, activation)
    if backend == "triton":
        return _TritonActivation.apply(g, u, activation)
    return torch.ops.accelops.ffn_activation(g, u, activation)


class _TritonActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, activation):
        ctx.save_for_backward(g, u)
        ctx.activation = activation
        return _triton().ffn_activation(g, u, activation)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dg, du = _activation_grads(g, u, dh, ctx.activation)
        return dg, du, None


def _activation_grads(g, u, dh, activation):
    # fp32 math, like the kernels' forward; results in the inputs' dtypes.
    dg, du = ref.ffn_activation_backward(None if g is None else g.float(), u.float(), dh.float(), activation)
    return (None if dg is None else dg.to(g.dtype)), du.to(u.dtype)


# --------------------------------------------------------------------------- autograd

# ACCELOPS_FFN_CONSUME_SAVED=0 turns the consuming backward off (for A/B comparisons).
_CONSUME_SAVED = os.environ.get("ACCELOPS_FFN_CONSUME_SAVED", "1") != "0"
# Storage references to a saved g/u seen inside backward when only autograd holds it
# (measured on torch 2.13: autograd's saved copy, the tensor unpacked for this backward
# and the custom op's autograd wrapper). A caller that kept the op's g or u output (or a
# view of it), or a saved-tensor hook that holds its own copy, raises the count.
_PRIVATE_STORAGE_USES = 3


def _may_consume(x, g, u, gated: bool) -> bool:
    """Whether backward may overwrite the saved g and u and return their memory early
    (fused_ffn_backward_consume_): only when they die with this backward anyway, i.e. on
    float32 CPU tensors, outside torch.compile, with the graph not retained
    (retain_graph / create_graph would run this backward again) and no other holder."""
    if not _CONSUME_SAVED or torch.compiler.is_compiling():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or keep_graph():
        return False
    for t in (g, u) if gated else (u,):
        if not t.is_contiguous() or t.storage_offset() != 0:
            return False
        if torch._C._storage_Use_Count(t.untyped_storage()._cdata) > _PRIVATE_STORAGE_USES:
            return False
    return True


def _backward(kernel, needs, dy, x, g, u, w_gate, w_up, w_down, activation, act_quant, save, bias_dtypes):
    """Shared by the registered op's autograd and the direct Triton path: one call of the
    fused backward kernel, then the grads in the order (x, Wg, Wu, Wd, bg, bu, bd)."""
    if not save:
        raise RuntimeError(
            "accelops.fused_ffn: backward through a forward that saved nothing: the op was called with "
            "save=False (no input required grad when it ran); call accelops.ops.fused_ffn, which decides this"
        )
    need_dx = bool(needs[0])
    need_dw = any(bool(n) for n in needs[1:7])
    has_b = [dt is not None for dt in bias_dtypes]
    dx, dwg, dwu, dwd, dbg, dbu, dbd = kernel(
        dy.contiguous(),
        x,
        g,
        u,
        w_gate,
        w_up,
        w_down,
        activation,
        has_b[0],
        has_b[1],
        has_b[2],
        act_quant,
        need_dx,
        need_dw,
    )
    out = [dx if need_dx else None]
    for i, grad in enumerate((dwg, dwu, dwd), start=1):
        out.append(grad if needs[i] else None)
    for i, (grad, dt) in enumerate(zip((dbg, dbu, dbd), bias_dtypes), start=4):
        out.append(grad.to(dt) if needs[i] and dt is not None else None)
    return out


# The family's ops: schema and default (reference) kernel, fake, autograd, CUDA kernels.
# The C++ CPU kernels are csrc/cpu/ffn.cpp, registered in csrc/ops.cpp.


def _fused_ffn_reference(
    x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, activation="swiglu", save=False, act_quant=False
):
    y, g, u = ref.fused_ffn_with_projections(x, w_gate, w_up, w_down, (b_gate, b_up, b_down), activation, act_quant)
    # Two separate empty tensors: outputs of an op must not alias one another.
    return y, g if save and g is not None else x.new_empty((0,)), u if save else x.new_empty((0,))


def _ffn_activation_reference(g, u, activation="swiglu"):
    return ref.ffn_activation(g, u, activation)


def _register() -> None:
    # (y, g, u): g and u are the pre-activation projections, saved for backward when
    # save=True (empty [0] tensors otherwise, and g is empty for 'gelu').
    define(
        "fused_ffn(Tensor x, Tensor? w_gate, Tensor w_up, Tensor w_down, Tensor? b_gate=None, "
        'Tensor? b_up=None, Tensor? b_down=None, str activation="swiglu", bool save=False, '
        "bool act_quant=False) -> (Tensor, Tensor, Tensor)",
        _fused_ffn_reference,
    )
    # -> (dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down); absent ones are empty [0].
    define(
        "fused_ffn_backward(Tensor dy, Tensor x, Tensor g, Tensor u, Tensor? w_gate, Tensor w_up, "
        "Tensor w_down, str activation, bool has_b_gate, bool has_b_up, bool has_b_down, bool act_quant, "
        "bool need_dx, bool need_dw) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        ref.fused_ffn_backward,
    )
    # The same gradients from float32 CPU tensors when g and u die with this call: the C++
    # kernel writes dg/du over them and returns their pages to the OS block by block (lower
    # peak memory). The reference may leave them as they are: the schema allows, not asks.
    define(
        "fused_ffn_backward_consume_(Tensor dy, Tensor x, Tensor(a!) g, Tensor(b!) u, Tensor? w_gate, "
        "Tensor w_up, Tensor w_down, str activation, bool has_b_gate, bool has_b_up, bool has_b_down, "
        "bool act_quant, bool need_dx, bool need_dw) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        ref.fused_ffn_backward,
    )
    define('ffn_activation(Tensor? g, Tensor u, str activation="swiglu") -> Tensor', _ffn_activation_reference)

    @torch.library.register_fake("accelops::fused_ffn")
    def _(
        x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, activation="swiglu", save=False, act_quant=False
    ):
        hidden = (*x.shape[:-1], w_up.shape[0])
        g = x.new_empty(hidden if save and w_gate is not None else (0,))
        u = x.new_empty(hidden if save else (0,))
        return torch.empty_like(x, memory_format=torch.contiguous_format), g, u

    @torch.library.register_fake("accelops::fused_ffn_backward")
    def _(dy, x, g, u, w_gate, w_up, w_down, activation, has_b_gate, has_b_up, has_b_down, act_quant, need_dx, need_dw):
        h, d = w_up.shape
        gated = w_gate is not None
        none = lambda dt=x.dtype: x.new_empty((0,), dtype=dt)  # noqa: E731
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else none(),
            x.new_empty((h, d)) if need_dw and gated else none(),
            x.new_empty((h, d)) if need_dw else none(),
            x.new_empty((d, h)) if need_dw else none(),
            x.new_empty((h,), dtype=torch.float32) if need_dw and has_b_gate else none(torch.float32),
            x.new_empty((h,), dtype=torch.float32) if need_dw and has_b_up else none(torch.float32),
            x.new_empty((d,), dtype=torch.float32) if need_dw and has_b_down else none(torch.float32),
        )

    @torch.library.register_fake("accelops::fused_ffn_backward_consume_")
    def _(dy, x, g, u, w_gate, w_up, w_down, activation, has_b_gate, has_b_up, has_b_down, act_quant, need_dx, need_dw):
        h, d = w_up.shape
        gated = w_gate is not None
        none = lambda: x.new_empty((0,))  # noqa: E731
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else none(),
            x.new_empty((h, d)) if need_dw and gated else none(),
            x.new_empty((h, d)) if need_dw else none(),
            x.new_empty((d, h)) if need_dw else none(),
            x.new_empty((h,)) if need_dw and has_b_gate else none(),
            x.new_empty((h,)) if need_dw and has_b_up else none(),
            x.new_empty((d,)) if need_dw and has_b_down else none(),
        )

    @torch.library.register_fake("accelops::ffn_activation")
    def _(g, u, activation="swiglu"):
        return torch.empty_like(u, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, save, act_quant = inputs
        _, g, u = output
        # g and u are outputs only to be saved: without this, autograd would materialize
        # their (unused) incoming gradients as two [..., H] zero tensors in backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)
        ctx.meta = (activation, act_quant, save, tuple(None if b is None else b.dtype for b in (b_gate, b_up, b_down)))

    def backward(ctx, dy, _dg, _du):
        x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        activation, act_quant, save, bias_dtypes = ctx.meta
        kernel = torch.ops.accelops.fused_ffn_backward
        if save and _may_consume(x, g, u, w_gate is not None):
            kernel = torch.ops.accelops.fused_ffn_backward_consume_
        grads = _backward(
            kernel, ctx.needs_input_grad, dy, x, g, u, w_gate, w_up, w_down, activation, act_quant, save, bias_dtypes
        )
        return (*grads, None, None, None)

    torch.library.register_autograd("accelops::fused_ffn", backward, setup_context=setup_context)

    def setup_activation(ctx, inputs, output):
        g, u, activation = inputs
        ctx.save_for_backward(g, u)
        ctx.activation = activation

    def backward_activation(ctx, dh):
        g, u = ctx.saved_tensors
        dg, du = _activation_grads(g, u, dh, ctx.activation)
        return dg, du, None

    torch.library.register_autograd("accelops::ffn_activation", backward_activation, setup_context=setup_activation)

    register_triton_kernels("ffn", ("fused_ffn", "fused_ffn_backward", "ffn_activation"))


_register()
