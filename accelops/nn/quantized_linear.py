"""Inference layers holding quantized weights: TernaryLinear (packed 2-bit ternary weights,
int8 activations) and Int8Linear (W8A8 dynamic). Both keep nn.Linear's attribute names
(`in_features`, `out_features`, `bias`, a read-only `weight` giving the dequantized fp32
weight), convert from and back to nn.Linear, and load either their own state_dict or an
nn.Linear one (whose `weight` they quantize on load).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..reference.ternary import packed_cols
from ..reference.ternary_base3 import ZERO_BYTE as _BASE3_ZEROS
from ..reference.ternary_base3 import base3_cols
from ..reference.ternary_lut import lut_shape
from .bitlinear import BitLinear, check_in_features

__all__ = ["TernaryLinear", "Int8Linear"]

# 0b01010101: four 2-bit codes of 1, i.e. four zero weights (see reference/ternary.py).
_PACKED_ZEROS = 0x55
# Three zero-weight groups (index 13 each) in one lut3 word (see reference/ternary_lut.py).
_LUT_ZEROS = 13 | 13 << 5 | 13 << 10
# The buffer each ternary format keeps its weights in.
_TERNARY_BUFFERS = {"i2": "w_packed", "lut3": "w_lut", "base3": "w_b3"}


class _QuantizedLinear(nn.Module):
    """What TernaryLinear and Int8Linear share: the bias, state_dict checks, keeping the
    fp32 scale fp32 under .to(dtype)/.half(), and the way back to nn.Linear."""

    # name of the quantized-weight buffer; its float counterpart in a checkpoint is "weight"
    _qweight_name: str

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # --- to be provided by each layer
    def _expected_buffers(self) -> dict:
        """{buffer name: (shape, dtype, layout in words)} that a checkpoint must match."""
        raise NotImplementedError

    def _quantize(self, w: torch.Tensor) -> dict:
        """float weight [N, K] -> {buffer name: tensor}."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    # --- shared behaviour
    def _set_quantized(self, w: torch.Tensor) -> None:
        for name, value in self._quantize(w).items():
            getattr(self, name).copy_(value)

    def _copy_bias_from(self, linear: nn.Module) -> None:
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)

    def _apply(self, fn, recurse=True):
        # The kernels take fp32 scales; model.half() / model.to(torch.bfloat16) would cast
        # them (and lose precision), so the scale follows device moves but keeps fp32.
        scale = self.w_scale
        super()._apply(fn, recurse)
        if self.w_scale.dtype != torch.float32:
            self.w_scale = scale.to(self.w_scale.device)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # load_state_dict hands each module its own copy of the dict, meant to be edited here.
        float_key = prefix + "weight"
        if float_key in state_dict and prefix + self._qweight_name not in state_dict:
            w = state_dict.pop(float_key)
            expected = (self.out_features, self.in_features)
            if tuple(w.shape) != expected:
                error_msgs.append(
                    f"size mismatch for {float_key}: {self._describe()} expects a float weight of shape "
                    f"{expected} [out_features, in_features], the checkpoint has {tuple(w.shape)}"
                )
                return
            # keys carry the prefix: a nested layer (model.mlp.up_proj) gets its own entries
            state_dict.update({prefix + k: v for k, v in self._quantize(w.to(self.w_scale.device)).items()})
        ok = True
        for name, (shape, dtype, layout) in self._expected_buffers().items():
            key = prefix + name
            if key not in state_dict:
                continue  # reported as a missing key by the default loader
            value = state_dict[key]
            if tuple(value.shape) != shape:
                error_msgs.append(
                    f"size mismatch for {key}: {self._describe()} expects shape {shape} ({layout}), "
                    f"the checkpoint has {tuple(value.shape)}"
                )
                ok = False
            elif value.dtype != dtype:
                error_msgs.append(
                    f"dtype mismatch for {key}: {self._describe()} expects {dtype}, the checkpoint has {value.dtype}"
                )
                ok = False
        if ok:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """nn.Linear holding the dequantized weight. `dtype` defaults to the bias's dtype
        (from_linear keeps the source's), or float32 for a layer without bias."""
        if dtype is None:
            dtype = torch.float32 if self.bias is None else self.bias.dtype
        w = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.train(self.training)
        return linear


class TernaryLinear(_QuantizedLinear):
    """y = ternary(W) @ int8(x) + bias via accelops.ops.ternary_matmul, W stored packed
    with `w_scale` fp32 [1] (per tensor) or [N] (per_channel). Output in the input's dtype.

    `format` picks the packed layout, one buffer either way (so a state_dict says which):
    "i2" (default): `w_packed` uint8 [N, ceil(K/128)*32], 4 weights a byte, fast at every M;
    "lut3": `w_lut` int16 [ceil(N/32), ceil(K/9), 32], 9 weights in 16 bits, the
    lookup-table GEMV kernel (for M = 1: see docs/backends.md for where it wins);
    "base3": `w_b3` uint8 [N, ceil(K/320)*64], 5 weights a byte (1.6 bits), a GEMV kernel
    made for M = 1 (see docs/backends.md).
    `to_format` converts a layer in place; loading a state_dict of another format converts
    it on load (the weights are the same, bit for bit)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        per_channel: bool = False,
        *,
        format: str = "i2",
        device=None,
        dtype=None,
    ):
        if not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
        if format not in ops.ternary.FORMATS:
            raise ValueError(f"format must be one of {ops.ternary.FORMATS}, got {format!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.per_channel = per_channel
        self.format = format
        self.register_buffer(self._qweight_name, self._zero_weight(format, device))
        self.register_buffer(
            "w_scale", torch.ones(out_features if self.per_channel else 1, dtype=torch.float32, device=device)
        )

    @property
    def _qweight_name(self) -> str:
        return _TERNARY_BUFFERS[self.format]

    def _zero_weight(self, format: str, device) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if format == "i2":
            return torch.full((n, packed_cols(k)), _PACKED_ZEROS, dtype=torch.uint8, device=device)
        if format == "base3":
            return torch.full((n, base3_cols(k)), _BASE3_ZEROS, dtype=torch.uint8, device=device)
        return torch.full(lut_shape(n, k), _LUT_ZEROS, dtype=torch.int16, device=device)

    def _qweight(self) -> torch.Tensor:
        return getattr(self, self._qweight_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_in_features(self, x)
        if self.format == "lut3":
            return ops.ternary_matmul_lut(
                x, self.w_lut, self.w_scale, self.bias, n=self.out_features, k=self.in_features
            )
        if self.format == "base3":
            return ops.ternary_matmul_base3(x, self.w_b3, self.w_scale, self.bias, k=self.in_features)
        # k: w_packed's shape alone would take an x whose K fits the padding of the last
        # 128-block (K=4000 for in_features=4096) as zero-padded.
        return ops.ternary_matmul(x, self.w_packed, self.w_scale, self.bias, k=self.in_features)

    def _codes(self) -> torch.Tensor:
        """Wq int8 [out_features, in_features] in {-1, 0, 1}."""
        if self.format == "lut3":
            return ops.unpack_ternary_lut(self.w_lut, self.out_features, self.in_features)
        if self.format == "base3":
            return ops.unpack_ternary_base3(self.w_b3, self.in_features)
        return ops.unpack_ternary(self.w_packed, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight Wq * scale, fp32 [out_features, in_features] (read-only copy)."""
        return self._codes().float() * self.w_scale.reshape(-1, 1)

    def to_format(self, format: str) -> "TernaryLinear":
        """Repacks the weights in `format` ("i2", "lut3" or "base3"), in place; returns self. Lossless:
        outputs are unchanged."""
        if format not in ops.ternary.FORMATS:
            raise ValueError(f"format must be one of {ops.ternary.FORMATS}, got {format!r}")
        if format == self.format:
            return self
        old = self._qweight_name
        value = ops.convert_ternary_format(
            self._qweight(), self.format, format, n=self.out_features, k=self.in_features
        )
        delattr(self, old)
        self.format = format
        self.register_buffer(self._qweight_name, value)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint in another format: repack it into this layer's (same weights).
        mine = prefix + self._qweight_name
        for fmt, name in _TERNARY_BUFFERS.items():
            key = prefix + name
            if fmt == self.format or key not in state_dict or mine in state_dict:
                continue
            value = state_dict[key]
            expected = self._zero_weight(fmt, "meta")
            if tuple(value.shape) == tuple(expected.shape) and value.dtype == expected.dtype:
                n, k = self.out_features, self.in_features
                state_dict[mine] = ops.convert_ternary_format(value, fmt, self.format, n=n, k=k)
                del state_dict[key]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _expected_buffers(self) -> dict:
        n = self.out_features
        if self.format == "lut3":
            qweight = (lut_shape(n, self.in_features), torch.int16, "[ceil(out_features/32), ceil(in_features/9), 32]")
        elif self.format == "base3":
            qweight = ((n, base3_cols(self.in_features)), torch.uint8, "[out_features, ceil(in_features/320)*64]")
        else:
            qweight = ((n, packed_cols(self.in_features)), torch.uint8, "[out_features, ceil(in_features/128)*32]")
        return {
            self._qweight_name: qweight,
            "w_scale": (
                (n,) if self.per_channel else (1,),
                torch.float32,
                "[out_features], per_channel=True" if self.per_channel else "[1], per_channel=False",
            ),
        }

    def _quantize(self, w: torch.Tensor) -> dict:
        w_packed, w_scale = ops.quantize_weight_ternary(w.detach(), self.per_channel)
        if self.format != "i2":
            n, k = self.out_features, self.in_features
            value = ops.convert_ternary_format(w_packed, "i2", self.format, n=n, k=k)
            return {self._qweight_name: value, "w_scale": w_scale}
        return {"w_packed": w_packed, "w_scale": w_scale}

    def extra_repr(self) -> str:
        fmt = "" if self.format == "i2" else f", format={self.format!r}"
        return f"{super().extra_repr()}, per_channel={self.per_channel}{fmt}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = False, format: str = "i2") -> "TernaryLinear":
        """Quantize `linear`'s weight (absmean ternary), packed in `format`; the bias is
        copied, on the same device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        dtype = w.dtype if linear.bias is None else linear.bias.dtype
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            per_channel=per_channel,
            format=format,
            device=w.device,
            dtype=dtype,
        )
        new._set_quantized(w)
        new._copy_bias_from(linear)
        new.train(linear.training)
        return new

    @classmethod
    def from_bitlinear(cls, bitlinear: BitLinear) -> "TernaryLinear":
        """The inference form of a trained BitLinear: same quantization (and per_channel),
        so the same outputs."""
        if not isinstance(bitlinear, BitLinear):
            raise TypeError(f"bitlinear must be a BitLinear, got {type(bitlinear).__name__}")
        return cls.from_linear(bitlinear, per_channel=bitlinear.per_channel)


class Int8Linear(_QuantizedLinear):
    """W8A8 dynamic: y = int8(x) @ int8(W)^T + bias via accelops.ops.int8_linear, with
    `w_q` int8 [N, K] and `w_scale` fp32 [N] (per output channel). Output in the input's dtype."""

    _qweight_name = "w_q"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("w_q", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_in_features(self, x)
        return ops.int8_linear(x, self.w_q, self.w_scale, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight w_q * w_scale, fp32 [out_features, in_features] (read-only copy)."""
        return self.w_q.float() * self.w_scale.reshape(-1, 1)

    def _expected_buffers(self) -> dict:
        n, k = self.out_features, self.in_features
        return {
            "w_q": ((n, k), torch.int8, "[out_features, in_features]"),
            "w_scale": ((n,), torch.float32, "[out_features]"),
        }

    def _quantize(self, w: torch.Tensor) -> dict:
        w_q, w_scale = ops.quantize_weight_int8(w.detach())
        return {"w_q": w_q, "w_scale": w_scale}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize `linear`'s weight per output channel; the bias is copied, on the same device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        dtype = w.dtype if linear.bias is None else linear.bias.dtype
        new = cls(linear.in_features, linear.out_features, bias=False, device=w.device, dtype=dtype)
        new._set_quantized(w)
        new._copy_bias_from(linear)
        new.train(linear.training)
        return new
