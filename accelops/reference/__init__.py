"""Pure-PyTorch references: the specification of every op, and the fallback backend."""

from .ffn import ffn_activation, fused_ffn
from .int8 import int8_linear, int8_matmul, quantize_activation_int8, quantize_weight_int8
from .ternary import pack_ternary, quantize_weight_ternary, ternary_matmul, unpack_ternary

__all__ = [
    "ffn_activation",
    "fused_ffn",
    "int8_linear",
    "int8_matmul",
    "quantize_activation_int8",
    "quantize_weight_int8",
    "pack_ternary",
    "quantize_weight_ternary",
    "ternary_matmul",
    "unpack_ternary",
]
