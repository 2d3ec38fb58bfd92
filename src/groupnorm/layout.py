"""Memory formats: which one a tensor is laid out in, and changing it without losing it.

The one module that answers layout questions for the operator (the dispatch, the composite
torch path, the oracle, the fast kernels' launchers). Every query here is safe under
``torch.func`` transforms, where a batched tensor refuses ``is_contiguous``: such tensors report
the plain contiguous format, and the callers then leave the layout alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C import _functorch

__all__ = ["memory_format_of", "is_channels_last", "dense_layout", "strides_like",
           "is_transformed", "contiguous_keep_grad_format"]


def is_transformed(t: Tensor) -> bool:
    """Whether t is a ``torch.func`` / legacy-vmap wrapper (batched, grad-tracking, dual...).

    Such a tensor has no storage of its own and refuses layout queries; code that sees one must
    run on plain aten ops. Under ``torch.compile`` the answer is False: dynamo cannot call these
    checks, and :func:`groupnorm.modes.composite_reason` has already sent transforms elsewhere.
    """
    if torch.compiler.is_compiling():
        return False
    return _functorch.is_functorch_wrapped_tensor(t) or _functorch.is_legacy_batchedtensor(t)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format x is laid out in (channels_last / channels_last_3d / contiguous).

    A tensor inside a ``torch.func`` transform reports ``contiguous_format`` (it cannot be
    asked; its layout is the transform's business).
    """
    if x.dim() not in (4, 5) or is_transformed(x) or x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def is_channels_last(x: Tensor) -> bool:
    """True when x is dense channels-last (NHWC / NDHWC) and not also plain contiguous."""
    return memory_format_of(x) is not torch.contiguous_format


def dense_layout(x: Tensor) -> Tensor:
    """x itself when it is dense contiguous or channels-last, else a contiguous copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


def strides_like(t: Tensor, x: Tensor) -> Tensor:
    """t (x's shape) with exactly x's strides: itself, or a copy when they differ.

    Two tensors dense in the same layout can still differ in the strides of size-1 dims (e.g.
    a permuted (8, 1, H, W)); the kernels walk both with one set of strides.
    """
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


class _ContiguousKeepGradFormat(torch.autograd.Function):
    """``x.contiguous()`` whose gradient comes back in x's memory format.

    A plain ``.contiguous()`` passes the gradient through unchanged, so an NCHW gradient
    computed after it would reach a channels-last x as NCHW (``torch.autograd.grad`` applies no
    layout contract). Its backward is a plain differentiable op, so double backward goes
    through it. Used on plain eager tensors only: forward AD and ``torch.func`` transforms take
    a plain ``.contiguous()`` (:func:`groupnorm.group_norm`).
    """

    @staticmethod
    def forward(x: Tensor, fmt: torch.memory_format) -> Tensor:
        return x.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.fmt = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        if is_transformed(grad):  # batched gradients (is_grads_batched): no layout to ask
            return grad, None
        return grad.contiguous(memory_format=ctx.fmt), None


def contiguous_keep_grad_format(x: Tensor) -> Tensor:
    """x in the plain contiguous format; its gradient is returned in x's own format."""
    fmt = memory_format_of(x)
    if fmt is torch.contiguous_format:
        return x.contiguous()
    return _ContiguousKeepGradFormat.apply(x, fmt)
