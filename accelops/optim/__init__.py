"""8-bit optimizers: AdamW and SGD with momentum whose states are stored as 8-bit codes of
a dynamic (non-linear) quantization map with one fp32 absmax scale per block of 256 values
(Dettmers et al., "8-bit Optimizers via Block-wise Quantization"): about a quarter of the
state memory of torch.optim.AdamW (2 bytes + 8/256 per parameter instead of 8).

    opt = accelops.optim.AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)

Each parameter's update is one fused kernel (accelops.ops.adamw8bit_step_ /
sgd8bit_step_: dequantize, step, requantize, update the parameter in place); the numerical
contract (maps, rounding, order of the float ops, NaN) is accelops/reference/optim.py.

- Tensors with fewer than `min_8bit_size` elements (default 4096: biases, norms) keep fp32
  states and the same fp32 update: 8-bit codes would save little there and cost accuracy;
  min_8bit_size=0 quantizes every state.
- Params may be fp32, bf16 or fp16 (math in fp32, one rounding on the store).
- DTensor params (FSDP2 `fully_shard`) are updated through their local shard, with states
  sized to that shard (its blocks start at the shard's first element); the optimizer works as
  `optimizer_class` of torch.distributed.optim.ZeroRedundancyOptimizer.
- state_dict() holds the raw codes (uint8) and scales (fp32); load_state_dict() restores
  them as they are (torch's default would cast every state to the parameter's dtype), so a
  fresh optimizer continues bit-identically.
- AdamW8bit(state_map="fp8") keeps m as E4M3 and v as E5M3 codes (tiny floats relative to
  the block absmax, encoded and decoded with integer arithmetic: a faster step, a different
  numerical contract); the default "dynamic" is the table maps above. The map is recorded in
  each param group and state, and a checkpoint refuses to load into an optimizer built with
  the other map.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..ops import optim as _ops
from ..reference import optim as _ref

__all__ = ["AdamW8bit", "SGD8bit", "DEFAULT_BLOCK", "MIN_8BIT_SIZE"]

DEFAULT_BLOCK = _ref.DEFAULT_BLOCK
MIN_8BIT_SIZE = 4096

try:  # torch.distributed may be absent from a build
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # pragma: no cover
    _DTensor = None


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage this rank updates: a DTensor's local shard, else t."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.to_local()
    return t


def _number(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _closure_loss(closure):
    """The loss of `closure` (re-evaluating the model with gradients on), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _group_lr(group) -> float:
    """A param group's lr, checked at each step (a scheduler may have changed it)."""
    lr = _number("lr", group["lr"])
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    return lr


class _Optimizer8bit(torch.optim.Optimizer):
    """Shared machinery: argument checks, local shards, state layout, state_dict round trip."""

    _RAW_KEYS: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, block_size: int, min_8bit_size: int, maximize: bool):
        if maximize:
            raise ValueError(f"{type(self).__name__} does not support maximize=True; negate the loss instead")
        _ops.block_size_arg(block_size)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        defaults = dict(defaults, block_size=block_size, min_8bit_size=min_8bit_size, maximize=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_floating_point() or p.dtype not in _ops.PARAM_DTYPES:
                    raise TypeError(
                        f"{type(self).__name__} takes float32, bfloat16 or float16 parameters, got {p.dtype}"
                    )

    def _grad(self, p: torch.Tensor):
        grad = p.grad
        if grad is None:
            return None
        if grad.is_sparse or grad.layout != torch.strided:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (layout {grad.layout})")
        return grad

    @staticmethod
    def _work(p_local: torch.Tensor, g_local: torch.Tensor):
        """Contiguous views (or copies, written back after the step) of param and grad."""
        pw = p_local if p_local.is_contiguous() else p_local.contiguous()
        gw = g_local.to(p_local.dtype) if g_local.dtype != p_local.dtype else g_local
        return pw, gw.contiguous()

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state to the parameter's dtype on load (absmax to bf16 for
        # bf16 params, codes to float): put back the saved tensors as they were.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            dev = _local(p).device
            for key, value in saved[i].items():
                if key in self._RAW_KEYS and isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(device=dev).clone()
                elif isinstance(value, str):  # state_map: torch's cast turns a str into a generator
                    self.state[p][key] = value

    def state_bytes(self) -> int:
        """Bytes of every optimizer state tensor held by this rank (codes, scales, fp32 states)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total


class AdamW8bit(_Optimizer8bit):
    """AdamW (decoupled weight decay, bias correction) with block-wise 8-bit moments:
    m on the signed dynamic map, v on the unsigned one, one fp32 absmax per `block_size`
    elements. Same arguments as torch.optim.AdamW (maximize is not supported), plus
    block_size (power of two, default 256), min_8bit_size (default 4096) and state_map
    ("dynamic", default, or "fp8": m E4M3 / v E5M3 with arithmetic encode and decode; see
    accelops/reference/optim.py)."""

    _RAW_KEYS = ("m_codes", "m_absmax", "v_codes", "v_absmax", "exp_avg", "exp_avg_sq")

    def load_state_dict(self, state_dict: dict) -> None:
        # torch would overwrite each group's state_map with the saved one and decode the codes
        # with it silently: a checkpoint of one map is refused by an optimizer of the other
        for i, (mine, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            want, got = mine["state_map"], saved.get("state_map", "dynamic")  # older checkpoints: dynamic
            if want != got:
                raise ValueError(
                    f"AdamW8bit.load_state_dict: param group {i} of the checkpoint was saved with "
                    f"state_map={got!r}, this optimizer has state_map={want!r}; build it with "
                    f"AdamW8bit(..., state_map={got!r}) to load this checkpoint"
                )
        super().load_state_dict(state_dict)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = DEFAULT_BLOCK,
        min_8bit_size: int = MIN_8BIT_SIZE,
        maximize: bool = False,
        state_map: str = "dynamic",
    ):
        _ops.state_map_arg(state_map)
        lr = _number("lr", lr)
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            b = _number(f"betas[{i}]", b)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
        eps = _number("eps", eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        weight_decay = _number("weight_decay", weight_decay)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(
            lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay, state_map=state_map
        )
        super().__init__(params, defaults, block_size, min_8bit_size, maximize)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr = _group_lr(group)
            beta1, beta2 = group["betas"]
            bs = group["block_size"]
            state_map = _ops.state_map_arg(group.get("state_map", "dynamic"))  # older checkpoints: dynamic
            for p in group["params"]:
                grad = self._grad(p)
                if grad is None:
                    continue
                p_local, g_local = _local(p), _local(grad)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if p_local.numel() >= group["min_8bit_size"]:
                        state["state_map"] = state_map
                        state["m_codes"], state["m_absmax"] = _ops.new_state(p_local, bs)
                        state["v_codes"], state["v_absmax"] = _ops.new_state(p_local, bs)
                    else:
                        state["exp_avg"] = torch.zeros(p_local.shape, dtype=torch.float32, device=p_local.device)
                        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                state["step"] += 1
                if p_local.numel() == 0:
                    continue
                pw, gw = self._work(p_local, g_local)
                if "m_codes" in state:
                    if state.get("state_map", "dynamic") != state_map:
                        raise ValueError(
                            f"AdamW8bit: a parameter's states are on state_map={state.get('state_map', 'dynamic')!r} "
                            f"but its param group now says {state_map!r}; the map cannot change during training"
                        )
                    _ops.adamw8bit_step_(
                        pw,
                        gw,
                        state["m_codes"],
                        state["m_absmax"],
                        state["v_codes"],
                        state["v_absmax"],
                        lr=lr,
                        beta1=beta1,
                        beta2=beta2,
                        eps=group["eps"],
                        weight_decay=group["weight_decay"],
                        step=state["step"],
                        block_size=bs,
                        state_map=state_map,
                    )
                else:
                    s = _ref.adamw_scalars(lr, beta1, beta2, group["eps"], group["weight_decay"], state["step"])
                    _ref.adamw_fp32_step_(pw, gw, state["exp_avg"], state["exp_avg_sq"], s)
                if pw is not p_local:
                    p_local.copy_(pw)
        return loss


class SGD8bit(_Optimizer8bit):
    """SGD with momentum (dampening, Nesterov, L2 weight decay, torch.optim.SGD semantics:
    the buffer starts as the first gradient) with a block-wise 8-bit momentum buffer on the
    signed dynamic map. momentum=0 keeps no state (plain SGD)."""

    _RAW_KEYS = ("momentum_codes", "momentum_absmax", "momentum_buffer")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        block_size: int = DEFAULT_BLOCK,
        min_8bit_size: int = MIN_8BIT_SIZE,
        maximize: bool = False,
    ):
        lr = _number("lr", lr)
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        momentum = _number("momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        dampening = _number("dampening", dampening)
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {dampening}")
        weight_decay = _number("weight_decay", weight_decay)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=bool(nesterov)
        )
        super().__init__(params, defaults, block_size, min_8bit_size, maximize)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr = _group_lr(group)
            mu, damp, wd, nesterov = group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
            bs = group["block_size"]
            for p in group["params"]:
                grad = self._grad(p)
                if grad is None:
                    continue
                p_local, g_local = _local(p), _local(grad)
                state = self.state[p]
                first = not state
                if first:
                    state["step"] = 0
                    if mu != 0 and p_local.numel() >= group["min_8bit_size"]:
                        state["momentum_codes"], state["momentum_absmax"] = _ops.new_state(p_local, bs)
                    elif mu != 0:
                        state["momentum_buffer"] = torch.zeros(
                            p_local.shape, dtype=torch.float32, device=p_local.device
                        )
                state["step"] += 1
                if p_local.numel() == 0:
                    continue
                pw, gw = self._work(p_local, g_local)
                if "momentum_codes" in state:
                    _ops.sgd8bit_step_(
                        pw,
                        gw,
                        state["momentum_codes"],
                        state["momentum_absmax"],
                        lr=lr,
                        momentum=mu,
                        dampening=damp,
                        weight_decay=wd,
                        nesterov=nesterov,
                        first=first,
                        block_size=bs,
                    )
                elif mu != 0:
                    _ref.sgd_fp32_step_(pw, gw, state["momentum_buffer"], lr, mu, damp, wd, nesterov, first)
                else:  # plain SGD: the buffer would just be the gradient
                    _ref.sgd_fp32_step_(
                        pw,
                        gw,
                        torch.empty(pw.shape, dtype=torch.float32, device=pw.device),
                        lr,
                        0.0,
                        0.0,
                        wd,
                        False,
                        True,
                    )
                if pw is not p_local:
                    p_local.copy_(pw)
        return loss
