"""Which autograd and tracing modes are active: the checks that send a call to the composite path.

The fast kernels compute y and first-order gradients of plain tensors. Everything else — a
``torch.func`` transform, forward-mode AD, a dispatch mode (``make_fx``, FakeTensor, non-strict
export, FlopCounter), ``torch.export``, ``torch.jit.trace`` (the TorchScript ONNX exporter), a
second derivative — must run on aten ops, whose derivative formulas and batching rules torch
already has. These checks read a few interpreter flags: about a microsecond per call.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor
from torch._C import _functorch

from .layout import is_transformed

__all__ = ["composite_reason", "backward_needs_composite", "TRANSFORM", "FORWARD_AD"]

#: composite_reason() for a torch.func transform (grad, vmap, jvp, jacrev, jacfwd, ...)
TRANSFORM = "a torch.func transform"
#: composite_reason() inside torch.autograd.forward_ad.dual_level()
FORWARD_AD = "forward-mode AD"


def composite_reason(x: Tensor) -> str | None:
    """Why a forward on x must take the composite path, or None when the fast kernels may run.

    Under ``torch.compile`` (not export) the fast backends are custom ops with fake and
    autograd kernels, so the call stays on them (dynamo cannot answer the functorch query: it
    reports a transform even where there is none).
    """
    if torch.compiler.is_compiling():
        return "torch.export" if torch.compiler.is_exporting() else None
    if _functorch.peek_interpreter_stack() is not None:
        return TRANSFORM
    if _fwad._current_level >= 0:  # inside forward_ad.dual_level(): tangents may be attached
        return FORWARD_AD
    if torch._C._len_torch_dispatch_stack() > 0:
        return "a dispatch mode (make_fx, FakeTensor, export tracing)"
    if torch.jit.is_tracing():
        return "torch.jit.trace (TorchScript ONNX export)"
    if _functorch.is_legacy_batchedtensor(x):
        return TRANSFORM
    return None


def backward_needs_composite(grad: Tensor) -> bool:
    """Whether a fast backend's backward must be computed with differentiable aten ops.

    True for ``create_graph=True`` (grad mode is on inside backward), batched gradients
    (``is_grads_batched``, ``torch.func`` over the backward) and dispatch modes. Under
    ``torch.compile`` AOTAutograd traces the backward with grad mode off, and refuses double
    backward itself, so the fast backward op stays.
    """
    if torch.compiler.is_compiling():
        return False
    return (torch.is_grad_enabled() or _functorch.peek_interpreter_stack() is not None
            or torch._C._len_torch_dispatch_stack() > 0 or is_transformed(grad))
