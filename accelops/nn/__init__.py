"""Drop-in modules: BitLinear (training), TernaryLinear and Int8Linear (inference),
convert() that swaps a model's nn.Linear layers for them, and FusedFFN (a Llama-style MLP
in one fused op) with FFN, its unfused form."""
from .bitlinear import BitLinear
from .ffn import FFN, FusedFFN
from .convert import MODES, ConvertReport, Swap, convert
from .quantized_linear import Int8Linear, TernaryLinear

__all__ = ["BitLinear", "TernaryLinear", "Int8Linear", "convert", "ConvertReport", "Swap", "MODES", "FusedFFN", "FFN"]
