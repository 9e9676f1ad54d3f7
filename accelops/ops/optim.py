"""8-bit optimizer steps: one fused, in-place update per parameter with block-wise 8-bit
states (uint8 codes + one fp32 absmax per block). accelops/reference/optim.py is the spec
(maps, rounding, order of the float ops); this module validates the inputs and dispatches to
torch.ops.accelops.<op> (C++ on CPU, Triton on CUDA), the Triton launcher, or the reference.
accelops.optim.AdamW8bit / SGD8bit are the optimizers built on these.

The op schemas, default (reference) kernels and fakes are registered at the bottom (_register).
"""

from __future__ import annotations

import math

import torch

from ..reference import optim as ref
from . import _validate as check
from ._backend import choose, register_triton_kernels
from ._library import define

__all__ = ["adamw8bit_step_", "sgd8bit_step_", "qmap", "new_state", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = ref.DEFAULT_BLOCK
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAPS: dict = {}


def _triton():
    from ..kernels import optim as triton_optim

    return triton_optim


def qmap(signed: bool, device) -> torch.Tensor:
    """The signed (first moment, momentum) or unsigned (second moment) map on `device`, cached."""
    key = (bool(signed), torch.device(device))
    q = _MAPS.get(key)
    if q is None:
        q = (ref.signed_map() if signed else ref.unsigned_map()).to(key[1]).contiguous()
        _MAPS[key] = q
    return q


def state_map_arg(state_map) -> str:
    if state_map not in ref.STATE_MAPS:
        raise ValueError(f"state_map must be one of {ref.STATE_MAPS}, got {state_map!r}")
    return state_map


def block_size_arg(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two (e.g. 256), got {block_size}")
    return block_size


def new_state(param: torch.Tensor, block_size: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (zero) state for `param`: (codes uint8 [n] at the map's zero, absmax fp32 [blocks] = 0).
    Any code decodes to 0 with absmax 0, so the codes' initial value does not matter."""
    n = param.numel()
    nb = -(-n // block_size)
    return (
        torch.zeros(n, dtype=torch.uint8, device=param.device),
        torch.zeros(nb, dtype=torch.float32, device=param.device),
    )


def _check_param(param, grad, block_size):
    check.tensor("param", param)
    check.tensor("grad", grad)
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"param must be float32, bfloat16 or float16, got {param.dtype}")
    if grad.layout != torch.strided:
        raise TypeError(
            f"grad must be a dense (strided) tensor, got layout {grad.layout}: 8-bit optimizers do "
            "not take sparse gradients"
        )
    if grad.dtype != param.dtype:
        raise TypeError(f"grad must have param's dtype {param.dtype}, got {grad.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from param shape {tuple(param.shape)}")
    if not param.is_contiguous() or not grad.is_contiguous():
        raise ValueError("param and grad must be contiguous (the optimizer copies non-contiguous ones)")
    check.same_device(param=param, grad=grad)
    block_size = block_size_arg(block_size)
    return block_size


def _check_state(name, codes, absmax, param, block_size):
    n = param.numel()
    nb = -(-n // block_size)
    check.tensor(f"{name}_codes", codes)
    check.tensor(f"{name}_absmax", absmax)
    check.dtype(f"{name}_codes", codes, torch.uint8)
    check.dtype(f"{name}_absmax", absmax, torch.float32)
    if codes.numel() != n or not codes.is_contiguous():
        raise ValueError(f"{name}_codes must be contiguous with {n} elements, got {codes.numel()}")
    if absmax.numel() != nb or not absmax.is_contiguous():
        raise ValueError(
            f"{name}_absmax must be contiguous with ceil({n} / {block_size}) = {nb} elements, got {absmax.numel()}"
        )
    check.same_device(param=param, **{f"{name}_codes": codes, f"{name}_absmax": absmax})


def _impl(op: str, device: torch.device):
    """('native', torch op) / ('triton', launcher) / ('reference', None)."""
    backend = choose(op, device)
    if backend == "native":
        return "native", getattr(torch.ops.accelops, op)
    if backend == "triton":
        return "triton", getattr(_triton(), op)
    return "reference", None


def adamw8bit_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    m_codes,
    m_absmax,
    v_codes,
    v_absmax,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    block_size: int = DEFAULT_BLOCK,
    state_map: str = "dynamic",
) -> None:
    """One fused AdamW step (step >= 1, bias-corrected) on `param` in place, its 8-bit states
    (m: signed map, v: unsigned map) requantized in place. state_map="dynamic": the dynamic
    table maps (op adamw8bit_step_); "fp8": m E4M3, v E5M3 with arithmetic encode / decode
    (op adamw8bit_fp8_step_); see accelops/reference/optim.py for both contracts."""
    state_map = state_map_arg(state_map)
    block_size = _check_param(param, grad, block_size)
    _check_state("m", m_codes, m_absmax, param, block_size)
    _check_state("v", v_codes, v_absmax, param, block_size)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    s = ref.adamw_scalars(float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), step)
    scalars = [s[k] for k in ("beta1", "c1", "beta2", "c2", "decay", "step_size", "bc2_sqrt", "eps")]
    if state_map == "fp8":
        # no Triton kernel of its own: forced Triton on CPU tensors runs the reference, and on
        # CUDA the op's default (reference) kernel runs
        if choose("adamw8bit_fp8_step_", param.device) != "native":
            ref.adamw8bit_fp8_step_(param, grad, m_codes, m_absmax, v_codes, v_absmax, s, block_size)
            return
        torch.ops.accelops.adamw8bit_fp8_step_(param, grad, m_codes, m_absmax, v_codes, v_absmax, *scalars, block_size)
        return
    mm, vm = qmap(True, param.device), qmap(False, param.device)
    kind, fn = _impl("adamw8bit_step_", param.device)
    if kind == "reference":
        ref.adamw8bit_step_(param, grad, m_codes, m_absmax, v_codes, v_absmax, mm, vm, s, block_size)
        return
    fn(
        param,
        grad,
        m_codes,
        m_absmax,
        v_codes,
        v_absmax,
        mm,
        vm,
        s["beta1"],
        s["c1"],
        s["beta2"],
        s["c2"],
        s["decay"],
        s["step_size"],
        s["bc2_sqrt"],
        s["eps"],
        block_size,
    )


def sgd8bit_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    codes,
    absmax,
    *,
    lr: float,
    momentum: float,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first: bool = False,
    block_size: int = DEFAULT_BLOCK,
) -> None:
    """One fused SGD-with-momentum step on `param` in place, its 8-bit momentum buffer
    (signed map) requantized in place; first=True: the buffer starts as the gradient (torch.optim.SGD)."""
    block_size = _check_param(param, grad, block_size)
    _check_state("momentum", codes, absmax, param, block_size)
    for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")
    q = qmap(True, param.device)
    kind, fn = _impl("sgd8bit_step_", param.device)
    args = (float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(first))
    if kind == "reference":
        ref.sgd8bit_step_(param, grad, codes, absmax, q, *args, block_size)
        return
    fn(param, grad, codes, absmax, q, *args, block_size)


# --------------------------------------------------------------------------- registration

# The family's ops: schema and default (reference) kernel, fake, CUDA kernels. The C++
# CPU kernels are csrc/cpu/optim.cpp, registered in csrc/ops.cpp.


def _adamw8bit_reference(
    param,
    grad,
    m_codes,
    m_absmax,
    v_codes,
    v_absmax,
    m_map,
    v_map,
    beta1,
    c1,
    beta2,
    c2,
    decay,
    step_size,
    bc2_sqrt,
    eps,
    block_size=DEFAULT_BLOCK,
):
    scalars = {
        "beta1": beta1,
        "c1": c1,
        "beta2": beta2,
        "c2": c2,
        "decay": decay,
        "step_size": step_size,
        "bc2_sqrt": bc2_sqrt,
        "eps": eps,
    }
    ref.adamw8bit_step_(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, v_map, scalars, block_size)


def _adamw8bit_fp8_reference(
    param,
    grad,
    m_codes,
    m_absmax,
    v_codes,
    v_absmax,
    beta1,
    c1,
    beta2,
    c2,
    decay,
    step_size,
    bc2_sqrt,
    eps,
    block_size=DEFAULT_BLOCK,
):
    scalars = {
        "beta1": beta1,
        "c1": c1,
        "beta2": beta2,
        "c2": c2,
        "decay": decay,
        "step_size": step_size,
        "bc2_sqrt": bc2_sqrt,
        "eps": eps,
    }
    ref.adamw8bit_fp8_step_(param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars, block_size)


def _register() -> None:
    # One fused step per parameter, states as uint8 codes + fp32 block absmax, all updated
    # in place; the per-step scalars come from accelops.reference.optim.adamw_scalars
    # (c1 = 1 - beta1, decay = 1 - lr * wd, ...).
    define(
        "adamw8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m_codes, Tensor(c!) m_absmax, "
        "Tensor(d!) v_codes, Tensor(e!) v_absmax, Tensor m_map, Tensor v_map, float beta1, float c1, "
        "float beta2, float c2, float decay, float step_size, float bc2_sqrt, float eps, int block_size=256) -> ()",
        _adamw8bit_reference,
    )
    # The same step with the fp8 state maps (m E4M3, v E5M3: no map tensors, the codes are
    # bit arithmetic); C++ on the CPU, the reference elsewhere (no Triton kernel yet).
    define(
        "adamw8bit_fp8_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m_codes, Tensor(c!) m_absmax, "
        "Tensor(d!) v_codes, Tensor(e!) v_absmax, float beta1, float c1, float beta2, float c2, float decay, "
        "float step_size, float bc2_sqrt, float eps, int block_size=256) -> ()",
        _adamw8bit_fp8_reference,
    )
    define(
        "sgd8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) codes, Tensor(c!) absmax, Tensor qmap, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool first, "
        "int block_size=256) -> ()",
        ref.sgd8bit_step_,
    )

    @torch.library.register_fake("accelops::adamw8bit_step_")
    def _(
        param,
        grad,
        m_codes,
        m_absmax,
        v_codes,
        v_absmax,
        m_map,
        v_map,
        beta1,
        c1,
        beta2,
        c2,
        decay,
        step_size,
        bc2_sqrt,
        eps,
        block_size=256,
    ):
        return None

    @torch.library.register_fake("accelops::adamw8bit_fp8_step_")
    def _(
        param,
        grad,
        m_codes,
        m_absmax,
        v_codes,
        v_absmax,
        beta1,
        c1,
        beta2,
        c2,
        decay,
        step_size,
        bc2_sqrt,
        eps,
        block_size=256,
    ):
        return None

    @torch.library.register_fake("accelops::sgd8bit_step_")
    def _(param, grad, codes, absmax, qmap, lr, momentum, dampening, weight_decay, nesterov, first, block_size=256):
        return None

    register_triton_kernels("optim", ("adamw8bit_step_", "sgd8bit_step_"))


_register()
