"""accelops.eval: an evaluation suite on real NLP data (docs/eval.md).

data: strict loaders for the data sets' formats; metrics: the tasks' standard metrics."""
from . import data, metrics
from .data import DataFormatError, data_path, data_root

__all__ = ["data", "metrics", "DataFormatError", "data_root", "data_path"]
