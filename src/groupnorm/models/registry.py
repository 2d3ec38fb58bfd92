"""The model registry: name → builder, and ``create_model`` (timm-style one-line variants)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from .resnet import BasicBlock, Bottleneck, CifarResNet, ResNet
from .simplenet import SimpleNet
from .vgg import VGG, VGG16_CFG
from .video import VideoResNet

__all__ = ["create_model", "list_models", "register_model", "MODELS"]

#: name → builder(num_classes=, in_channels=, norm=, small_input=, zero_init_residual=, width=,
#: **norm_options). A variant is one line.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "simplenet": functools.partial(SimpleNet, 2),
    "simplenetv2": functools.partial(SimpleNet, 3),
    "resnet20": functools.partial(CifarResNet, 20),
    "resnet32": functools.partial(CifarResNet, 32),
    "resnet56": functools.partial(CifarResNet, 56),
    "resnet110": functools.partial(CifarResNet, 110),
    "resnet18": functools.partial(ResNet, BasicBlock, [2, 2, 2, 2]),
    "resnet34": functools.partial(ResNet, BasicBlock, [3, 4, 6, 3]),
    "resnet50": functools.partial(ResNet, Bottleneck, [3, 4, 6, 3]),
    "resnet101": functools.partial(ResNet, Bottleneck, [3, 4, 23, 3]),
    "vgg16": functools.partial(VGG, VGG16_CFG),
    "r3d_10": functools.partial(VideoResNet, [1, 1, 1, 1]),
    "r3d_18": functools.partial(VideoResNet, [2, 2, 2, 2]),
}

#: Models that take clips (N, C, T, H, W) rather than images (N, C, H, W).
VIDEO_MODELS = ("r3d_10", "r3d_18")


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add a model: ``builder(num_classes=, in_channels=, norm=, **kw) -> nn.Module``."""
    MODELS[name] = builder


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int, in_channels: int = 3, norm: Any = "gn", *,
                 zero_init_residual: bool = True, small_input: bool | None = None,
                 width: int | None = None, **norm_options: Any) -> nn.Module:
    """Build a registered model with the given normalization, initialized as in the GN paper.

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs.
        in_channels: input channels (1 for Fashion-MNIST, 3 for CIFAR).
        norm: ``"bn" | "gn" | "ln" | "in" | "brn" | "syncbn" | "none"``, optionally with
            ``"+ws"`` (Weight-Standardized convs), or a class / partial taking ``num_channels``.
        zero_init_residual: γ=0 on the last norm of each residual block.
        small_input: ImageNet ResNets / VGG / R3D: 3x3 stride-1 stem (and no max-pool) for
            28-32 px inputs. None: the model's default (ImageNet stem; the CIFAR nets and
            SimpleNets are small-input nets already).
        width: base width (stem channels) to shrink or widen a model; None: the paper's.
        **norm_options: passed to the norm factory, e.g. ``num_groups=32``, ``group_size=16``.

    Example::

        >>> m = create_model("resnet20", 10, norm="gn", num_groups=8)
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, norm=norm,
                        small_input=small_input, zero_init_residual=zero_init_residual,
                        width=width, **norm_options)
