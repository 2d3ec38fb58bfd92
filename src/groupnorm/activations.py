"""The activations the operator can fuse after GroupNorm, and their derivatives in aten ops.

y = act(GN(x)·γ + β + residual). Names are what ``activation=`` accepts; the integer codes are
what the fast kernels take (0 = none).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "ACT_CODES", "ACT_NAMES", "apply_activation", "activation_grad"]

#: Activations the fused variants support: y = act(GN(x)·γ + β + residual).
ACTIVATIONS = ("relu", "silu", "gelu")
#: activation name -> the fast kernels' code
ACT_CODES: dict[str | None, int] = {None: 0, "relu": 1, "silu": 2, "gelu": 3}
#: the fast kernels' code -> activation name
ACT_NAMES: dict[int, str | None] = {code: name for name, code in ACT_CODES.items()}

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def apply_activation(y: Tensor, activation: str | None) -> Tensor:
    """Apply one of :data:`ACTIVATIONS` (or none) — exact-erf GELU, as torch's default."""
    if activation is None:
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(z: Tensor, activation: str | None) -> Tensor | None:
    """d act(z) / dz as differentiable aten ops (None for no activation: the derivative is 1).

    The same formulas as the kernels' ``_act_grad``; written as tensor ops so that autograd can
    differentiate them once more (double backward through the fast backends).
    """
    if activation is None:
        return None
    if activation == "relu":
        return (z > 0).to(z.dtype)  # its derivative is 0 almost everywhere, as torch's
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
        return cdf + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
