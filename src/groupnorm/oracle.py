"""The paper's formula in plain eager ops: the oracle every backend is checked against.

Wu & He (2018), Eq. (1)-(3) with the group set of Eq. (7): for x of shape (N, C, *spatial),
reshape to (N, G, C/G * prod(spatial)), take the mean and the *biased* variance over the last
axis, normalize with eps, then apply the per-channel affine γ, β. This module keeps that literal
form (two-pass statistics, no fusion) so that it is obviously right; run it on float64 inputs to
get the reference that tolerances are measured against.
"""

from __future__ import annotations

import torch

from .activations import apply_activation
from .layout import memory_format_of

__all__ = ["group_norm_reference"]


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm by the paper's formula; statistics in fp32 (or fp64 for fp64 input).

    No validation happens here (``groupnorm.group_norm`` does it); the output has x's dtype and
    memory format.
    """
    n, c = x.shape[0], x.shape[1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = x.to(compute).reshape(n, num_groups, -1)  # (N, G, C/G * prod(spatial))
    mean = xg.mean(dim=-1, keepdim=True)  # (N, G, 1)
    var = (xg - mean).pow(2).mean(dim=-1, keepdim=True)  # biased, two-pass
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute).reshape(affine_shape)
    if bias is not None:
        y = y + bias.to(compute).reshape(affine_shape)
    if residual is not None:
        y = y + residual.to(compute)
    y = apply_activation(y, activation)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))

