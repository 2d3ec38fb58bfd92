"""VGG-16 (Simonyan & Zisserman 2015) with a norm after every conv (or none: the original)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .common import conv_norm, init_weights, resolve_norm

__all__ = ["VGG", "VGG16_CFG"]

#: Conv widths per layer, "M" = 2x2 max-pool (configuration D of the paper).
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with conv3x3-norm-ReLU layers; ``norm="none"`` gives the original (biased convs).

    ``small_input=False`` (default): the ImageNet net, five max-pools, 7x7 adaptive pool and the
    4096-4096 dropout MLP (138.4 M parameters at 1000 classes). ``small_input=True``: the usual
    CIFAR variant: the last max-pool is dropped (so 28 px inputs still fit), then global average
    pool and one Linear(512, classes) (14.7 M parameters).
    """

    def __init__(self, cfg: tuple[int | str, ...] = VGG16_CFG, num_classes: int = 1000,
                 in_channels: int = 3, norm: Any = "gn", *, small_input: bool | None = None,
                 zero_init_residual: bool = True, width: int | None = None,
                 **norm_options: Any) -> None:
        super().__init__()
        make_norm, conv = resolve_norm(norm, dims=2, **norm_options)
        scale = (width or 64) / 64
        cfg = tuple(cfg)
        if small_input:
            last_pool = len(cfg) - 1 - cfg[::-1].index("M")
            cfg = cfg[:last_pool] + cfg[last_pool + 1:]
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout = max(1, int(int(v) * scale))
            c, n = conv_norm(conv, make_norm, cin, cout, 3, 1, 1)
            layers += [c, n, nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        if small_input:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(cin, num_classes))
        else:
            hidden = max(1, int(4096 * scale))
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(cin * 49, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(hidden, num_classes))
        init_weights(self, zero_init_residual)  # no residual blocks: the flag changes nothing

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv layer's feature map."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.forward_features(x)), 1))
