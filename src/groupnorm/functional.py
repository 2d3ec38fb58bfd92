"""``group_norm``: input validation, group resolution and backend dispatch.

Every public entry point (the ``GroupNorm`` layer, the family factory, the models) reaches the
operator through :func:`group_norm`, so the checks below are the single place where bad input is
turned into an error that names the offending values.
"""

from __future__ import annotations

import math
import warnings

import torch

from . import kernels
from .reference import ACTIVATIONS, apply_activation, group_norm_reference, memory_format_of

__all__ = ["group_norm", "resolve_num_groups", "BACKENDS"]

#: Names accepted by ``backend=``. "reference" is the float64-capable oracle, "torch" is aten,
#: "triton" / "cpu" are the fast kernels, "auto" picks per device and layout.
BACKENDS = ("auto", "reference", "torch", "triton", "cpu")


def resolve_num_groups(num_channels: int, num_groups: int | None = None,
                       group_size: int | None = None) -> int:
    """Return G from exactly one of ``num_groups`` / ``group_size`` (channels per group).

    Raises ``ValueError`` naming the numbers when both or neither is given or when the channel
    count is not divisible.
    """
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "pass exactly one of num_groups / group_size, got "
            f"num_groups={num_groups!r}, group_size={group_size!r}")
    by_size = group_size is not None
    name, value = ("group_size", group_size) if by_size else ("num_groups", num_groups)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_channels % value:
        hint = "a divisor" if by_size else "group_size= or a divisor"
        raise ValueError(
            f"num_channels ({num_channels}) must be divisible by {name} ({value}); "
            f"pass {hint} of {num_channels} such as {_nearest_divisor(num_channels, value)}")
    return num_channels // value if by_size else value


def _nearest_divisor(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def _check_inputs(x: torch.Tensor, num_channels: int, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, residual: torch.Tensor | None,
                  activation: str | None, eps: float) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"x must have shape (N, C) or (N, C, *spatial) with 1-3 spatial dims (ndim 2-5); "
            f"got ndim={x.dim()} with shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"x must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}; "
            "convert it first, e.g. x.float()")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (num_channels,):
            raise ValueError(
                f"{name} must have shape ({num_channels},) to match C={num_channels} of x "
                f"{tuple(x.shape)}, got {tuple(p.shape)}")
        if not p.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {p.dtype}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _torch_backend(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, activation: str | None,
                   residual: torch.Tensor | None) -> torch.Tensor:
    fmt = memory_format_of(x)
    if x.device.type == "cpu" and fmt is not torch.contiguous_format:
        # aten's CPU channels-last kernel takes E[x²]−E[x]² in fp32: at a mean offset of 1e4 its
        # relative error is ~300 (tests/test_functional.py). Its NCHW kernel is robust, so go
        # through NCHW and come back; the copies are the price of a right answer.
        x = x.contiguous()
        residual = residual.contiguous() if residual is not None else None
    # aten directly: F.group_norm's "more than 1 value per channel" check is BatchNorm's concern
    # and wrongly refuses (1, C, 1, 1), where each group still has C/G values.
    y = torch.group_norm(x, num_groups, weight, bias, eps)
    if residual is not None:
        y = y + residual
    y = apply_activation(y, activation)
    # aten's CUDA kernel returns NCHW for channels_last input; keep the caller's layout.
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


_warned_fallback: set[str] = set()


def group_norm(
    x: torch.Tensor,
    num_groups: int | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Group Normalization over a mini-batch, optionally fused with a residual add and activation.

    Computes ``y = act(GN(x) * weight + bias + residual)`` where GN normalizes each sample over
    groups of ``C / G`` channels and all spatial positions:
    :math:`\hat x = (x - \mu_{n,g}) / \sqrt{\sigma^2_{n,g} + \epsilon}` with the *biased*
    variance. Statistics are computed in fp32 for fp16/bf16 input; the output has x's dtype and
    memory format.

    Args:
        x: input of shape (N, C) or (N, C, *spatial) with 1-3 spatial dims.
        num_groups: G, the number of groups (C must be divisible by it).
        weight: per-channel γ of shape (C,), or None.
        bias: per-channel β of shape (C,), or None.
        eps: added to the variance for numerical stability.
        group_size: channels per group, as an alternative to ``num_groups`` (exactly one).
        activation: None, ``"relu"``, ``"silu"`` or ``"gelu"`` applied last.
        residual: a tensor of x's shape added before the activation.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"cpu"``.

    Example:
        >>> x = torch.randn(2, 64, 8, 8)
        >>> group_norm(x, num_groups=32).shape
        torch.Size([2, 64, 8, 8])
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        num_channels = x.shape[1]
    else:
        num_channels = -1
    _check_inputs(x, num_channels, weight, bias, residual, activation, eps)
    g = resolve_num_groups(num_channels, num_groups, group_size)
    if x.numel() == 0:
        # N = 0 (or an empty spatial axis): an empty result; aten gives x, γ and β (zero)
        # gradients as torch.nn.GroupNorm does.
        return _torch_backend(x, g, weight, bias, eps, activation, residual)
    if backend == "reference":
        return group_norm_reference(x, g, weight, bias, eps, activation, residual)
    if backend == "auto":
        backend = kernels.auto_backend(x, g, activation, residual)
        if backend in ("triton", "cpu"):
            try:
                return kernels.group_norm_fast(backend, x, g, weight, bias, eps, activation,
                                               residual)
            except kernels.BackendUnavailable as err:
                if backend not in _warned_fallback:
                    _warned_fallback.add(backend)
                    warnings.warn(f"groupnorm: backend {backend!r} unavailable ({err}); "
                                  "using torch", stacklevel=2)
                backend = "torch"
    if backend == "torch":
        return _torch_backend(x, g, weight, bias, eps, activation, residual)
    return kernels.group_norm_fast(backend, x, g, weight, bias, eps, activation, residual)
