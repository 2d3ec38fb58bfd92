"""``GroupNorm``: a drop-in for ``torch.nn.GroupNorm`` with group_size=, fusion and backends."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..functional import BACKENDS, group_norm, resolve_num_groups
from ..reference import ACTIVATIONS

__all__ = ["GroupNorm"]


class GroupNorm(nn.Module):
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

    The parameters and state_dict are those of :class:`torch.nn.GroupNorm` (``weight``,
    ``bias``), so a state_dict loads both ways and outputs match.

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

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]
    num_groups: int
    num_channels: int
    eps: float
    affine: bool

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
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels <= 0:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_groups = resolve_num_groups(num_channels, num_groups, group_size)
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.activation = activation
        self.backend = backend
        factory_kwargs = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0 (as torch.nn.GroupNorm)."""
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ValueError(
                f"expected input with {self.num_channels} channels (dim 1), got shape "
                f"{tuple(input.shape)}")
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                          activation=self.activation, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        s = "{num_groups}, {num_channels}, eps={eps}, affine={affine}, bias={use_bias}".format(
            **self.__dict__, use_bias=self.bias is not None)
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s
