"""Drop-in modules: BitLinear and QATLinear (training), TernaryLinear and Int8Linear
(inference), the observers and FakeQuantize of quantization-aware training, FusedFFN (a
Llama-style MLP in one fused op) with FFN, its unfused form, convert() that swaps a
model's nn.Linear layers for them, and count_parameters() (sizes, sharing-aware)."""
from .bitlinear import BitLinear
from .ffn import FFN, FusedFFN
from .embedding import Bf16Embedding, Bf16Linear, Int8Embedding, TiedHead
from .convert import MODES, PRECISIONS, ConvertReport, Swap, convert
from .serialize import load, save
from .counting import ParameterCount, count_parameters
from .observers import FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver
from .qat import QATLinear
from .quantized_linear import Int8Linear, TernaryLinear

__all__ = ["BitLinear", "TernaryLinear", "Int8Linear", "QATLinear", "MinMaxObserver", "MovingAverageMinMaxObserver",
           "FakeQuantize", "FusedFFN", "FFN", "convert", "ConvertReport", "Swap", "MODES", "ParameterCount",
           "count_parameters", "save", "load", "Int8Embedding", "Bf16Embedding", "Bf16Linear", "TiedHead",
           "PRECISIONS"]
