"""``GroupNorm``: a drop-in for ``torch.nn.GroupNorm`` with group_size=, fusion and backends."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..activations import ACTIVATIONS
from ..functional import BACKENDS, _check_eps, _positive_int, group_norm, resolve_num_groups

__all__ = ["GroupNorm"]


class GroupNorm(nn.GroupNorm):
    r"""Applies Group Normalization over a mini-batch of inputs.

    As described in `Group Normalization <https://arxiv.org/abs/1803.08494>`__ (Wu & He, 2018):

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
            * \gamma + \beta + \mathrm{residual}\right)

    The input channels are separated into ``num_groups`` groups, each containing
    ``num_channels / num_groups`` channels. The mean and standard deviation are calculated
    separately over each group (its channels and all spatial positions) of each sample.
    :math:`\gamma` and :math:`\beta` are learnable per-channel affine parameters of size
    ``num_channels`` if ``affine`` is ``True``. The variance is the biased estimator
    (``torch.var(input, unbiased=False)``). The statistics are always those of the current sample,
    in training and evaluation mode alike, so the layer does not depend on the batch size. They
    are computed in fp32 for fp16/bf16 input.

    A subclass of :class:`torch.nn.GroupNorm`: ``isinstance`` checks, the attributes, the
    parameters and state_dict (``weight``, ``bias``) and ``extra_repr`` are torch's, so a
    state_dict loads both ways, outputs match, and tools that look for GN layers (weight-decay
    exclusion, per-sample-gradient validators, FX passes) find it. Under ``torch.fx``
    symbolic tracing the call is recorded as one ``groupnorm.group_norm`` node.

    Args:
        num_groups: number of groups to separate the channels into (``None`` with ``group_size``).
        num_channels: number of channels expected in input.
        eps: a value added to the denominator for numerical stability. Default: 1e-5.
        affine: if ``True``, learnable per-channel weight (init 1) and bias (init 0).
        bias: with ``affine``, whether to learn the bias too (as torch >= 2.6's ``bias=``).
        group_size: channels per group, as an alternative to ``num_groups``.
        activation: ``None``, ``"relu"``, ``"silu"`` or ``"gelu"`` fused after the affine.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"cpu"``.

    Shape:
        - Input: :math:`(N, C, *)` where :math:`C = \text{num\_channels}`, * = 0 to 3 dims.
        - Residual (optional second argument of ``forward``): same shape as input.
        - Output: :math:`(N, C, *)` (same shape, dtype and memory format as input).

    Examples::

        >>> input = torch.randn(20, 6, 10, 10)
        >>> # Separate 6 channels into 3 groups
        >>> m = GroupNorm(3, 6)
        >>> # Separate 6 channels into 6 groups (equivalent with InstanceNorm)
        >>> m = GroupNorm(6, 6)
        >>> # Put all 6 channels into a single group (equivalent with LayerNorm over (C, H, W))
        >>> m = GroupNorm(1, 6)
        >>> # Two channels per group, fused SiLU (the diffusion-model block)
        >>> m = GroupNorm(None, 6, group_size=2, activation="silu")
        >>> output = m(input)
    """

    def __init__(
        self,
        num_groups: int | None,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        bias: bool = True,
        group_size: int | None = None,
        activation: str | None = None,
        backend: str = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        num_channels = _positive_int("num_channels", num_channels)
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        num_groups = resolve_num_groups(num_channels, num_groups, group_size)
        super().__init__(num_groups, num_channels, _check_eps(eps), affine, bias=bias,
                         device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """y = act(GN(input)·γ + β + residual) on the layer's backend."""
        if (not isinstance(input, torch.fx.Proxy) and input.dim() >= 2
                and input.shape[1] != self.num_channels):
            raise ValueError(
                f"expected input with {self.num_channels} channels (dim 1), got shape "
                f"{tuple(input.shape)}")
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                          activation=self.activation, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        """torch.nn.GroupNorm's, plus the activation and backend when they are not defaults."""
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s
