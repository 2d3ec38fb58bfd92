"""Weight Standardization (Qiao et al. 2019, `arXiv:1903.10520 <https://arxiv.org/abs/1903.10520>`__).

WS reparameterizes each convolution's weight to zero mean and unit variance per output channel
(over in_channels × kernel) before it is used. With GN it removes GN's remaining gap to BN at
large batch ("GN+WS", ResNet-50 top-1 error 23.72 with micro-batches). The stored parameter is
the raw weight, so state_dicts are those of ``nn.Conv*d``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WSConv1d", "WSConv2d", "WSConv3d", "standardize_weight"]


def standardize_weight(weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(w - mean) / sqrt(var + eps) per output channel, biased variance, statistics in fp32."""
    wf = weight.float().reshape(weight.shape[0], -1)  # (out, in/groups * prod(kernel))
    mean = wf.mean(dim=1, keepdim=True)
    var = (wf - mean).pow(2).mean(dim=1, keepdim=True)
    return ((wf - mean) * torch.rsqrt(var + eps)).reshape(weight.shape).to(weight.dtype)


class _WSMixin:
    """Standardize the weight on every forward; everything else is the parent ``nn.Conv*d``."""

    ws_eps: float = 1e-6

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, standardize_weight(self.weight, self.ws_eps), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws_eps={self.ws_eps}"


class WSConv1d(_WSMixin, nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization; same arguments and state_dict."""


class WSConv2d(_WSMixin, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization; same arguments and state_dict.

    Example::

        >>> conv = WSConv2d(3, 64, kernel_size=3, padding=1, bias=False)
        >>> y = conv(torch.randn(2, 3, 32, 32))
    """


class WSConv3d(_WSMixin, nn.Conv3d):
    """``nn.Conv3d`` with Weight Standardization; same arguments and state_dict."""
