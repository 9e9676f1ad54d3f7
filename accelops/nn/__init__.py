"""Drop-in modules: BitLinear and QATLinear (training), TernaryLinear and Int8Linear
(inference), the observers and FakeQuantize of quantization-aware training, FusedFFN (a
Llama-style MLP in one fused op) with FFN, its unfused form, convert() that swaps a
model's nn.Linear layers for them, and count_parameters() (sizes, sharing-aware)."""

from .bitlinear import BitLinear
from .convert import MODES, PRECISIONS, ConvertReport, Swap, convert
from .counting import ParameterCount, count_parameters
from .embedding import Bf16Embedding, Bf16Linear, Int8Embedding, TiedHead
from .ffn import FFN, FusedFFN
from .observers import FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver
from .qat import QATLinear
from .quantized_linear import Int8Linear, TernaryLinear
from .serialize import load, save

__all__ = [
    "BitLinear",
    "TernaryLinear",
    "Int8Linear",
    "QATLinear",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "FakeQuantize",
    "FusedFFN",
    "FFN",
    "convert",
    "ConvertReport",
    "Swap",
    "MODES",
    "ParameterCount",
    "count_parameters",
    "save",
    "load",
    "Int8Embedding",
    "Bf16Embedding",
    "Bf16Linear",
    "TiedHead",
    "PRECISIONS",
]
