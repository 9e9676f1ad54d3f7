"""Observers and the fused observe + fake-quant step for quantization-aware training.

`MinMaxObserver` and `MovingAverageMinMaxObserver` record running (or moving-average)
min/max statistics of what passes through them, per tensor or per channel, and turn them
into a scale and zero point with torch.ao.quantization's formulas: for the same settings
and inputs, `calculate_qparams()` returns the values of torch.ao's MinMaxObserver /
PerChannelMinMaxObserver / MovingAverageMinMaxObserver / MovingAveragePerChannelMinMaxObserver
(checked with torch.equal in tests/test_qat.py). One class covers both granularities:
`qscheme` picks per tensor or per channel, as torch.ao's qscheme argument does.

Unlike torch.ao, nothing here reads a tensor value on the host: the first-call
initialisation of the moving average and the "not observed yet" defaults are `torch.where`s
on the device, and the per-tensor scale stays a [1] tensor (torch.ao turns it into one
with float(), a synchronisation). So an observer step never waits for a GPU and traces
under torch.compile(fullgraph=True). torch.ao's assertion that min <= max (possible only
with a hand-edited state) is the one check dropped for that reason.

`FakeQuantize` is the QAT step: observe, compute (scale, zero_point) as device tensors,
and fake-quantize with accelops.ops.fake_quantize reading those tensors, in one call with
no host synchronisation. Its output equals torch.ao.quantization.FakeQuantize's for the
same observer settings and input sequence.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import ops

__all__ = ["MinMaxObserver", "MovingAverageMinMaxObserver", "FakeQuantize"]

_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
# dtype -> (full range, reduce_range range), as torch.ao.quantization.utils.calculate_qmin_qmax
_RANGES = {
    torch.qint8: ((-128, 127), (-64, 63)),
    torch.int8: ((-128, 127), (-64, 63)),
    torch.quint8: ((0, 255), (0, 127)),
    torch.uint8: ((0, 255), (0, 127)),
}
_UNSIGNED = (torch.quint8, torch.uint8)


def _keep_fp32(module: nn.Module, names, fn, recurse: bool, apply) -> nn.Module:
    """module._apply(fn) that moves the fp32 statistics / qparams named but keeps them fp32:
    model.half() or .to(torch.bfloat16) would otherwise round them (and eps to a subnormal)."""
    saved = {name: getattr(module, name) for name in names}
    apply(fn, recurse)
    for name, before in saved.items():
        now = getattr(module, name)
        if now.dtype != before.dtype:
            setattr(module, name, before.to(now.device))
    return module


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _quant_range(dtype, reduce_range, quant_min, quant_max) -> tuple[int, int, bool]:
    """-> (quant_min, quant_max, customized), torch.ao's calculate_qmin_qmax with checks
    that name the argument (torch.ao asserts)."""
    if (quant_min is None) != (quant_max is None):
        raise ValueError(
            f"quant_min and quant_max must be given together, got quant_min={quant_min!r}, quant_max={quant_max!r}"
        )
    full, reduced = _RANGES[dtype]
    if quant_min is None:
        return (*(reduced if reduce_range else full), False)
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
        if not _is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not quant_min <= 0 <= quant_max:
        raise ValueError(f"the range [quant_min, quant_max] must include 0, got [{quant_min}, {quant_max}]")
    if quant_min >= quant_max:
        raise ValueError(f"quant_min ({quant_min}) must be < quant_max ({quant_max})")
    if quant_min < full[0] or quant_max > full[1]:
        raise ValueError(
            f"[quant_min, quant_max] = [{quant_min}, {quant_max}] must lie within {dtype}'s range "
            f"[{full[0]}, {full[1]}]"
        )
    if reduce_range:  # torch.ao halves a customized range too
        if quant_min // 2 >= quant_max // 2:
            raise ValueError(
                f"reduce_range=True halves [{quant_min}, {quant_max}] to [{quant_min // 2}, "
                f"{quant_max // 2}], which holds one value: its scale would divide by zero"
            )
        return quant_min // 2, quant_max // 2, True
    return int(quant_min), int(quant_max), True


class MinMaxObserver(nn.Module):
    """Running min/max observer, per tensor or per channel (along `ch_axis`).

    Settings mirror torch.ao.quantization's: dtype (torch.quint8, torch.qint8, torch.uint8,
    torch.int8) or a customized quant_min/quant_max within it, qscheme (per_tensor_affine,
    per_tensor_symmetric, per_channel_affine, per_channel_symmetric), reduce_range, eps.
    Per channel, the statistics are sized by the first input unless `num_channels` sizes
    them up front.

    forward(x) updates min_val/max_val (buffers, so they are in the state_dict under
    torch.ao's names) and returns x unchanged. calculate_qparams() -> (scale fp32 [C],
    zero_point [C]), C = 1 per tensor; zero_point is int32 for affine schemes and int64 for
    symmetric ones, as torch.ao's. Before any observation it is (1.0, 0), as torch.ao's.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    eps: torch.Tensor

    def __init__(
        self,
        *,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        ch_axis: int = 0,
        eps: float = torch.finfo(torch.float32).eps,
        num_channels: int | None = None,
        device=None,
    ):
        super().__init__()
        if dtype not in _RANGES:
            raise TypeError(f"dtype must be one of torch.quint8, torch.qint8, torch.uint8, torch.int8, got {dtype!r}")
        if qscheme not in _PER_TENSOR + _PER_CHANNEL:
            raise ValueError(
                "qscheme must be torch.per_tensor_affine, torch.per_tensor_symmetric, torch.per_channel_affine or "
                f"torch.per_channel_symmetric, got {qscheme!r}"
            )
        if not isinstance(reduce_range, bool):
            raise TypeError(f"reduce_range must be a bool, got {reduce_range!r}")
        if not _is_int(ch_axis):
            raise TypeError(f"ch_axis must be an int, got {ch_axis!r}")
        if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not (0 < eps < math.inf):
            raise ValueError(f"eps must be a positive finite float (the smallest scale), got {eps!r}")
        if qscheme in _SYMMETRIC and reduce_range and dtype in _UNSIGNED:
            raise ValueError(
                f"reduce_range=True is not supported with a symmetric qscheme and dtype {dtype} "
                "(torch.ao raises too): its zero point 128 would lie outside the reduced range [0, 127]"
            )
        self.dtype = dtype
        self.qscheme = qscheme
        self.reduce_range = reduce_range
        self.quant_min, self.quant_max, self.has_customized_qrange = _quant_range(
            dtype, reduce_range, quant_min, quant_max
        )
        self.per_channel = qscheme in _PER_CHANNEL
        self.symmetric = qscheme in _SYMMETRIC
        self.ch_axis = int(ch_axis)
        self.register_buffer("eps", torch.tensor([float(eps)], dtype=torch.float32, device=device))
        if self.per_channel:
            if num_channels is not None and (not _is_int(num_channels) or num_channels < 1):
                raise ValueError(f"num_channels must be None or a positive int, got {num_channels!r}")
            n = 0 if num_channels is None else int(num_channels)
            self.register_buffer("min_val", torch.full((n,), math.inf, device=device))
            self.register_buffer("max_val", torch.full((n,), -math.inf, device=device))
        else:
            if num_channels is not None:
                raise ValueError(
                    f"num_channels applies to per-channel qschemes only, got {num_channels!r} with {qscheme}"
                )
            self.register_buffer("min_val", torch.tensor(math.inf, device=device))
            self.register_buffer("max_val", torch.tensor(-math.inf, device=device))

    # ---------------------------------------------------------------- statistics

    def _current(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This input's (min, max): scalars per tensor, [C] per channel (torch.ao's layout)."""
        x = x.detach().to(self.min_val.dtype)
        if not self.per_channel:
            return torch.aminmax(x)
        axis = self._axis(x)
        y = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return torch.aminmax(y, dim=1)

    def _axis(self, x: torch.Tensor) -> int:
        if not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(f"ch_axis {self.ch_axis} is out of range for x of shape {tuple(x.shape)}")
        return self.ch_axis % x.dim()

    def _check_input(self, x) -> bool:
        """-> whether there is anything to observe."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device != self.min_val.device:
            raise ValueError(
                f"x is on {x.device} but the observer's statistics are on {self.min_val.device}; "
                "move the module (.to(device)) or the input"
            )
        if x.numel() == 0:
            return False  # as torch.ao: an empty tensor leaves the statistics alone
        if self.per_channel:
            channels = x.shape[self._axis(x)]
            if self.min_val.numel() == 0:  # sized by the first input (a shape, not a value)
                self.min_val = torch.full((channels,), math.inf, device=x.device)
                self.max_val = torch.full((channels,), -math.inf, device=x.device)
            elif self.min_val.numel() != channels:
                raise ValueError(
                    f"x has {channels} channels along ch_axis={self.ch_axis} (shape {tuple(x.shape)}) "
                    f"but the observer has statistics for {self.min_val.numel()}"
                )
        return True

    def _update(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.min(cur_min, self.min_val), torch.max(cur_max, self.max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._check_input(x):
            new_min, new_max = self._update(*self._current(x))
            self.min_val.copy_(new_min)
            self.max_val.copy_(new_max)
        return x

    def _apply(self, fn, recurse=True):
        return _keep_fp32(self, ("eps", "min_val", "max_val"), fn, recurse, super()._apply)

    def reset_min_max_vals(self) -> None:
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)

    # ---------------------------------------------------------------- qparams

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale fp32, zero_point) with torch.ao's UniformQuantizationObserverBase formulas,
        as device tensors: [1] per tensor, [C] per channel."""
        min_val, max_val = self.min_val, self.max_val
        device = min_val.device
        if min_val.numel() == 0:  # per channel, never observed: torch.ao's defaults, shape [1]
            return (
                torch.ones(1, dtype=torch.float32, device=device),
                torch.zeros(1, dtype=torch.int64 if self.symmetric else torch.int32, device=device),
            )
        quant_min, quant_max = self.quant_min, self.quant_max
        # The same expressions as torch.ao, operand for operand, so the roundings agree.
        min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
        max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
        if self.symmetric:
            max_val_pos = torch.max(-min_val_neg, max_val_pos)
            scale = max_val_pos / (float(quant_max - quant_min) / 2)
            scale = torch.max(scale, self.eps)
            if self.dtype in _UNSIGNED:
                zp = (quant_min + quant_max) // 2 if self.has_customized_qrange else 128
            else:
                zp = 0
            zero_point = torch.full(scale.shape, zp, dtype=torch.int64, device=device)
        else:
            scale = (max_val_pos - min_val_neg) / float(quant_max - quant_min)
            scale = torch.max(scale, self.eps)
            zero_point = quant_min - torch.round(min_val_neg / scale).to(torch.int)
            zero_point = torch.clamp(zero_point, quant_min, quant_max)
        # Not observed yet (the initial +-inf): torch.ao returns (1.0, 0), decided on the host.
        unobserved = (min_val == math.inf) & (max_val == -math.inf)
        scale = torch.where(unobserved, torch.ones_like(scale), scale)
        zero_point = torch.where(unobserved, torch.zeros_like(zero_point), zero_point)
        return scale.reshape(-1), zero_point.reshape(-1)

    # ---------------------------------------------------------------- state_dict

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Per channel, statistics sized by the first input: take the checkpoint's size when
        # ours is still unsized (torch.ao does the same).
        if self.per_channel:
            for name in ("min_val", "max_val"):
                value = state_dict.get(prefix + name)
                if isinstance(value, torch.Tensor) and getattr(self, name).numel() == 0 and value.dim() == 1:
                    setattr(self, name, torch.empty_like(value, device=getattr(self, name).device, dtype=torch.float32))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        axis = f", ch_axis={self.ch_axis}" if self.per_channel else ""
        return (
            f"dtype={self.dtype}, qscheme={self.qscheme}{axis}, quant_min={self.quant_min}, quant_max={self.quant_max}"
        )


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Moving-average min/max: after the first input, min <- min + c * (min(x) - min)
    (likewise max), c = averaging_constant in (0, 1]; the first input sets them directly.
    Everything else as MinMaxObserver; equals torch.ao's MovingAverageMinMaxObserver (per
    tensor) and MovingAveragePerChannelMinMaxObserver (per channel)."""

    def __init__(self, *, averaging_constant: float = 0.01, **kwargs):
        if not isinstance(averaging_constant, numbers.Real) or isinstance(averaging_constant, bool):
            raise TypeError(f"averaging_constant must be a float in (0, 1], got {averaging_constant!r}")
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must lie in (0, 1], got {averaging_constant!r}")
        super().__init__(**kwargs)
        self.averaging_constant = float(averaging_constant)

    def _update(self, cur_min, cur_max):
        c = self.averaging_constant
        min_val, max_val = self.min_val, self.max_val
        # torch.ao tests "min == inf and max == -inf" on the host; a where keeps it on the device.
        first = (min_val == math.inf) & (max_val == -math.inf)
        new_min = torch.where(first, cur_min, min_val + c * (cur_min - min_val))
        new_max = torch.where(first, cur_max, max_val + c * (cur_max - max_val))
        return new_min, new_max

    def extra_repr(self) -> str:
        return f"averaging_constant={self.averaging_constant}, {super().extra_repr()}"


class FakeQuantize(nn.Module):
    """Observe + fake-quantize in one step, as torch.ao.quantization.FakeQuantize.

    forward(x): if the observer is enabled, update its statistics with x and copy its
    (scale, zero_point) into this module's `scale` / `zero_point` buffers; if fake
    quantization is enabled, return accelops.ops.fake_quantize(x, scale, zero_point, ...)
    (straight-through gradient), else x. The qparams never leave the device.

    `observer` is MinMaxObserver or MovingAverageMinMaxObserver (the default, as torch.ao),
    built with `observer_kwargs` (dtype, qscheme, ch_axis, averaging_constant, ...).
    The switches `observer_enabled` / `fake_quant_enabled` are Python bools (torch.ao keeps
    them in uint8 tensors and reads them on the host each call), toggled by
    enable_observer()/disable_observer()/enable_fake_quant()/disable_fake_quant(); they
    are not in the state_dict, like `training`, and torch.compile recompiles once per setting.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, observer=None, quant_min: int | None = None, quant_max: int | None = None, **observer_kwargs):
        super().__init__()
        if observer is None:
            observer = MovingAverageMinMaxObserver
        if not (isinstance(observer, type) and issubclass(observer, MinMaxObserver)):
            raise TypeError(
                f"observer must be MinMaxObserver or MovingAverageMinMaxObserver (a class), got {observer!r}"
            )
        self.activation_post_process = observer(quant_min=quant_min, quant_max=quant_max, **observer_kwargs)
        obs = self.activation_post_process
        self.quant_min, self.quant_max = obs.quant_min, obs.quant_max
        self.dtype, self.qscheme = obs.dtype, obs.qscheme
        self.is_per_channel = obs.per_channel
        self.ch_axis = obs.ch_axis if obs.per_channel else -1
        device = obs.eps.device
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32, device=device))
        self.observer_enabled = True
        self.fake_quant_enabled = True

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        self.observer_enabled = bool(enabled)
        return self

    def disable_observer(self) -> "FakeQuantize":
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled = bool(enabled)
        return self

    def disable_fake_quant(self) -> "FakeQuantize":
        return self.enable_fake_quant(False)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.activation_post_process.calculate_qparams()

    def _apply(self, fn, recurse=True):
        return _keep_fp32(self, ("scale",), fn, recurse, super()._apply)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self.activation_post_process(x.detach())
            scale, zero_point = self.calculate_qparams()
            if self.scale.shape != scale.shape:  # per channel, the first call sizes them
                self.scale = torch.empty(scale.shape, dtype=self.scale.dtype, device=self.scale.device)
                self.zero_point = torch.empty(
                    zero_point.shape, dtype=self.zero_point.dtype, device=self.zero_point.device
                )
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        return self.fake_quant(x) if self.fake_quant_enabled else x

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x with the current `scale` / `zero_point`, observing nothing."""
        if x.numel() == 0:
            return x
        axis = self.ch_axis if self.is_per_channel else None
        return ops.fake_quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max, axis)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for name in ("scale", "zero_point"):  # a per-channel checkpoint holds [C] where we may hold [1]
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.shape != getattr(self, name).shape:
                own = getattr(self, name)
                setattr(self, name, torch.empty(value.shape, dtype=own.dtype, device=own.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, observer_enabled={self.observer_enabled}, "
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, "
            f"qscheme={self.qscheme}, ch_axis={self.ch_axis}"
        )
