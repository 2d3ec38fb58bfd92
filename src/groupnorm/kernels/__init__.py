"""Fast GroupNorm backends (stub until the kernels land): the contract the core dispatches through."""

from __future__ import annotations

import torch


class BackendUnavailable(RuntimeError):
    """A fast backend cannot run this input (no device, no compiler, unsupported layout)."""


def auto_backend(x: torch.Tensor, num_groups: int, activation: str | None,
                 residual: torch.Tensor | None) -> str:
    """The backend that ``backend="auto"`` uses for this input: ``"triton"``, ``"cpu"`` or ``"torch"``."""
    return "torch"


def group_norm_fast(backend: str, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, activation: str | None,
                    residual: torch.Tensor | None) -> torch.Tensor:
    """Run GroupNorm (+ residual + activation) on a fast backend."""
    raise BackendUnavailable(f"backend {backend!r} is not built yet")
