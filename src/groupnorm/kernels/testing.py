"""Parity checks of a fast backend against the float64 oracle (used by the tests and the benchmark).

:func:`parity_errors` runs y = act(GN(x)·w + b + r) and its backward on a backend and on
:func:`groupnorm.oracle.group_norm_reference` in float64 (same rounded inputs), and returns
the worst error of y, dx, dw, db and dr, each divided by max(1, max|reference|).
"""

from __future__ import annotations

import torch
from torch import Tensor

from groupnorm.oracle import group_norm_reference


def make_input(shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: str = "cpu",
               offset: float = 0.5, scale: float = 2.0) -> Tensor:
    """A random (offset + scale·randn) tensor in the given layout ("nchw" or "nhwc")."""
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype=dtype, device=device)
    if layout == "nhwc" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "nhwc" and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def run_op(backend: str, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
           residual: Tensor | None, activation: str | None, dy: Tensor,
           eps: float = 1e-5) -> dict[str, Tensor]:
    """Forward + backward on ``backend`` ("reference64" = float64 oracle); returns y and grads."""
    leaves = {"x": x, "w": weight, "b": bias, "r": residual}
    if backend == "reference64":
        leaves = {k: None if v is None else v.detach().double() for k, v in leaves.items()}
    else:
        leaves = {k: None if v is None else v.detach() for k, v in leaves.items()}
    for v in leaves.values():
        if v is not None:
            v.requires_grad_(True)
    if backend == "reference64":
        y = group_norm_reference(leaves["x"], num_groups, leaves["w"], leaves["b"], eps,
                                 activation, leaves["r"])
        dy = dy.double()
    else:
        from groupnorm.kernels import group_norm_fast

        y = group_norm_fast(backend, leaves["x"], num_groups, leaves["w"], leaves["b"], eps,
                            activation, leaves["r"])
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy)
    out = {"y": y.detach()}
    out.update({"d" + k: g for k, g in zip(names, grads, strict=True)})
    return out


def parity_errors(backend: str, shape: tuple[int, ...], num_groups: int, dtype: torch.dtype,
                  layout: str = "nchw", activation: str | None = None, residual: bool = False,
                  affine: bool = True, device: str = "cpu", offset: float = 0.5,
                  seed: int = 0) -> dict[str, float]:
    """Worst error per output (y, dx, dw, db, dr) of ``backend`` vs the float64 oracle.

    Errors are max|ours − ref| / max(1, max|ref|), so one tolerance per dtype covers outputs of
    different magnitude (dw and db are sums over N·spatial elements).
    """
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        x = make_input(shape, layout, dtype, device, offset=offset)
        c = shape[1]
        w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
        b = torch.randn(c, dtype=torch.float64).to(dtype=dtype, device=device)
        r = make_input(shape, layout, dtype, device, offset=0.0, scale=1.0) if residual else None
        dy = make_input(shape, layout, dtype, device, offset=0.0, scale=1.0)
    if not affine:
        w = b = None
    ours = run_op(backend, x, num_groups, w, b, r, activation, dy)
    ref = run_op("reference64", x, num_groups, w, b, r, activation, dy)
    assert ours["y"].dtype == x.dtype, f"output dtype {ours['y'].dtype} != input {x.dtype}"
    assert ours["y"].stride() == x.stride(), (
        f"output strides {ours['y'].stride()} != input strides {x.stride()} (layout {layout})")
    errs = {}
    for k, v in ref.items():
        scale = max(1.0, v.abs().max().item()) if v.numel() else 1.0
        diff = (ours[k].double().cpu() - v.cpu()).abs()
        errs[k] = diff.max().item() / scale if diff.numel() else 0.0
    return errs


def backward_is_deterministic(backend: str, shape: tuple[int, ...], layout: str,
                              num_groups: int, activation: str | None,
                              device: str = "cpu") -> bool:
    """Whether two backward passes on the same input give bit-identical dx, dγ, dβ."""
    from groupnorm.kernels import group_norm_fast

    x = make_input(shape, layout, torch.float32, device).requires_grad_()
    w = torch.rand(shape[1], device=device, requires_grad=True)
    b = torch.rand(shape[1], device=device, requires_grad=True)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(2):
        y = group_norm_fast(backend, x, num_groups, w, b, 1e-5, activation, None)
        grads.append(torch.autograd.grad(y, [x, w, b], dy))
    return all(torch.equal(g1, g2) for g1, g2 in zip(*grads, strict=True))
