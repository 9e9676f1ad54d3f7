"""accelops: low-bit (ternary, INT8) and distributed-training kernels for PyTorch."""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (defines the torch.ops.accelops ops: schemas, fakes, autograd)
from ._info import info  # noqa: E402
from .nn import convert, load, save  # noqa: E402
from .planner import plan  # noqa: E402  (the function; its module is accelops.planner)

__all__ = ["ops", "info", "convert", "save", "load", "plan", "__version__"]
