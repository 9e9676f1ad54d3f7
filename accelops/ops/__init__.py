"""Public functional API: validate -> a forced (ACCELOPS_BACKEND) or tuned override ->
torch.ops.accelops.<op>, whose dispatcher runs the C++ kernel on CPU, the Triton or CUDA
one on GPUs and the reference elsewhere. Importing a family's module defines its ops
(schemas, fakes, autograd: see _library.py)."""

from . import (
    comm,
    optim,  # noqa: E402  (8-bit optimizer steps; defines their ops)
)
from .bitlinear import bitlinear_matmul
from .comm import (
    bucket_flatten,
    bucket_unflatten_,
    cast_div,
    int8_compress_,
    int8_decompress,
    orthogonalize_,
    sign_compress_,
    sign_decompress,
    topk_compress_,
    topk_decompress,
)
from .decode import ternary_decode_layer
from .fake_quant import fake_quantize, fake_quantize_learnable
from .ffn import ffn_activation, fused_ffn
from .int8 import int8_linear, int8_matmul, quantize_activation_int8, quantize_weight_int8
from .optim import adamw8bit_step_, sgd8bit_step_
from .ternary import (
    convert_ternary_format,
    pack_ternary,
    pack_ternary_base3,
    pack_ternary_lut,
    packed_cols,
    quantize_weight_ternary,
    ternary_matmul,
    ternary_matmul_base3,
    ternary_matmul_lut,
    unpack_ternary,
    unpack_ternary_base3,
    unpack_ternary_lut,
)

__all__ = [
    "ternary_decode_layer",
    "comm",
    "bucket_flatten",
    "bucket_unflatten_",
    "cast_div",
    "topk_compress_",
    "topk_decompress",
    "sign_compress_",
    "sign_decompress",
    "int8_compress_",
    "int8_decompress",
    "orthogonalize_",
    "fake_quantize",
    "fake_quantize_learnable",
    "ffn_activation",
    "fused_ffn",
    "optim",
    "adamw8bit_step_",
    "sgd8bit_step_",
    "int8_linear",
    "int8_matmul",
    "quantize_activation_int8",
    "quantize_weight_int8",
    "pack_ternary",
    "packed_cols",
    "quantize_weight_ternary",
    "ternary_matmul",
    "unpack_ternary",
    "pack_ternary_lut",
    "unpack_ternary_lut",
    "convert_ternary_format",
    "ternary_matmul_lut",
    "pack_ternary_base3",
    "unpack_ternary_base3",
    "ternary_matmul_base3",
    "bitlinear_matmul",
]
