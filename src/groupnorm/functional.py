"""``group_norm``: input validation, group resolution and backend dispatch.

Every public entry point (the ``GroupNorm`` layer, the family factory, the models) reaches the
operator through :func:`group_norm`, so the checks below are the single place where bad input is
turned into an error that names the offending values. The dispatch also owns the fallback to the
composite torch path (:mod:`groupnorm.composite`): for modes the fast kernels do not compute
(:mod:`groupnorm.modes`), for tensor subclasses, and where a fast backend is unavailable.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch.overrides import handle_torch_function, has_torch_function

from . import kernels
from .activations import ACTIVATIONS
from .composite import group_norm_composite
from .layout import contiguous_keep_grad_format, memory_format_of
from .modes import FORWARD_AD, TRANSFORM, composite_reason
from .oracle import group_norm_reference

__all__ = ["group_norm", "resolve_num_groups", "BACKENDS"]

#: Names accepted by ``backend=``. "reference" is the float64-capable oracle, "torch" is aten,
#: "triton" / "cpu" are the fast kernels, "auto" picks per device and layout.
BACKENDS = ("auto", "reference", "torch", "triton", "cpu")


def _positive_int(name: str, value: object) -> int:
    """value as an int when it is a positive integer of any integral type (numpy's too)."""
    if type(value) is int and value > 0:  # the common case, without the ABC check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r} "
                         f"(of type {type(value).__name__})")
    return int(value)


def resolve_num_groups(num_channels: int, num_groups: int | None = None,
                       group_size: int | None = None) -> int:
    """Return G from exactly one of ``num_groups`` / ``group_size`` (channels per group).

    Accepts any integral type (Python or numpy). Raises ``ValueError`` naming the numbers when
    both or neither is given or when the channel count is not divisible.
    """
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "pass exactly one of num_groups / group_size, got "
            f"num_groups={num_groups!r}, group_size={group_size!r}")
    by_size = group_size is not None
    name = "group_size" if by_size else "num_groups"
    value = _positive_int(name, group_size if by_size else num_groups)
    if num_channels % value:
        hint = "a divisor" if by_size else "group_size= or a divisor"
        raise ValueError(
            f"num_channels ({num_channels}) must be divisible by {name} ({value}); "
            f"pass {hint} of {num_channels} such as {_nearest_divisor(num_channels, value)}")
    return num_channels // value if by_size else value


def _nearest_divisor(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def _check_eps(eps: object) -> float:
    if type(eps) is float and 0 <= eps < math.inf:  # the common case, without the ABC check
        return eps
    if (isinstance(eps, bool) or not isinstance(eps, numbers.Real)
            or not (math.isfinite(eps) and eps >= 0)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_dtypes(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  residual: torch.Tensor | None) -> None:
    """torch's rule for γ/β dtypes, enforced on every backend with one message.

    γ and β share x's dtype, or are fp32 for fp16/bf16 x (mixed precision); anything else is an
    error on aten ("mixed dtype (CPU)", no names), so it is one here too, before any backend
    runs, naming both dtypes.
    """
    params = [(name, p.dtype) for name, p in (("weight", weight), ("bias", bias))
              if p is not None]
    dtypes = {d for _, d in params}
    if not dtypes or dtypes == {x.dtype} or (x.dtype in _LOW_PRECISION
                                              and dtypes == {torch.float32}):
        pass
    else:
        got = ", ".join(f"{name} {d}" for name, d in params)
        raise TypeError(
            f"weight/bias dtypes ({got}) do not go with x's dtype {x.dtype}: pass them in "
            f"{x.dtype}" + (" or both in torch.float32" if x.dtype in _LOW_PRECISION else "")
            + f", e.g. weight.to({x.dtype}) (torch.nn.GroupNorm's rule)")
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"residual dtype {residual.dtype} differs from x's dtype {x.dtype}; "
                        f"pass residual.to({x.dtype})")


def _check_inputs(x: torch.Tensor, num_channels: int, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, residual: torch.Tensor | None,
                  activation: str | None) -> None:
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
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; "
                             f"move it with .to({str(x.device)!r})")


_warned_fallback: set[str] = set()
_PLAIN = (torch.Tensor, torch.nn.Parameter)


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
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"cpu"``. Under
            ``torch.func`` transforms, forward AD, ``torch.export``, ONNX export, FX tracing
            and dispatch modes every backend runs the composite aten path (torch's derivatives
            and batching rules); see :mod:`groupnorm.modes`.

    Raises:
        ValueError / TypeError naming the values and the fix, before any work is queued.

    Example:
        >>> x = torch.randn(2, 64, 8, 8)
        >>> group_norm(x, num_groups=32).shape
        torch.Size([2, 64, 8, 8])
    """
    if has_torch_function((x, weight, bias, residual)):
        if any(isinstance(t, torch.fx.Proxy) for t in (x, weight, bias, residual)):
            # torch.fx.symbolic_trace: record this call as one node (it runs this function
            # again, on real tensors, when the GraphModule is called)
            return handle_torch_function(
                group_norm, tuple(t for t in (x, weight, bias, residual) if t is not None),
                x, num_groups, weight, bias, eps, group_size=group_size, activation=activation,
                residual=residual, backend=backend)
        subclass = True  # e.g. ExpandedWeights: they hook F.group_norm, so take that path
    else:
        # subclasses that work below __torch_function__ (DTensor, FakeTensor...) get aten ops too
        subclass = any(t is not None and type(t) not in _PLAIN for t in (x, weight, bias, residual))
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    num_channels = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else -1
    _check_inputs(x, num_channels, weight, bias, residual, activation)
    eps = _check_eps(eps)
    g = resolve_num_groups(num_channels, num_groups, group_size)
    _check_dtypes(x, weight, bias, residual)
    if subclass:
        # ExpandedWeights (per-sample gradients) and other subclasses hook F.group_norm: give
        # them exactly that call (the oracle's casts of γ/β would be refused)
        return group_norm_composite(x, g, weight, bias, eps, activation, residual)
    reason = composite_reason(x)
    if reason is not None:
        # Transforms, forward AD, tracing, export: aten ops only, whatever the backend asked
        # (the fast kernels take plain tensors and have no second derivative or batching rule).
        if reason in (TRANSFORM, FORWARD_AD):
            # A batched tensor (or a dual tensor's batched tangent) cannot be asked its layout;
            # a contiguous copy is always allowed, and it avoids aten's channels-last paths
            # (not robust on CPU; their forward-AD formula fails on channels-last input).
            x = x.contiguous()
            residual = residual.contiguous() if residual is not None else None
        if backend == "reference":
            return group_norm_reference(x, g, weight, bias, eps, activation, residual)
        # traced graphs (export, ONNX, make_fx) get exactly torch.nn.GroupNorm's ops
        return group_norm_composite(x, g, weight, bias, eps, activation, residual,
                                    keep_format=False)
    if x.numel() == 0:
        # N = 0 (or an empty spatial axis): an empty result; aten gives x, γ and β (zero)
        # gradients as torch.nn.GroupNorm does.
        return group_norm_composite(x, g, weight, bias, eps, activation, residual)
    requested = backend
    if backend == "auto":
        backend = kernels.auto_backend(x, g, activation, residual)
    elif backend == "cpu" and x.device.type == "cpu" and not kernels.cpu_ext_ready():
        backend = "torch"  # no compiler: the documented fallback (load_cpu_ext warned once)
    if backend == "torch":
        return group_norm_composite(x, g, weight, bias, eps, activation, residual)
    if backend == "reference":
        fmt = memory_format_of(x)
        if fmt is torch.contiguous_format:
            return group_norm_reference(x, g, weight, bias, eps, activation, residual)
        # through NCHW so that dx comes back in x's format too
        r = contiguous_keep_grad_format(residual) if residual is not None else None
        y = group_norm_reference(contiguous_keep_grad_format(x), g, weight, bias, eps,
                                 activation, r)
        return y.contiguous(memory_format=fmt)
    try:
        return kernels.group_norm_fast(backend, x, g, weight, bias, eps, activation, residual)
    except kernels.BackendUnavailable as err:
        if requested != "auto":
            raise
        if backend not in _warned_fallback:
            _warned_fallback.add(backend)
            warnings.warn(f"groupnorm: backend {backend!r} unavailable ({err}); using torch",
                          stacklevel=2)
        return group_norm_composite(x, g, weight, bias, eps, activation, residual)
