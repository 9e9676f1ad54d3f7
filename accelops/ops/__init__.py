"""Public functional API: validate -> choose a backend -> kernel."""
from .fake_quant import fake_quantize, fake_quantize_learnable
from .ffn import ffn_activation, fused_ffn
from .int8 import int8_linear, int8_matmul, quantize_activation_int8, quantize_weight_int8
from .ternary import pack_ternary, packed_cols, quantize_weight_ternary, ternary_matmul, unpack_ternary

__all__ = [
    "fake_quantize", "fake_quantize_learnable",
    "ffn_activation", "fused_ffn",
    "int8_linear", "int8_matmul", "quantize_activation_int8", "quantize_weight_int8",
    "pack_ternary", "packed_cols", "quantize_weight_ternary", "ternary_matmul", "unpack_ternary",
]
