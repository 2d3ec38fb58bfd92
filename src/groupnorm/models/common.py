"""What every model shares: norm/conv resolution (with the "+ws" suffix) and the paper's init."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..layers import WSConv2d, WSConv3d, get_norm_layer, split_ws

__all__ = ["resolve_norm", "init_weights", "has_affine", "NormLayer", "ConvLayer"]

NormLayer = Callable[[int], nn.Module]  # num_channels -> norm module
ConvLayer = type[nn.Conv2d] | type[nn.Conv3d]

_GN_GROUP_OPTIONS = ("num_groups", "group_size", "on_indivisible")


def resolve_norm(norm: Any, dims: int = 2, **norm_options: Any) -> tuple[NormLayer, ConvLayer]:
    """Resolve a model's ``norm`` once: ``(make_norm(num_channels), conv class)``.

    ``norm`` is anything :func:`groupnorm.get_norm_layer` takes; a ``"+ws"`` suffix swaps the
    convolutions for Weight-Standardized ones (``WSConv2d`` / ``WSConv3d``). For ``"gn"`` with no
    group option, a layer whose width is not divisible by 32 gets G = gcd(32, C) (e.g. 16 groups
    for the 16-channel stage of a CIFAR ResNet, i.e. InstanceNorm there) instead of an error; pass
    ``num_groups``/``group_size``/``on_indivisible`` to choose otherwise.
    """
    kind, ws = split_ws(norm)
    if kind in ("gn", "groupnorm") and not any(k in norm_options for k in _GN_GROUP_OPTIONS):
        norm_options = {**norm_options, "on_indivisible": "gcd"}
    make_norm = get_norm_layer(kind, **norm_options)
    if dims == 2:
        conv: ConvLayer = WSConv2d if ws else nn.Conv2d
    elif dims == 3:
        conv = WSConv3d if ws else nn.Conv3d
    else:
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    return make_norm, conv


def has_affine(norm: nn.Module) -> bool:
    """True if the norm has a learnable per-channel scale γ (False for Identity, affine=False)."""
    return isinstance(getattr(norm, "weight", None), torch.Tensor)


def conv_norm(conv: ConvLayer, make_norm: NormLayer, cin: int, cout: int, kernel_size: Any,
              stride: Any = 1, padding: Any = 0) -> tuple[nn.Module, nn.Module]:
    """A convolution and the norm after it; the conv has a bias only where there is no norm."""
    norm = make_norm(cout)
    bias = isinstance(norm, nn.Identity)
    return conv(cin, cout, kernel_size, stride=stride, padding=padding, bias=bias), norm


def init_weights(model: nn.Module, zero_init_residual: bool = True) -> None:
    """The GN paper's init: He (fan_out) convs, γ=1 and β=0 norms, γ=0 ending residual blocks.

    Linear layers get N(0, 0.01) weights and zero bias (Goyal et al. 2017, used by the paper).
    Norms are recognised as non-conv/linear modules owning a 1-D ``weight``; norms without γ
    (``nn.Identity``, ``affine=False``) are left alone. Blocks that end a residual branch expose
    ``zero_init_last()``, which zeroes that branch's last γ so each block starts as the identity.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            w = m._parameters.get("weight")
            if isinstance(w, torch.Tensor) and w.dim() == 1:
                nn.init.ones_(w)
                b = m._parameters.get("bias")
                if isinstance(b, torch.Tensor):
                    nn.init.zeros_(b)
    if zero_init_residual:
        for m in model.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()
