"""Public functional API: validate -> choose a backend -> kernel."""
from . import comm
from .comm import (bucket_flatten, bucket_unflatten_, cast_div, int8_compress_, int8_decompress, orthogonalize_,
                   sign_compress_, sign_decompress, topk_compress_, topk_decompress)
from .fake_quant import fake_quantize, fake_quantize_learnable
from .ffn import ffn_activation, fused_ffn
from . import optim  # noqa: E402  (8-bit optimizer steps; registers their fakes)
from .optim import adamw8bit_step_, sgd8bit_step_
from .int8 import int8_linear, int8_matmul, quantize_activation_int8, quantize_weight_int8
from .ternary import pack_ternary, packed_cols, quantize_weight_ternary, ternary_matmul, unpack_ternary

__all__ = [
    "comm", "bucket_flatten", "bucket_unflatten_", "cast_div", "topk_compress_", "topk_decompress",
    "sign_compress_", "sign_decompress", "int8_compress_", "int8_decompress", "orthogonalize_",
    "fake_quantize", "fake_quantize_learnable",
    "ffn_activation", "fused_ffn", "optim", "adamw8bit_step_", "sgd8bit_step_",
    "int8_linear", "int8_matmul", "quantize_activation_int8", "quantize_weight_int8",
    "pack_ternary", "packed_cols", "quantize_weight_ternary", "ternary_matmul", "unpack_ternary",
]
