"""torch.compile(fullgraph=True) traces the fast backends' custom ops and matches eager; under
compile, ``backend="auto"`` takes the path ``CPU_COMPILE_TABLE`` names, not the eager table's."""

from __future__ import annotations

import itertools

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import groupnorm
from groupnorm import kernels
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


# --- which path backend="auto" takes under torch.compile ----------------------------------------

def _aten_graphs(fn, *args) -> tuple[set[str], object]:
    """(the ops of the forward and backward ATen graphs that AOTAutograd hands to the compiler
    for fn(*args), fn's compiled output). The graphs run as traced (no inductor: fast)."""
    graphs = []

    def keep(gm, _example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True,
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    out = compiled(*args)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.sum().backward()  # traces and compiles the backward graph
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    return ops, out


def _uses_cpu_op(ops: set[str]) -> bool:
    return any(op.startswith("groupnorm.gn_cpu_") for op in ops)


def _uses_aten_gn(ops: set[str], training: bool) -> bool:
    return ("aten.native_group_norm.default" in ops
            and (not training or "aten.native_group_norm_backward.default" in ops))


KEYS = list(itertools.product([False, True], [False, True], [False, True]))


def _key_id(key):
    cl, fused, training = key
    return (f"{'channels_last' if cl else 'nchw'}-{'fused' if fused else 'plain'}-"
            f"{'train' if training else 'infer'}")


# every key with the shipped choice ("torch"), and the other choice on one key per layout
CASES = [(k, "torch") for k in KEYS] + [((False, False, True), "cpu"), ((True, True, False), "cpu")]


@pytest.mark.parametrize("key,choice", CASES, ids=[f"{_key_id(k)}-{c}" for k, c in CASES])
def test_auto_under_compile_follows_the_compile_table(monkeypatch, key, choice):
    """auto under torch.compile runs what CPU_COMPILE_TABLE says for the key, whatever
    CPU_AUTO_TABLE (the eager choice) says: opened to the C++ path where the compile table
    says "torch", closed where it says "cpu"."""
    channels_last, fused, training = key
    monkeypatch.setitem(kernels.CPU_COMPILE_TABLE, key, choice)
    eager_span = (0, 1 << 62) if choice == "torch" else None
    for k in kernels.CPU_AUTO_TABLE:
        monkeypatch.setitem(kernels.CPU_AUTO_TABLE, k, eager_span)
    x = torch.randn(2, 8, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(training)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    r = torch.randn(2, 8, 4, 4) if fused else None

    def f(x):
        return groupnorm.group_norm(x, 4, w, b, activation="relu" if fused else None,
                                    residual=r)

    assert kernels.auto_backend(x, 4, "relu" if fused else None, r) == (
        "cpu" if choice == "torch" else "torch"), "the eager choice must differ"
    with torch.set_grad_enabled(training):
        ops, y = _aten_graphs(f, x)
    if choice == "cpu":
        assert _uses_cpu_op(ops), sorted(ops)
    else:
        assert not _uses_cpu_op(ops) and _uses_aten_gn(ops, training), sorted(ops)
    torch.testing.assert_close(y, f(x))


class _ConvGNReLU(nn.Module):
    """conv → GN → ReLU → max-pool: the SimpleNet block that the compile table was measured on."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.norm = groupnorm.GroupNorm(16, channels)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(torch.relu(self.norm(self.conv(x))))


FORMATS = [torch.contiguous_format, torch.channels_last]
CHOICES = ["shipped", "torch", "cpu"]


def _set_choice(monkeypatch, choice: str) -> None:
    """CPU_COMPILE_TABLE as shipped, or every key set to one choice."""
    if choice != "shipped":
        for k in kernels.CPU_COMPILE_TABLE:
            monkeypatch.setitem(kernels.CPU_COMPILE_TABLE, k, choice)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_compiled_model_matches_eager(monkeypatch, fmt, choice):
    """A compiled GN model traces without graph breaks onto the compile table's path, also
    where eager auto takes the C++ kernels (channels-last training from 31K elements), and its
    output and gradients match eager's, on the shipped table and on each choice."""
    _set_choice(monkeypatch, choice)
    torch.manual_seed(0)
    model = _ConvGNReLU(32).to(memory_format=fmt)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    key = (fmt is torch.channels_last, False, True)
    act = model.norm(model.conv(x))  # the GN layer's input size: 2x32x64x64 = 262K elements
    assert act.numel() >= 1 << 18
    ops, y = _aten_graphs(model, x)
    grads = _grads(model)
    if kernels.CPU_COMPILE_TABLE[key] == "cpu":
        assert _uses_cpu_op(ops), sorted(ops)
    else:
        assert not _uses_cpu_op(ops) and _uses_aten_gn(ops, True), sorted(ops)
    model.zero_grad()
    y_e = model(x)
    y_e.sum().backward()
    torch.testing.assert_close(y, y_e)
    assert y.stride() == y_e.stride()
    for p, g in zip(model.parameters(), grads, strict=True):
        # eager may run the C++ kernels and the graph aten's: the same sums over 8K-value
        # groups and 262K-value channels in another order, so compared at the gradient's scale
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_compiled_model_under_inductor_matches_eager(monkeypatch, fmt, choice):
    """inductor (the default backend: it decomposes aten's GN, or calls the C++ ops opaquely)
    on the model: values and gradients as eager's, robust at a large mean offset on
    channels-last input too."""
    _set_choice(monkeypatch, choice)
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _ConvGNReLU(32).to(memory_format=fmt)
    x = (torch.randn(2, 3, 16, 16) + 100.0).contiguous(memory_format=fmt)
    compiled = torch.compile(model, fullgraph=True)
    y_c = compiled(x)
    y_c.sum().backward()
    grads = _grads(model)
    model.zero_grad()
    y_e = model(x)
    y_e.sum().backward()
    # inductor reorders the reductions (Welford var_mean, fused dγ/dβ sums) and the +100 input
    # offset makes the conv outputs' sums large: looser than fp32's default
    torch.testing.assert_close(y_c, y_e, atol=1e-4, rtol=1e-4)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-3, rtol=1e-3)
