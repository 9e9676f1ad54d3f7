"""accelops.eval: an evaluation suite on real NLP data (docs/eval.md).

data: strict loaders for the data sets' formats."""
from . import data
from .data import DataFormatError, data_path, data_root

__all__ = ["data", "DataFormatError", "data_root", "data_path"]
