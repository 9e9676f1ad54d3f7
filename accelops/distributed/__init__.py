"""Data-parallel training over torch.distributed (gloo on CPU, NCCL on GPU): a bucketed
all-reduce that overlaps backward (BucketedAllReducer) and gradient compression as DDP
communication hooks (register_compression), on the kernels of accelops.ops.comm."""

from . import hooks
from ._common import CommunicationError
from .hooks import HOOKS, CompressionState, make_state, register_compression
from .reducer import BucketedAllReducer

__all__ = [
    "BucketedAllReducer",
    "register_compression",
    "make_state",
    "CompressionState",
    "CommunicationError",
    "HOOKS",
    "hooks",
]
