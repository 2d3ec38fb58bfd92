"""SimpleNet: small plain (non-residual) conv nets for 28-32 px images, for quick CPU sweeps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .common import ConvLayer, NormLayer, conv_norm, init_weights, resolve_norm

__all__ = ["SimpleBlock", "SimpleNet"]


class SimpleBlock(nn.Module):
    """conv3x3(cin→cout)-norm-ReLU, conv3x3(cout→cout)-norm-ReLU, 2x2 max-pool (halves H, W)."""

    def __init__(self, cin: int, cout: int, make_norm: NormLayer, conv: ConvLayer) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv_norm(conv, make_norm, cin, cout, 3, 1, 1)
        self.conv2, self.norm2 = conv_norm(conv, make_norm, cout, cout, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm1(self.conv1(x)))
        x = self.relu(self.norm2(self.conv2(x)))
        return self.pool(x)


class SimpleNet(nn.Module):
    """``blocks`` SimpleBlocks (widths w, 2w, 4w...; w=32), then an MLP head.

    The head is adaptive-avg-pool to 4x4 → flatten → Linear(16·C, 1024) → ReLU → Linear(classes).
    Pooling to a fixed 4x4 (rather than inferring the flatten size from the input) keeps the
    parameter count independent of the image size, so one model takes 28 px (Fashion-MNIST) and
    32 px (CIFAR) inputs; at 32 px with 3 blocks the 4x4 map is exactly the last block's output.

    ``simplenet`` = 2 blocks (output stride 4), ``simplenetv2`` = 3 blocks (output stride 8).
    """

    def __init__(self, blocks: int, num_classes: int = 10, in_channels: int = 3,
                 norm: Any = "gn", *, small_input: bool | None = None,
                 zero_init_residual: bool = True, width: int | None = None, hidden: int = 1024,
                 **norm_options: Any) -> None:
        super().__init__()
        if small_input is False:
            raise ValueError("SimpleNet is built for small inputs; small_input=False is not "
                             "available, use resnet18/34/50/101 for an ImageNet stem")
        make_norm, conv = resolve_norm(norm, dims=2, **norm_options)
        w = width or 32
        chans = [in_channels] + [w * 2 ** i for i in range(blocks)]
        self.features = nn.Sequential(
            *[SimpleBlock(chans[i], chans[i + 1], make_norm, conv) for i in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(chans[-1] * 16, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)
        init_weights(self, zero_init_residual)  # no residual blocks: the flag changes nothing

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's feature map, (N, C_last, H/2^blocks, W/2^blocks)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.forward_features(x)), 1)
        return self.fc2(self.relu(self.fc1(x)))
