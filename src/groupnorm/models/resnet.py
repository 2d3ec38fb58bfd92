"""ResNets (He et al. 2016) with a pluggable norm: ImageNet (18/34/50/101) and CIFAR (20/32/56/110).

Blocks are dimension-agnostic (``conv`` may be ``nn.Conv3d``), so :mod:`.video` reuses them for
3D ResNets. The ImageNet family is torchvision's "v1.5" (stride on the bottleneck's 3x3), which is
what the GN paper's ResNet-50 numbers are usually compared against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .common import ConvLayer, NormLayer, conv_norm, has_affine, init_weights, resolve_norm

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "CifarResNet"]


def _shortcut(conv: ConvLayer, make_norm: NormLayer, cin: int, cout: int,
              stride: int) -> nn.Module:
    """Identity where the shape is kept; a 1x1 (x1) conv + norm projection where it changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    c, n = conv_norm(conv, make_norm, cin, cout, 1, stride=stride)
    return nn.Sequential(c, n)


class BasicBlock(nn.Module):
    """Two 3x3 convs with norms, plus the shortcut: relu(n2(conv2(relu(n1(conv1 x)))) + sc(x))."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, make_norm: NormLayer,
                 conv: ConvLayer) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv_norm(conv, make_norm, cin, planes, 3, stride, 1)
        self.conv2, self.norm2 = conv_norm(conv, make_norm, planes, planes, 3, 1, 1)
        self.shortcut = _shortcut(conv, make_norm, cin, planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        """γ=0 on the branch's last norm, so the block starts as (relu of) its shortcut."""
        if has_affine(self.norm2):
            nn.init.zeros_(self.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand x4, each with a norm, plus the shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, make_norm: NormLayer,
                 conv: ConvLayer) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.norm1 = conv_norm(conv, make_norm, cin, planes, 1)
        self.conv2, self.norm2 = conv_norm(conv, make_norm, planes, planes, 3, stride, 1)
        self.conv3, self.norm3 = conv_norm(conv, make_norm, planes, cout, 1)
        self.shortcut = _shortcut(conv, make_norm, cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        """γ=0 on the branch's last norm, so the block starts as (relu of) its shortcut."""
        if has_affine(self.norm3):
            nn.init.zeros_(self.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _stage(block: type[BasicBlock] | type[Bottleneck], cin: int, planes: int, blocks: int,
           stride: int, make_norm: NormLayer, conv: ConvLayer) -> tuple[nn.Sequential, int]:
    layers = []
    for i in range(blocks):
        layers.append(block(cin, planes, stride if i == 0 else 1, make_norm, conv))
        cin = planes * block.expansion
    return nn.Sequential(*layers), cin


class ResNet(nn.Module):
    """ImageNet-style ResNet: stem, four stages (widths w, 2w, 4w, 8w), global pool, classifier.

    Args:
        block: :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50/101).
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]``.
        num_classes, in_channels: classifier outputs and input channels.
        norm: a norm kind for :func:`groupnorm.get_norm_layer` (``"gn"``, ``"bn"``, ``"gn+ws"``...).
        small_input: 3x3 stride-1 stem without max-pool, for 28-32 px images (output stride 8
            instead of 32); default False, the 7x7/2 stem + 3x3/2 max-pool for ImageNet.
        zero_init_residual: γ=0 on the last norm of every block (the paper's init).
        width: stem width w (64 in the paper; smaller for quick CPU runs).
        **norm_options: passed to the norm factory (``num_groups=32``, ``group_size=16``...).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 num_classes: int = 1000, in_channels: int = 3, norm: Any = "gn", *,
                 small_input: bool | None = None, zero_init_residual: bool = True,
                 width: int | None = None, **norm_options: Any) -> None:
        super().__init__()
        make_norm, conv = resolve_norm(norm, dims=2, **norm_options)
        w = width or 64
        if small_input:
            c, n = conv_norm(conv, make_norm, in_channels, w, 3, 1, 1)
            self.stem = nn.Sequential(c, n, nn.ReLU(inplace=True))
        else:
            c, n = conv_norm(conv, make_norm, in_channels, w, 7, 2, 3)
            self.stem = nn.Sequential(c, n, nn.ReLU(inplace=True),
                                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        cin = w
        stages = []
        for i, blocks in enumerate(layers):
            stage, cin = _stage(block, cin, w * 2 ** i, blocks, 1 if i == 0 else 2, make_norm,
                                conv)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, (N, 8w·expansion, H/32, W/32) (H/8 with small_input)."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (He et al. 2016, Sec. 4.2): 3x3 stem, 3 stages of n blocks.

    Stage widths 16/32/64 (times ``width``/16), strides 1/2/2, global average pool, classifier.
    Shortcuts are identities except where the shape changes (the first block of stages 2 and 3),
    which get a 1x1 conv + norm projection ("option B" only there; the original used zero-padding
    "option A", so these nets have 2.7k more parameters: ResNet-20 0.27 M, ResNet-56 0.86 M).
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, norm: Any = "gn",
                 *, small_input: bool | None = None, zero_init_residual: bool = True,
                 width: int | None = None, **norm_options: Any) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        if small_input is False:
            raise ValueError("CIFAR ResNets are built for small inputs; small_input=False is "
                             "not available, use resnet18/34/50/101 for an ImageNet stem")
        make_norm, conv = resolve_norm(norm, dims=2, **norm_options)
        n = (depth - 2) // 6
        w = width or 16
        c, nm = conv_norm(conv, make_norm, in_channels, w, 3, 1, 1)
        self.stem = nn.Sequential(c, nm, nn.ReLU(inplace=True))
        self.layer1, cin = _stage(BasicBlock, w, w, n, 1, make_norm, conv)
        self.layer2, cin = _stage(BasicBlock, cin, 2 * w, n, 2, make_norm, conv)
        self.layer3, cin = _stage(BasicBlock, cin, 4 * w, n, 2, make_norm, conv)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, (N, 4w, H/4, W/4)."""
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))
