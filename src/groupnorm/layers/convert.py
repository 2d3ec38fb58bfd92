"""Model surgery: swap every normalization layer of a model for another kind of the family."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .factory import get_norm_layer, is_group_norm_class, split_ws
from .groupnorm import GroupNorm

__all__ = ["convert_norms", "is_norm"]

_FAMILY = (_BatchNorm, _InstanceNorm, nn.GroupNorm, GroupNorm)


def is_norm(module: nn.Module) -> bool:
    """True for the layers :func:`convert_norms` replaces: BN/SyncBN/BRN, IN, GN (torch or ours)."""
    return isinstance(module, _FAMILY)


def _channels(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise TypeError(f"cannot tell the channel count of {type(module).__name__}")


def _convert_one(path: str, old: nn.Module, to: Any, num_groups: int | None,
                 group_size: int | None, on_indivisible: str, options: dict) -> nn.Module:
    c = _channels(old)
    opts = dict(options)
    name = split_ws(to)[0] if isinstance(to, str) else None
    if name in ("gn", "groupnorm") or is_group_norm_class(to):
        # Exactly one of the two is set (convert_norms clears num_groups when group_size is given).
        key, value = ("group_size", group_size) if group_size is not None else (
            "num_groups", 32 if num_groups is None else num_groups)
        if c % value:
            if on_indivisible != "gcd":
                raise ValueError(
                    f"cannot convert {path} ({type(old).__name__}, {c} channels) to GN with "
                    f"{key}={value}: {c} is not divisible by {value}; pass "
                    f"on_indivisible='gcd' ({key} {math.gcd(value, c)}) or another {key}")
            value = math.gcd(value, c)
        opts[key] = value
    new = get_norm_layer(to, strict=False, **opts)(c)
    ref = getattr(old, "weight", None)
    if ref is None:
        ref = getattr(old, "running_mean", None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(old, attr, None), getattr(new, attr, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) \
                    and src.shape == dst.shape:
                dst.copy_(src)
    new.train(old.training)
    return new


def convert_norms(
    model: nn.Module,
    to: Any = "gn",
    num_groups: int | None = 32,
    group_size: int | None = None,
    on_indivisible: str = "error",
    **options: Any,
) -> nn.Module:
    """Replace every norm layer of ``model`` (recursively) by ``to``; returns the new model.

    Replaces ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``InstanceNorm*d``, ``nn.GroupNorm`` and
    this package's BN / Batch Renorm / SyncBN / GroupNorm. γ and β are carried over (and running
    statistics, when both are batch-statistics norms). Children are replaced in place; when
    ``model`` itself is a norm, the new layer is returned — always use the return value.

    Args:
        model: the module to convert.
        to: the target kind: a name of the family ("gn", "bn", "syncbn", ...), a class or partial.
        num_groups: G for ``to="gn"`` or a GroupNorm class (default 32).
        group_size: channels per group for ``to="gn"`` (or our GroupNorm), instead of
            ``num_groups``.
        on_indivisible: ``"error"`` (name the module and numbers) or ``"gcd"`` (use
            gcd(G, C) groups, as opacus does).
        **options: other options of the target kind (eps, momentum, ...).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU())
        >>> model = convert_norms(model, to="gn", num_groups=32)
    """
    if on_indivisible not in ("error", "gcd"):
        raise ValueError(f"on_indivisible must be 'error' or 'gcd', got {on_indivisible!r}")
    if group_size is not None:
        num_groups = None

    def walk(module: nn.Module, prefix: str) -> nn.Module:
        if is_norm(module):
            return _convert_one(prefix or "<root>", module, to, num_groups, group_size,
                                on_indivisible, options)
        for name, child in list(module.named_children()):
            new = walk(child, f"{prefix}.{name}" if prefix else name)
            if new is not child:
                setattr(module, name, new)
        return module

    return walk(model, "")
