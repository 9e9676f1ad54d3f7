"""accelops.eval: an evaluation suite on real NLP data (docs/eval.md).

data: strict loaders for the data sets' formats; metrics: the tasks' standard metrics;
tokenize: a byte-level BPE tokenizer trained on a task's training split (it needs the
`tokenizers` library, so it is imported on use: `from accelops.eval.tokenize import Tokenizer`);
tasks: the evaluation tasks (splits, tokenizer, model head, encoding, metrics) and fit()."""

from . import data, metrics
from .data import DataFormatError, data_path, data_root

__all__ = ["data", "metrics", "DataFormatError", "data_root", "data_path"]
