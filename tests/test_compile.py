"""torch.compile(fullgraph=True) traces the fast backends' custom ops and matches eager."""

from __future__ import annotations

import pytest
import torch

import groupnorm
from groupnorm.kernels import group_norm_fast
from groupnorm.kernels.cpu_ext import load_cpu_ext

pytestmark = pytest.mark.skipif(not load_cpu_ext(), reason="C++ CPU extension did not build")


def _block(x, w, b, r):
    # a conv-free residual block tail: GN + residual + SiLU on the fast path, then a torch op
    return group_norm_fast("cpu", x, 4, w, b, 1e-5, "silu", r) * 2.0


def _inputs():
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    r = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    return x, w, b, r


def _fwd_bwd(fn):
    torch.manual_seed(0)
    x, w, b, r = _inputs()
    y = fn(x, w, b, r)
    grads = torch.autograd.grad(y, [x, w, b], torch.ones_like(y))
    return y, grads


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend=backend)
    y_e, g_e = _fwd_bwd(_block)
    y_c, g_c = _fwd_bwd(compiled)
    assert y_c.stride() == y_e.stride()
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b)


def test_fullgraph_through_group_norm():
    torch._dynamo.reset()

    def f(x, w, b, r):
        return groupnorm.group_norm(x, 4, w, b, activation="silu", residual=r, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y_e, g_e = _fwd_bwd(f)
    y_c, g_c = _fwd_bwd(compiled)
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager():
    test_fullgraph_matches_eager("inductor")
