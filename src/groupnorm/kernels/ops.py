"""The fast backends as ``torch.library`` custom ops, each with its autograd and fake kernels.

One op pair per backend, named for it: ``groupnorm::gn_cpu_fwd`` / ``groupnorm::gn_cpu_bwd`` (the
C++ extension) and ``groupnorm::gn_triton_fwd`` / ``groupnorm::gn_triton_bwd`` (the Triton
kernels). Because they are custom ops with ``register_fake``, ``torch.compile(fullgraph=True)``
traces them as single nodes without graph breaks; ``register_autograd`` wires the backward op.

Inputs reaching these ops are already normalized by :func:`groupnorm.kernels.group_norm_fast`:
x dense in one of the two layouts, weight/bias in the op-math dtype (never None), residual in x's
layout and dtype. Saved for backward: x, mean and rstd (op-math dtype, ``(N, G)``), weight and
bias (``C`` values) and — only when an activation is fused after a residual add — the residual,
because act'(z) needs z = GN(x)·w + b + r. The backward kernels are not differentiable: under
``create_graph=True``, batched gradients or a dispatch mode the backward returns
:func:`groupnorm.composite.group_norm_backward_composite` instead, which autograd can
differentiate again (torch's second derivatives, never zero).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from groupnorm.activations import ACT_NAMES
from groupnorm.composite import group_norm_backward_composite
from groupnorm.layout import is_channels_last, strides_like
from groupnorm.modes import backward_needs_composite


def _fake_fwd(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, num_groups: int,
              eps: float, act: int) -> tuple[Tensor, Tensor, Tensor]:
    stats = x.new_empty((x.shape[0], num_groups), dtype=weight.dtype)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None,
              mean: Tensor, rstd: Tensor, num_groups: int, act: int,
              need_dz: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dz = torch.empty_like(x) if need_dz else x.new_empty((0,))
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), dz


def _register(backend: str) -> Callable:
    """Define ``groupnorm::gn_{backend}_fwd/_bwd`` with fake and autograd kernels; return fwd.

    The implementations are looked up in ``_IMPLS`` at each call (one table for the custom ops
    and the eager Function; benchmarks/op_modes_table.py counts calls through it).
    """

    @torch.library.custom_op(f"groupnorm::gn_{backend}_fwd", mutates_args=())
    def fwd(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, num_groups: int,
            eps: float, act: int) -> tuple[Tensor, Tensor, Tensor]:
        return _IMPLS[backend][0](x, weight, bias, residual, num_groups, eps, act)

    @torch.library.custom_op(f"groupnorm::gn_{backend}_bwd", mutates_args=())
    def bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None,
            mean: Tensor, rstd: Tensor, num_groups: int, act: int,
            need_dz: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _IMPLS[backend][1](dy, x, weight, bias, residual, mean, rstd, num_groups, act,
                                  need_dz)

    fwd.register_fake(_fake_fwd)
    bwd.register_fake(_fake_bwd)

    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, residual, num_groups, eps, act = inputs
        _, mean, rstd = output
        ctx.num_groups, ctx.eps, ctx.act = num_groups, eps, act
        ctx.has_residual = residual is not None
        keep_res = residual if (residual is not None and act != 0) else None
        ctx.save_for_backward(x, weight, bias, keep_res, mean, rstd)

    def backward(ctx, dy: Tensor, _dmean: Tensor, _drstd: Tensor):
        return (*_input_grads(ctx, dy, bwd), None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


def _cpu_fwd(x, weight, bias, residual, num_groups, eps, act):
    return torch.ops.groupnorm_cpu.fwd(x, weight, bias, residual, num_groups, eps, act,
                                       is_channels_last(x))


def _cpu_bwd(dy, x, weight, bias, residual, mean, rstd, num_groups, act, need_dz):
    return torch.ops.groupnorm_cpu.bwd(strides_like(dy, x), x, weight, bias, residual, mean,
                                       rstd, num_groups, act, is_channels_last(x), need_dz)


def _triton_fwd(x, weight, bias, residual, num_groups, eps, act):
    from groupnorm.kernels import triton_kernels

    return triton_kernels.gn_forward(x, weight, bias, residual, num_groups, eps, act)


def _triton_bwd(dy, x, weight, bias, residual, mean, rstd, num_groups, act, need_dz):
    from groupnorm.kernels import triton_kernels

    return triton_kernels.gn_backward(dy, x, weight, bias, residual, mean, rstd, num_groups, act,
                                      need_dz)


def _input_grads(ctx, dy: Tensor, bwd) -> tuple[Tensor | None, ...]:
    """(dx, dw, db, dresidual) from the saved context; shared by the custom op and eager paths.

    The kernels' backward is not differentiable and takes plain tensors, so under
    ``create_graph=True``, batched gradients or a dispatch mode the same gradients come from
    :func:`groupnorm.composite.group_norm_backward_composite` instead (recomputed from the saved
    x, so that autograd can differentiate them again).
    """
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:4])
    if backward_needs_composite(dy):
        return group_norm_backward_composite(dy, x, ctx.num_groups, weight, bias, ctx.eps,
                                             ACT_NAMES[ctx.act], residual, needs)
    need_dz = ctx.has_residual and ctx.act != 0 and needs[3]
    dx, dw, db, dz = bwd(dy, x, weight, bias, residual, mean, rstd, ctx.num_groups, ctx.act,
                         need_dz)
    dres = None
    if ctx.has_residual and needs[3]:
        dres = dz if ctx.act != 0 else dy
    return (dx if needs[0] else None,
            dw if needs[1] else None,
            db if needs[2] else None,
            dres)


gn_cpu_fwd = _register("cpu")
gn_triton_fwd = _register("triton")


class _EagerGroupNorm(torch.autograd.Function):
    """The same forward/backward as the custom ops, for eager mode without their dispatch cost.

    ``torch.library`` custom ops cost ~100 µs per forward+backward in Python dispatch; that is
    most of the time for tensors under ~1 MB. Eager calls go through this Function instead (same
    kernels, same saved tensors); under ``torch.compile`` the custom ops are used.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, num_groups, eps, act, fwd_impl, bwd_impl):
        y, mean, rstd = fwd_impl(x, weight, bias, residual, num_groups, eps, act)
        ctx.num_groups, ctx.eps, ctx.act, ctx.bwd_impl = num_groups, eps, act, bwd_impl
        ctx.has_residual = residual is not None
        keep_res = residual if (residual is not None and act != 0) else None
        ctx.save_for_backward(x, weight, bias, keep_res, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_input_grads(ctx, dy, ctx.bwd_impl), None, None, None, None, None)


_IMPLS = {"cpu": (_cpu_fwd, _cpu_bwd), "triton": (_triton_fwd, _triton_bwd)}
_CUSTOM_OPS = {"cpu": gn_cpu_fwd, "triton": gn_triton_fwd}


def run_backend(backend: str, x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None,
                num_groups: int, eps: float, act: int) -> Tensor:
    """y on ``backend``: the custom op under torch.compile, the cheaper Function in eager mode."""
    if torch.compiler.is_compiling():
        y, _, _ = _CUSTOM_OPS[backend](x, weight, bias, residual, num_groups, eps, act)
        return y
    fwd_impl, bwd_impl = _IMPLS[backend]
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return _EagerGroupNorm.apply(x, weight, bias, residual, num_groups, eps, act, fwd_impl,
                                     bwd_impl)
    return fwd_impl(x, weight, bias, residual, num_groups, eps, act)[0]
