"""groupnorm: Group Normalization (Wu & He, ECCV 2018) — operator, family, models, harness.

Quickstart::

    import torch, groupnorm
    y = groupnorm.group_norm(torch.randn(8, 64, 32, 32), num_groups=32)
    layer = groupnorm.GroupNorm(32, 64)            # drop-in for torch.nn.GroupNorm
    norm = groupnorm.norm_layer("bn", 64)          # the family behind one factory
"""

from .functional import BACKENDS, group_norm, resolve_num_groups
from .layers import (
    NORM_KINDS,
    BatchNorm,
    BatchRenorm,
    GroupNorm,
    SyncBatchNorm,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    convert_norms,
    get_norm_layer,
    is_norm,
    norm_layer,
    register_norm,
    set_virtual_batch,
    split_ws,
    standardize_weight,
    uses_batch_stats,
)
from .oracle import group_norm_reference

__version__ = "0.1.0"

__all__ = [
    "group_norm", "group_norm_reference", "resolve_num_groups", "BACKENDS", "GroupNorm",
    "BatchNorm", "BatchRenorm", "SyncBatchNorm", "WSConv1d", "WSConv2d", "WSConv3d",
    "standardize_weight", "norm_layer", "get_norm_layer", "register_norm", "split_ws",
    "NORM_KINDS", "convert_norms", "is_norm", "set_virtual_batch", "uses_batch_stats",
    "__version__",
]
