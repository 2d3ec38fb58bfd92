"""One factory for the normalization family: a model takes its norm as a name, class or partial.

``get_norm_layer(kind, **options)`` resolves once (the model's constructor) and returns a
callable ``num_channels -> nn.Module``; ``norm_layer(kind, C, **options)`` builds one layer.

========  ===========================================================  =====================
kind      layer                                                        options
========  ===========================================================  =====================
"bn"      :class:`BatchNorm` (1d/2d/3d by input rank, virtual workers)  eps, momentum, affine,
                                                                        track_running_stats,
                                                                        virtual_batch, dim
"gn"      :class:`GroupNorm` (default G = 32)                           num_groups, group_size,
                                                                        eps, affine, activation,
                                                                        backend, on_indivisible
"ln"      GroupNorm with G = 1: LayerNorm over (C, *spatial), the paper's LN
"in"      GroupNorm with G = C (affine): InstanceNorm
"brn"     :class:`BatchRenorm`                                          r_max, d_max, warm-up
"syncbn"  :class:`SyncBatchNorm` (CPU and GPU)                          process_group, ...
"none"    ``nn.Identity``
========  ===========================================================  =====================

A ``"+ws"`` suffix (``"gn+ws"``) names the norm *plus* Weight-Standardized convolutions; the
factory builds the norm part and models ask :func:`split_ws` whether to use ``WSConv*d``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from .batchnorm import BatchNorm, BatchRenorm, SyncBatchNorm
from .groupnorm import GroupNorm

__all__ = ["norm_layer", "get_norm_layer", "split_ws", "is_group_norm_class", "NORM_KINDS",
           "register_norm"]


def _bn(num_channels: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True,
        virtual_batch: int | None = None, dim: int | None = None, device: Any = None,
        dtype: Any = None) -> nn.Module:
    return BatchNorm(num_channels, eps, momentum, affine, track_running_stats,
                     virtual_batch=virtual_batch, dim=dim, device=device, dtype=dtype)


def _gn(num_channels: int, *, num_groups: int | None = None, group_size: int | None = None,
        eps: float = 1e-5, affine: bool = True, activation: str | None = None,
        backend: str = "auto", on_indivisible: str = "error", device: Any = None,
        dtype: Any = None) -> nn.Module:
    if num_groups is None and group_size is None:
        num_groups = 32
    if on_indivisible not in ("error", "gcd"):
        raise ValueError(f"on_indivisible must be 'error' or 'gcd', got {on_indivisible!r}")
    if on_indivisible == "gcd":
        if group_size is not None:
            group_size = math.gcd(group_size, num_channels)
        else:
            assert num_groups is not None
            num_groups = math.gcd(num_groups, num_channels)
    return GroupNorm(num_groups, num_channels, eps, affine, group_size=group_size,
                     activation=activation, backend=backend, device=device, dtype=dtype)


def _ln(num_channels: int, *, eps: float = 1e-5, affine: bool = True, backend: str = "auto",
        device: Any = None, dtype: Any = None) -> nn.Module:
    return GroupNorm(1, num_channels, eps, affine, backend=backend, device=device, dtype=dtype)


def _in(num_channels: int, *, eps: float = 1e-5, affine: bool = True, backend: str = "auto",
        device: Any = None, dtype: Any = None) -> nn.Module:
    return GroupNorm(num_channels, num_channels, eps, affine, backend=backend, device=device,
                     dtype=dtype)


def _brn(num_channels: int, *, eps: float = 1e-5, momentum: float | None = 0.01,
         affine: bool = True, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000,
         r_max_steps: int = 40000, d_max_steps: int = 25000, virtual_batch: int | None = None,
         dim: int | None = None, device: Any = None, dtype: Any = None) -> nn.Module:
    return BatchRenorm(num_channels, eps, momentum, affine, r_max=r_max, d_max=d_max,
                       warmup_steps=warmup_steps, r_max_steps=r_max_steps,
                       d_max_steps=d_max_steps, virtual_batch=virtual_batch, dim=dim,
                       device=device, dtype=dtype)


def _syncbn(num_channels: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
            affine: bool = True, track_running_stats: bool = True, process_group: Any = None,
            virtual_batch: int | None = None, dim: int | None = None, device: Any = None,
            dtype: Any = None) -> nn.Module:
    return SyncBatchNorm(num_channels, eps, momentum, affine, track_running_stats,
                         process_group=process_group, virtual_batch=virtual_batch, dim=dim,
                         device=device, dtype=dtype)


def _none(num_channels: int) -> nn.Module:
    return nn.Identity()


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "bn": _bn, "gn": _gn, "ln": _ln, "in": _in, "brn": _brn, "syncbn": _syncbn, "none": _none,
}
_ALIASES = {"batchnorm": "bn", "groupnorm": "gn", "layernorm": "ln", "instancenorm": "in",
            "batchrenorm": "brn", "identity": "none", "": "none"}

#: The names ``norm_layer`` accepts (plus a ``"+ws"`` suffix).
NORM_KINDS = tuple(_REGISTRY)


def register_norm(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add a kind: ``builder(num_channels, **options) -> nn.Module``."""
    _REGISTRY[name.lower()] = builder


def split_ws(kind: Any) -> tuple[Any, bool]:
    """Split a ``"+ws"`` suffix off a norm name: ``"gn+ws" -> ("gn", True)``."""
    if isinstance(kind, str):
        k = kind.strip().lower()
        if k.endswith("+ws"):
            return k[: -len("+ws")], True
        return k, False
    return kind, False


def _accepted(builder: Callable[..., Any]) -> set[str] | None:
    """Keyword options a builder takes (None: it takes **kwargs, so anything)."""
    target = builder.func if isinstance(builder, functools.partial) else builder
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def is_group_norm_class(kind: Any) -> bool:
    """True for ``torch.nn.GroupNorm``, this package's :class:`GroupNorm` and their subclasses."""
    return isinstance(kind, type) and issubclass(kind, nn.GroupNorm | GroupNorm)


def _group_norm_builder(cls: type) -> Callable[..., nn.Module]:
    """``make(num_channels, **options)`` for a GroupNorm class, whose first argument is G."""
    def build(num_channels: int, **options: Any) -> nn.Module:
        default = None if options.get("group_size") is not None else 32
        return cls(options.pop("num_groups", default), num_channels, **options)

    build.__name__ = cls.__name__
    return build


def get_norm_layer(kind: Any = "gn", *, strict: bool = True,
                   **options: Any) -> Callable[[int], nn.Module]:
    """Resolve a norm kind once; return ``make(num_channels) -> nn.Module``.

    Args:
        kind: a name from :data:`NORM_KINDS` (optionally with ``"+ws"``), an ``nn.Module``
            subclass called as ``kind(num_channels, **options)`` (a GroupNorm class as
            ``kind(num_groups, num_channels, **options)``, G = 32 unless given), a
            ``functools.partial`` or any callable of that form, or None (no norm).
        strict: if False, silently drop options the kind does not take (a sweep that sets
            ``num_groups`` for every norm); if True, such options are an error.
        **options: passed to the layer's constructor.
    """
    if kind is None:
        kind = "none"
    if isinstance(kind, str):
        name, _ = split_ws(kind)
        name = _ALIASES.get(name, name)
        if name not in _REGISTRY:
            raise ValueError(
                f"unknown norm kind {kind!r}; choose one of {sorted(_REGISTRY)} "
                "(optionally with a '+ws' suffix), or pass a class or partial")
        builder: Callable[..., nn.Module] = _REGISTRY[name]
        label = name
        accepted = _accepted(builder)
    elif is_group_norm_class(kind):
        builder, label, accepted = _group_norm_builder(kind), kind.__name__, _accepted(kind)
    elif callable(kind):
        builder, label = kind, getattr(kind, "__name__", repr(kind))
        accepted = _accepted(builder)
    else:
        raise TypeError(f"norm kind must be a string, a class or a callable, got {kind!r}")
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown and strict:
            raise TypeError(
                f"norm {label!r} got unknown option(s) {unknown}; it takes "
                f"{sorted(accepted - {'num_channels', 'num_features'})}")
        options = {k: v for k, v in options.items() if k in accepted}
    return functools.partial(builder, **options)


def norm_layer(kind: Any, num_channels: int, **options: Any) -> nn.Module:
    """Build one normalization layer of ``kind`` for ``num_channels`` channels.

    Example::

        >>> norm_layer("gn", 64, num_groups=32)
        GroupNorm(32, 64, eps=1e-05, affine=True)
        >>> norm_layer("bn", 64)(torch.randn(8, 64, 4, 4, 4)).shape  # 3D input, BN3d semantics
        torch.Size([8, 64, 4, 4, 4])
    """
    return get_norm_layer(kind, **options)(num_channels)
