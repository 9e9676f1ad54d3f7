"""FusedFFN: a Llama-style MLP (gate_proj, up_proj, down_proj) whose forward and backward
run as one accelops.ops.fused_ffn call, and FFN, the same module unfused (plain PyTorch,
the way back and the baseline).

Both keep the Hugging Face attribute names, so a Llama MLP's state_dict
(gate_proj.weight, up_proj.weight, down_proj.weight) loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..reference import ffn as ref_ffn
from ..reference.bitlinear import straight_through
from .bitlinear import BitLinear
from .qat import QATLinear
from .quantized_linear import Int8Linear, TernaryLinear

__all__ = ["FusedFFN", "FFN", "QUANT_MODES"]

QUANT_MODES = (None, "bitlinear", "ternary", "int8", "qat-int8")
_LAYERS = {None: nn.Linear, "bitlinear": BitLinear, "ternary": TernaryLinear, "int8": Int8Linear, "qat-int8": QATLinear}
# What each mode's forward runs, in words (convert()'s report prints it).
KERNELS = {
    None: "fused_ffn",
    "bitlinear": "fused_ffn(ternary fake-quant weights, int8 fake-quant activations)",
    "ternary": "ternary_matmul x3 + ffn_activation",
    "int8": "int8_linear x3 + ffn_activation",
    "qat-int8": "fused_ffn(int8 fake-quant weights, int8 fake-quant activations)",
}


def _check(activation, quant=None):
    if not isinstance(activation, str) or activation not in ref_ffn.ACTIVATIONS:
        raise ValueError(f"activation must be one of {ref_ffn.ACTIVATIONS}, got {activation!r}")
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _act_module(activation: str) -> nn.Module:
    return nn.SiLU() if activation == "swiglu" else nn.GELU()


def infer_activation(mlp: nn.Module) -> str | None:
    """'swiglu' / 'geglu' / 'gelu' from mlp.act_fn (nn.SiLU, exact nn.GELU, or Hugging Face's
    SiLU/GELU activation classes by name) and whether it has a gate_proj; None if unknown."""
    act = getattr(mlp, "act_fn", None)
    if act is None:
        return None
    gated = getattr(mlp, "gate_proj", None) is not None
    name = type(act).__name__.lower()
    if isinstance(act, nn.SiLU) or name in ("siluactivation", "swishactivation"):
        return "swiglu" if gated else None
    exact_gelu = (isinstance(act, nn.GELU) and act.approximate == "none") or name == "geluactivation"
    if exact_gelu:
        return "geglu" if gated else "gelu"
    return None


class FFN(nn.Module):
    """The unfused reference module: down_proj(act(gate_proj(x)) * up_proj(x)) ('swiglu',
    'geglu') or down_proj(gelu(up_proj(x))) ('gelu'), with nn.Linear children and `act_fn`,
    laid out like transformers' LlamaMLP."""

    def __init__(
        self, dim: int, hidden: int, activation: str = "swiglu", bias: bool = False, *, device=None, dtype=None
    ):
        super().__init__()
        _check(activation)
        _positive("dim", dim)
        _positive("hidden", hidden)
        self.dim, self.hidden, self.activation = dim, hidden, activation
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(dim, hidden, **kw) if ref_ffn.gated(activation) else None
        self.up_proj = nn.Linear(dim, hidden, **kw)
        self.down_proj = nn.Linear(hidden, dim, **kw)
        self.act_fn = _act_module(activation)

    def forward(self, x):
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}"


class FusedFFN(nn.Module):
    """Llama-style MLP in one fused op: y = down(act(gate(x)) * up(x)).

    quant=None: nn.Linear projections; forward and backward are accelops.ops.fused_ffn,
        which saves only the pre-activations g and u for backward (not act(g), nor h).
    quant="bitlinear": BitLinear projections (BitNet b1.58 training): the fused op gets their
        ternary fake-quantized weights (straight-through to the latent weights) and applies
        per-token int8 fake-quant to x and h inside (act_quant=True); equal to composing the
        three BitLinear layers unfused, up to fp32 rounding.
    quant="ternary": TernaryLinear projections (packed BitNet b1.58 inference): ternary_matmul
        for the three projections (exact int32 sums), accelops.ops.ffn_activation in between.
        Equal to three TernaryLinear layers unfused, bit for bit.
    quant="int8": Int8Linear projections (W8A8 inference): int8_linear for the three
        projections, accelops.ops.ffn_activation for the fused activation in between.
        Weights are frozen int8 buffers; gradients reach x only (straight-through).
    quant="qat-int8": QATLinear projections (int8 quantization-aware training, per-token
        activations): the fused op gets their fake-quantized weights (`qat_weight` "int8" per
        output channel or "int4" per group of `group_size`, straight-through) and fake-quantizes
        x and h per token to int8 inside (act_quant=True), as three QATLinear layers do to
        their inputs, up to fp32 rounding (QATLinear sums the int8 codes exactly; the fused op
        multiplies their dequantized values in fp32).

    Ternary and int8 layers (and their fused modes) are inference forms: gradients reach x
    (straight-through) and the biases, not the quantized weights.

    `gate_proj` is None for activation 'gelu' (not gated).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "swiglu",
        bias: bool = False,
        quant=None,
        per_channel: bool = False,
        *,
        qat_weight: str = "int8",
        group_size: int = 128,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check(activation, quant)
        _positive("dim", dim)
        _positive("hidden", hidden)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        if not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
        if quant != "qat-int8" and (qat_weight, group_size) != ("int8", 128):
            raise ValueError(f"qat_weight and group_size apply to quant='qat-int8' only, got quant={quant!r}")
        self.dim, self.hidden, self.activation, self.quant = dim, hidden, activation, quant
        self.per_channel = per_channel
        self.qat_weight, self.group_size = qat_weight, group_size
        cls = _LAYERS[quant]
        kw = {"bias": bias, "device": device, "dtype": dtype}
        if quant in ("bitlinear", "ternary"):
            kw["per_channel"] = per_channel
        if quant == "qat-int8":
            kw.update(activation="per_token", weight=qat_weight, group_size=group_size)
        self.gate_proj = cls(dim, hidden, **kw) if ref_ffn.gated(activation) else None
        self.up_proj = cls(dim, hidden, **kw)
        self.down_proj = cls(hidden, dim, **kw)

    # ------------------------------------------------------------------ forward

    def _layers(self):
        return [p for p in (self.gate_proj, self.up_proj, self.down_proj) if p is not None]

    def _bias(self):
        if all(p.bias is None for p in self._layers()):
            return None
        return (None if self.gate_proj is None else self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant in ("int8", "ternary"):
            return self._forward_inference(x)
        if self.quant == "bitlinear":
            # p.dequantized_weight(): the BitLinear's own (cached when it is shared) quantization
            weights = [
                None if p is None else straight_through(p.dequantized_weight(), p.weight).to(x.dtype)
                for p in (self.gate_proj, self.up_proj, self.down_proj)
            ]
            return ops.fused_ffn(x, *weights, self._bias(), self.activation, act_quant=True)
        if self.quant == "qat-int8":
            weights = [
                None if p is None else p.fake_quantized_weight().to(x.dtype)
                for p in (self.gate_proj, self.up_proj, self.down_proj)
            ]
            return ops.fused_ffn(x, *weights, self._bias(), self.activation, act_quant=True)
        weights = [None if p is None else p.weight for p in (self.gate_proj, self.up_proj, self.down_proj)]
        bias = self._bias()
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            # The op takes one dtype; under autocast that is autocast's, as for F.linear.
            dt = torch.get_autocast_dtype(x.device.type)
            cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
            x, weights = x.to(dt), [cast(w) for w in weights]
            bias = None if bias is None else tuple(cast(b) for b in bias)
        return ops.fused_ffn(x, *weights, bias, self.activation)

    def _forward_inference(self, x):
        # Each projection is its layer's own forward (int8_linear / ternary_matmul, which
        # checks x against the layer's in_features); the activation in between is fused.
        u = self.up_proj(x)
        g = self.gate_proj(x) if self.gate_proj is not None else None
        return self.down_proj(ops.ffn_activation(g, u, self.activation))

    def extra_repr(self) -> str:
        extra = f", qat_weight={self.qat_weight!r}" if self.quant == "qat-int8" else ""
        if self.quant == "qat-int8" and self.qat_weight == "int4":
            extra += f", group_size={self.group_size}"
        if self.quant in ("bitlinear", "ternary") and self.per_channel:
            extra += ", per_channel=True"
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}, quant={self.quant!r}{extra}"

    # ------------------------------------------------------------------ conversions

    @classmethod
    def from_module(
        cls,
        mlp: nn.Module,
        activation: str | None = None,
        quant=None,
        per_channel: bool = False,
        *,
        qat_weight: str = "int8",
        group_size: int = 128,
    ) -> "FusedFFN":
        """A FusedFFN built from a Llama-style MLP (gate_proj / up_proj / down_proj nn.Linear,
        gate_proj absent or None for 'gelu'). activation defaults to what mlp.act_fn says
        (nn.SiLU -> 'swiglu', exact nn.GELU -> 'geglu' with a gate, 'gelu' without); pass it
        when act_fn is something else. quant=None, 'bitlinear' and 'qat-int8' share mlp's
        Parameters (no copy: ties and optimizer references carry over); 'ternary' and 'int8'
        quantize them (a BitLinear projection becomes the TernaryLinear of its own
        quantization)."""
        _check(activation or "swiglu", quant)
        up, down = getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None)
        gate = getattr(mlp, "gate_proj", None)
        for name, layer in (("up_proj", up), ("down_proj", down)) + (
            (("gate_proj", gate),) if gate is not None else ()
        ):
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"mlp.{name} must be an nn.Linear, got {type(layer).__name__}")
        if activation is None:
            activation = infer_activation(mlp)
            if activation is None:
                raise ValueError(
                    f"cannot infer the activation from mlp.act_fn={getattr(mlp, 'act_fn', None)!r}; pass "
                    f"activation= one of {ref_ffn.ACTIVATIONS}"
                )
        if ref_ffn.gated(activation) != (gate is not None):
            raise ValueError(
                f"activation {activation!r} {'needs' if ref_ffn.gated(activation) else 'takes no'} "
                f"gate_proj, and mlp {'has none' if gate is None else 'has one'}"
            )
        dim, hidden = up.in_features, up.out_features
        if (down.in_features, down.out_features) != (hidden, dim) or (
            gate is not None and (gate.in_features, gate.out_features) != (dim, hidden)
        ):
            raise ValueError(
                f"mlp's projections do not form an FFN of dim {dim}, hidden {hidden}: "
                f"down_proj is {down.in_features} -> {down.out_features}"
            )
        new = cls(
            dim,
            hidden,
            activation,
            bias=False,
            quant=quant,
            per_channel=per_channel,
            qat_weight=qat_weight,
            group_size=group_size,
            device="meta",
        )
        for name, layer in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            if layer is None:
                continue
            if quant is None:
                converted = layer
            elif quant == "bitlinear":
                converted = BitLinear.from_linear(layer, per_channel=per_channel)
            elif quant == "ternary":
                converted = (
                    TernaryLinear.from_bitlinear(layer)
                    if isinstance(layer, BitLinear)
                    else TernaryLinear.from_linear(layer, per_channel=per_channel)
                )
            elif quant == "qat-int8":
                converted = QATLinear.from_linear(layer, weight=qat_weight, group_size=group_size)
            else:
                converted = Int8Linear.from_linear(layer)
            setattr(new, name, converted)
        new.train(mlp.training)
        return new

    def to_module(self, dtype: torch.dtype | None = None) -> FFN:
        """The unfused FFN with nn.Linear children. quant=None and 'bitlinear' share this
        module's (latent) Parameters; 'qat-int8' shares them too; 'ternary' and 'int8' give
        dequantized copies (in `dtype`)."""
        bias = self.up_proj.bias is not None
        new = FFN(self.dim, self.hidden, self.activation, bias=bias, device="meta")
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(self, name)
            if layer is None:
                continue
            if self.quant is None:
                linear = layer
            elif self.quant in ("bitlinear", "qat-int8"):
                linear = layer.to_linear()
            else:
                linear = layer.to_linear(dtype)
            setattr(new, name, linear)
        new.train(self.training)
        return new
