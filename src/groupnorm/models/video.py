"""3D ResNets for clips (N, C, T, H, W): R3D-10/18 (Hara et al. 2018; torchvision's ``r3d_18``).

Every conv is 3D (3x3x3 in the blocks) and every norm sees (N, C, T, H, W): GN/LN/IN normalize
over the temporal axis as well as the spatial ones (the paper's Kinetics setting), and BN picks
its 3D form from the input rank. The blocks are :class:`~.resnet.BasicBlock` built with
``nn.Conv3d`` (or ``WSConv3d`` for "+ws").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .common import conv_norm, init_weights, resolve_norm
from .resnet import BasicBlock, _stage

__all__ = ["VideoResNet"]


class VideoResNet(nn.Module):
    """R3D: 3D stem, four stages of 3D basic blocks (widths w..8w), global pool, classifier.

    Stem: conv (3, 7, 7) stride (1, 2, 2) (torchvision's R3D stem, no max-pool), or with
    ``small_input=True`` a 3x3x3 stride-1 conv for 32-64 px clips. Stages 2-4 halve T, H and W.
    """

    def __init__(self, layers: list[int], num_classes: int = 400, in_channels: int = 3,
                 norm: Any = "gn", *, small_input: bool | None = None,
                 zero_init_residual: bool = True, width: int | None = None,
                 **norm_options: Any) -> None:
        super().__init__()
        make_norm, conv = resolve_norm(norm, dims=3, **norm_options)
        w = width or 64
        if small_input:
            c, n = conv_norm(conv, make_norm, in_channels, w, 3, 1, 1)
        else:
            c, n = conv_norm(conv, make_norm, in_channels, w, (3, 7, 7), (1, 2, 2), (1, 3, 3))
        self.stem = nn.Sequential(c, n, nn.ReLU(inplace=True))
        cin = w
        stages = []
        for i, blocks in enumerate(layers):
            stage, cin = _stage(BasicBlock, cin, w * 2 ** i, blocks, 1 if i == 0 else 2,
                                make_norm, conv)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, 8w, T', H', W')."""
        if x.dim() != 5:
            raise ValueError(
                f"video models take clips of shape (N, C, T, H, W), got {tuple(x.shape)}")
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))
