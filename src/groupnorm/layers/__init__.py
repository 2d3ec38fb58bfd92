"""The normalization family: GroupNorm, BN (virtual workers), Batch Renorm, CPU SyncBN, WS convs."""

from .batchnorm import (
    BatchNorm,
    BatchRenorm,
    SyncBatchNorm,
    per_chunk_batch_norm,
    set_virtual_batch,
    uses_batch_stats,
    worker_batch_norm,
)
from .convert import convert_norms, is_norm
from .factory import NORM_KINDS, get_norm_layer, norm_layer, register_norm, split_ws
from .groupnorm import GroupNorm
from .ws import WSConv1d, WSConv2d, WSConv3d, standardize_weight

__all__ = [
    "GroupNorm", "BatchNorm", "BatchRenorm", "SyncBatchNorm", "WSConv1d", "WSConv2d", "WSConv3d",
    "standardize_weight", "norm_layer", "get_norm_layer", "register_norm", "split_ws",
    "NORM_KINDS", "convert_norms", "is_norm", "set_virtual_batch", "uses_batch_stats",
    "worker_batch_norm", "per_chunk_batch_norm",
]
