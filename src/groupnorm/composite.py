"""GroupNorm as a composite of aten ops: the "torch" backend, and the fast backends' fallback.

Two functions, both differentiable in every autograd mode because they are made of aten ops
whose derivative formulas (double backward, forward AD) and batching rules torch has:

- :func:`group_norm_composite`: y = act(F.group_norm(x)·γ + β + residual). ``F.group_norm``,
  not ``torch.group_norm``, so that tensor subclasses that hook it (ExpandedWeights, the
  per-sample gradients Opacus relies on) see it.
- :func:`group_norm_backward_composite`: (dx, dγ, dβ, dresidual) written out as tensor ops, what
  the fast backends' backward returns when it must itself be differentiable
  (``create_graph=True``) or batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import activation_grad, apply_activation
from .layout import contiguous_keep_grad_format, is_transformed, memory_format_of

__all__ = ["group_norm_composite", "group_norm_backward_composite"]


def group_norm_composite(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                         eps: float, activation: str | None, residual: Tensor | None, *,
                         keep_format: bool = True) -> Tensor:
    """GroupNorm (+ residual + activation) through ``F.group_norm``; inputs already validated.

    ``keep_format``: route channels-last input through NCHW and give y and dx back in x's
    format (eager calls). Off under transforms and tracing, which then see exactly the ops of
    ``torch.nn.GroupNorm``.
    """
    fmt = memory_format_of(x) if keep_format else torch.contiguous_format
    if fmt is not torch.contiguous_format:
        # aten's CPU channels-last kernel takes E[x²]−E[x]² in fp32: at a mean offset of 1e4 its
        # relative error is ~300 (tests/test_functional.py). Its NCHW kernel is robust, so go
        # through NCHW and come back; the copies are the price of a right answer (on CUDA aten
        # copies to NCHW itself).
        x = contiguous_keep_grad_format(x)
        residual = contiguous_keep_grad_format(residual) if residual is not None else None
    if keep_format and x.numel() == num_groups:
        # One value per group: F.group_norm refuses ("more than 1 value per channel", a
        # BatchNorm check); the aten op gives the well-defined x̂ = 0.
        y = torch.group_norm(x, num_groups, weight, bias, eps)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    if residual is not None:
        y = y + residual
    y = apply_activation(y, activation)
    return y if fmt is torch.contiguous_format else y.contiguous(memory_format=fmt)


def group_norm_backward_composite(
    dy: Tensor, x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float,
    activation: str | None, residual: Tensor | None, needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dγ, dβ, dresidual) of y = act(GN(x)·γ + β + residual) in differentiable aten ops.

    With x̂ = (x − mean)·rstd per (sample, group) of M values and dz = dy·act'(z):
    dβ = Σ dz, dγ = Σ dz·x̂ (over N and space), dresidual = dz, and
    dx = rstd·(g − mean_M(g) − x̂·mean_M(g·x̂)) with g = dz·γ. Everything is recomputed from x,
    so autograd differentiates this once more exactly (double backward). ``residual`` is needed
    only with an activation (act' needs z). Statistics in fp32 (fp64 for fp64 x), as the kernels.
    ``needs`` says which of the four gradients to return (the others are None).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, c = x.shape[0], x.shape[1]
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    reduce_dims = [0, *range(2, x.dim())]
    xg = x.to(acc).reshape(n, num_groups, -1)  # (N, G, C/G·spatial)
    mean = xg.mean(dim=-1, keepdim=True)
    xc = xg - mean
    rstd = torch.rsqrt(xc.square().mean(dim=-1, keepdim=True) + eps)
    xhat = (xc * rstd).reshape(x.shape)
    w = weight.to(acc).reshape(per_channel)
    dz = dy.to(acc)
    if activation is not None:
        z = xhat * w + bias.to(acc).reshape(per_channel)
        if residual is not None:
            z = z + residual.to(acc)
        dz = dz * activation_grad(z, activation)
    dx = dw = db = dres = None
    if needs[0]:
        g = (dz * w).reshape(n, num_groups, -1)
        xh = xhat.reshape(n, num_groups, -1)
        dxg = rstd * (g - g.mean(dim=-1, keepdim=True)
                      - xh * (g * xh).mean(dim=-1, keepdim=True))
        dx = dxg.reshape(x.shape).to(x.dtype)
        if not is_transformed(dy):  # a batched dy has no layout to ask (x's is what counts)
            fmt = memory_format_of(x)
            if fmt is not torch.contiguous_format:
                dx = dx.contiguous(memory_format=fmt)
    if needs[1]:
        dw = (dz * xhat).sum(dim=reduce_dims).to(weight.dtype)
    if needs[2]:
        db = dz.sum(dim=reduce_dims).to(bias.dtype)
    if needs[3]:
        dres = dz.to(dy.dtype) if activation is not None else dy
    return dx, dw, db, dres
