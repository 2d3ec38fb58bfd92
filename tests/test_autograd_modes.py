"""Every derivative kind and tracing mode, on every backend: torch's numbers or a clear error.

The table: backend × layout × dtype, with each mode checked against torch.nn.GroupNorm's maths
(``F.group_norm``) in float64 on the same rounded inputs, or with gradcheck / gradgradcheck in
float64. Modes: double backward (``create_graph``, gradgradcheck, forward-over-reverse, batched
grads), forward AD (``torch.func.jvp``, dual tensors, ``jacfwd``), ``torch.func`` (``grad``,
``vmap`` over any dim, ``jacrev``, ``functional_call``), per-sample gradients (ExpandedWeights vs
``torch.func``), FX symbolic tracing, and dx's memory format. ``torch.export`` and ONNX are in
test_export.py.

Backends: "auto" forced onto the C++ path (every ``CPU_AUTO_TABLE`` entry opened, fp64 allowed,
so that tiny shapes reach it), "torch", "reference", "cpu"; "triton" runs the same tests in a
subprocess under ``TRITON_INTERPRET=1`` (the flag must be set before triton is imported). For
the fast backends each test checks first that the forward ran on the kernels (its ``grad_fn``),
so that what is tested is the fast path's own backward, not a fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm import GroupNorm, group_norm, kernels
from groupnorm.kernels.cpu_ext import load_cpu_ext

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["triton"] if INTERPRET else ["auto", "torch", "reference", "cpu"]
FAST = ("auto", "cpu", "triton")

# (label, shape, num_groups, memory format)
LAYOUTS = [
    ("nchw", (2, 4, 3, 3), 2, torch.contiguous_format),
    ("channels_last", (2, 4, 3, 3), 2, torch.channels_last),
    ("3d", (2, 4, 2, 2, 3), 2, torch.contiguous_format),
    ("3d_channels_last", (2, 4, 2, 2, 3), 2, torch.channels_last_3d),
]
LAYOUT_IDS = [row[0] for row in LAYOUTS]

# Worst |ours − float64 oracle| / max(1, |oracle|) per dtype, for values, first and second
# derivatives. fp32: the second derivative sums products of first-order terms over a group,
# about 10x the forward's rounding. bf16: compared with torch's own bf16 error instead (below).
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """A backend name; "auto" is forced onto the C++ path for every size, layout and dtype."""
    name = request.param
    if name in ("auto", "cpu") and not load_cpu_ext():
        pytest.skip("C++ CPU extension did not build")
    if name == "auto":
        for key in kernels.CPU_AUTO_TABLE:
            monkeypatch.setitem(kernels.CPU_AUTO_TABLE, key, (0, 1 << 62))
        monkeypatch.setattr(kernels, "CPU_AUTO_DTYPES",
                            (torch.float32, torch.float64, torch.bfloat16, torch.float16))
    return name


def _inputs(shape, fmt, dtype, seed=0):
    """x (offset, in the layout), γ, β, residual (in the layout), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=fmt), w, b, r.contiguous(memory_format=fmt)


def ours(backend, groups, act=None):
    """y = group_norm(x, ...) on backend; residual optional."""
    def f(x, w, b, r=None):
        return group_norm(x, groups, w, b, activation=act, residual=r, backend=backend)
    return f


def theirs(groups, act=None):
    """The same y with torch.nn.GroupNorm's op (through NCHW: aten's channels-last paths are
    not robust on CPU, and its forward-AD formula fails on channels-last input)."""
    def f(x, w, b, r=None):
        y = F.group_norm(x.contiguous(), groups, w, b)
        if r is not None:
            y = y + r.contiguous()
        return _ACT[act](y)
    return f


_ACT = {None: lambda t: t, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}


def _leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def _assert_fast_path(y, backend):
    """The forward really ran on the kernels: only then is their backward what is tested."""
    if backend in FAST:
        assert type(y.grad_fn).__name__ == "_EagerGroupNormBackward", (
            f"{backend}: forward did not take the fast path (grad_fn {y.grad_fn})")


def _rel_err(got, want) -> float:
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    return (got.double() - want.double()).abs().max().item() / scale


# --- double backward --------------------------------------------------------------------------

# gradcheck's shapes: groups of 8 values keep the numerical Jacobians small
GRADCHECK_LAYOUTS = [
    ("nchw", (2, 4, 2, 2), 2, torch.contiguous_format),
    ("channels_last", (2, 4, 2, 2), 2, torch.channels_last),
    ("3d", (2, 4, 1, 2, 2), 2, torch.contiguous_format),
    ("3d_channels_last", (2, 4, 1, 2, 2), 2, torch.channels_last_3d),
]


def _gradcheck_case(backend, shape, groups, fmt, act, residual):
    if backend == "triton":
        pytest.skip("the Triton kernels have no float64")
    x, w, b, r = _leaves(*_inputs(shape, fmt, torch.float64))
    f = ours(backend, groups, act)
    args = (x, w, b, r) if residual else (x, w, b)
    _assert_fast_path(f(*args), backend)
    return f, args


@pytest.mark.parametrize("act,residual", [(None, False), ("silu", True)], ids=["plain", "silu+res"])
@pytest.mark.parametrize("label,shape,groups,fmt", GRADCHECK_LAYOUTS, ids=LAYOUT_IDS)
def test_gradcheck_every_derivative_float64(backend, label, shape, groups, fmt, act, residual):
    """gradcheck (reverse, forward AD) and gradgradcheck (reverse over reverse, forward over
    reverse) in float64; fast mode (random projections of the Jacobians, which a zero second
    derivative or tangent fails all the same). Full mode is in the slow test below."""
    f, args = _gradcheck_case(backend, shape, groups, fmt, act, residual)
    assert torch.autograd.gradcheck(f, args, check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, args, check_fwd_over_rev=True, fast_mode=True)


def _batched_params():
    for row in GRADCHECK_LAYOUTS:
        marks = () if row[0] in ("nchw", "channels_last") else pytest.mark.slow
        yield pytest.param(*row, id=row[0], marks=marks)


@pytest.mark.parametrize("label,shape,groups,fmt", list(_batched_params()))
def test_gradcheck_batched_float64(backend, label, shape, groups, fmt):
    """Batched gradients (is_grads_batched: vmap over the backward, as jacobian(vectorize=True)
    and hessian use) and batched tangents."""
    f, args = _gradcheck_case(backend, shape, groups, fmt, "silu", True)
    assert torch.autograd.gradcheck(f, args, check_batched_grad=True, fast_mode=True,
                                    check_forward_ad=True, check_batched_forward_grad=True)


@pytest.mark.slow
@pytest.mark.parametrize("act,residual", [(None, False), ("gelu", True)], ids=["plain", "gelu+res"])
@pytest.mark.parametrize("label,shape,groups,fmt", GRADCHECK_LAYOUTS, ids=LAYOUT_IDS)
def test_gradcheck_full_mode_float64(backend, label, shape, groups, fmt, act, residual):
    """The same checks element by element (full Jacobians, not projections).

    gradgradcheck's batched mode is left out: torch's own F.group_norm fails it on 5-D input
    with an activation after it (torch 2.13: "size of tensor a (2) must match ... (12)").
    """
    f, args = _gradcheck_case(backend, shape, groups, fmt, act, residual)
    assert torch.autograd.gradcheck(f, args, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(f, args, check_fwd_over_rev=True)


def _penalty_grads(f, x, w, b, r, v):
    """An R1 / WGAN-GP style penalty: ‖∂⟨y, v⟩/∂x‖², then its gradient w.r.t. x, γ, β, r."""
    y = f(x, w, b, r)
    (gx,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
    penalty = gx.square().sum()
    return y, penalty, torch.autograd.grad(penalty, (x, w, b, r), allow_unused=True,
                                           materialize_grads=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", [None, "relu", "silu", "gelu"])
@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_gradient_penalty_matches_torch(backend, label, shape, groups, fmt, act, dtype):
    """create_graph=True: the penalty's gradient is torch's (float64), never zero."""
    x0, w0, b0, r0 = _inputs(shape, fmt, dtype)
    v = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x, w, b, r = _leaves(x0, w0, b0, r0)
    y, pen, got = _penalty_grads(ours(backend, groups, act), x, w, b, r, v.to(dtype))
    _assert_fast_path(y, backend)
    leaves64 = _leaves(x0, w0, b0, r0, dtype=torch.float64)
    _, pen64, want = _penalty_grads(theirs(groups, act), *leaves64, v)
    assert pen64.item() > 0 and all(t.abs().max() > 0 for t in want[:2])
    if dtype == torch.bfloat16:
        # bf16 rounds y, v and every stored intermediate (2^-8 relative): hold ours to torch's
        # own bf16 error on the same inputs, with a floor for where torch happens to be exact
        _, _, torch_bf16 = _penalty_grads(theirs(groups, act), *_leaves(x0, w0, b0, r0),
                                          v.to(dtype))
        tols = [max(2 * _rel_err(t, wt), 2e-2) for t, wt in zip(torch_bf16, want, strict=True)]
    else:
        tols = [TOL[dtype]] * 4
    for name, g, wt, tol in zip(("x", "w", "b", "r"), got, want, tols, strict=True):
        assert g.dtype == dtype
        assert _rel_err(g, wt) <= tol, f"d{name}: {_rel_err(g, wt)} > {tol}"


# --- forward AD -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_ad_matches_torch(backend, label, shape, groups, fmt, dtype):
    """torch.func.jvp and dual tensors (forward_ad) give torch's tangent, never zeros."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels have no float64")
    x, w, b, r = _inputs(shape, fmt, dtype)
    g = torch.Generator().manual_seed(7)
    tx, tw, tb, tr = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b, r))
    f = ours(backend, groups, "gelu")
    cast = [t.to(dtype) for t in (tx, tw, tb, tr)]
    y, jt = torch.func.jvp(f, (x, w, b, r), tuple(cast))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip((x, w, b, r), cast, strict=True)]
        y_dual, jt_dual = fwAD.unpack_dual(f(*duals))
    x64 = [t.double() for t in (x, w, b, r)]
    y64, jt64 = torch.func.jvp(theirs(groups, "gelu"), tuple(x64), (tx, tw, tb, tr))
    assert jt64.abs().max() > 0
    for got in (jt, jt_dual):
        assert got is not None and got.dtype == dtype
        assert _rel_err(got, jt64) <= TOL[dtype], _rel_err(got, jt64)
    assert _rel_err(y, y64) <= TOL[dtype] and _rel_err(y_dual, y64) <= TOL[dtype]


# --- torch.func -------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dims", ["0", "1", "x1,w0,b0"])
@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_vmap_any_dim(backend, label, shape, groups, fmt, in_dims):
    """vmap over the input's dim 0 or 1 (a batch of batches), and over γ, β too."""
    batch = 3
    g = torch.Generator().manual_seed(1)
    xs = (torch.randn(batch, *shape, generator=g) * 2 + 0.5)
    ws = torch.rand(batch, shape[1], generator=g) + 0.5
    bs = torch.randn(batch, shape[1], generator=g)
    f = ours(backend, groups, "silu")
    if in_dims == "0":
        got = torch.vmap(f, in_dims=(0, None, None))(xs, ws[0], bs[0])
        want = torch.stack([theirs(groups, "silu")(xi, ws[0], bs[0]) for xi in xs])
    else:
        # the vmapped dim is dim 1 of a dense tensor: each sample's view is strided (no
        # memory format), which the dispatch must not query inside vmap
        xt = xs.movedim(0, 1).contiguous()
        if in_dims == "1":
            got = torch.vmap(f, in_dims=(1, None, None), out_dims=1)(xt, ws[0], bs[0])
            want = torch.stack([theirs(groups, "silu")(xi, ws[0], bs[0]) for xi in xs], 1)
        else:
            got = torch.vmap(f, in_dims=(1, 0, 0), out_dims=1)(xt, ws, bs)
            want = torch.stack([theirs(groups, "silu")(xi, wi, bi)
                                for xi, wi, bi in zip(xs, ws, bs, strict=True)], 1)
    assert _rel_err(got, want) <= TOL[torch.float32]


@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_func_grad_jacrev_jacfwd(backend, label, shape, groups, fmt):
    """torch.func.grad, jacrev and jacfwd of a scalar / vector function of (x, γ, β)."""
    x, w, b, _ = _inputs(shape, fmt, torch.float32)
    f, t = ours(backend, groups, "silu"), theirs(groups, "silu")
    got = torch.func.grad(lambda *a: f(*a).square().sum(), argnums=(0, 1, 2))(x, w, b)
    want = torch.func.grad(lambda *a: t(*a).square().sum(), argnums=(0, 1, 2))(x, w, b)
    for a, e in zip(got, want, strict=True):
        assert a.abs().max() > 0 and _rel_err(a, e) <= TOL[torch.float32]
    # Jacobians of the per-channel mean of y w.r.t. γ (a C x C matrix), reverse and forward
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        j = jac(lambda w_: f(x, w_, b).mean(dim=[0, *range(2, x.dim())]))(w)
        jt = jac(lambda w_: t(x, w_, b).mean(dim=[0, *range(2, x.dim())]))(w)
        assert _rel_err(j, jt) <= TOL[torch.float32], jac.__name__


@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_functional_call_and_module_grads(backend, label, shape, groups, fmt):
    """torch.func.functional_call (eager: the fast path) and grad over it (the composite)."""
    x, *_ = _inputs(shape, fmt, torch.float32)
    m = GroupNorm(groups, shape[1], activation="gelu", backend=backend)
    ref = nn.GroupNorm(groups, shape[1])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    m.load_state_dict(ref.state_dict())
    params = {k: v.detach().requires_grad_() for k, v in ref.named_parameters()}
    y = torch.func.functional_call(m, params, (x,))
    _assert_fast_path(y, backend)
    want_y = F.gelu(ref(x.contiguous()))
    assert _rel_err(y, want_y) <= TOL[torch.float32]
    got = torch.autograd.grad(y.square().sum(), list(params.values()))
    want = torch.autograd.grad(want_y.square().sum(), list(ref.parameters()))
    for a, e in zip(got, want, strict=True):
        assert _rel_err(a, e) <= TOL[torch.float32]
    fgrad = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).square().sum())
    for k, g in fgrad({k: v.detach() for k, v in params.items()}).items():
        assert _rel_err(g, dict(zip(params, want, strict=True))[k]) <= TOL[torch.float32], k


@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_per_sample_grads_expanded_weights_vs_torch_func(backend, label, shape, groups, fmt):
    """ExpandedWeights (what Opacus-style DP-SGD uses) hook F.group_norm: per-sample dγ, dβ
    must equal those of torch.func (vmap of grad) on torch.nn.GroupNorm."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    x, *_ = _inputs(shape, fmt, torch.float32)
    m = GroupNorm(groups, shape[1], activation="silu", backend=backend)
    ref = nn.GroupNorm(groups, shape[1])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    m.load_state_dict(ref.state_dict())
    call_for_per_sample_grads(m, loss_reduction="sum")(x).square().sum().backward()
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(p, xi):
        return F.silu(torch.func.functional_call(ref, p, (xi[None].contiguous(),))).square().sum()

    want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for name in ("weight", "bias"):
        got = getattr(m, name).grad_sample
        assert got.shape == (shape[0], shape[1])
        assert _rel_err(got, want[name]) <= TOL[torch.float32], name


# --- FX and layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_fx_symbolic_trace(backend, label, shape, groups, fmt):
    """The layer traces (one group_norm node) and the GraphModule gives the eager numbers."""
    conv = nn.Conv2d if len(shape) == 4 else nn.Conv3d
    model = nn.Sequential(conv(shape[1], shape[1], 1),
                          GroupNorm(groups, shape[1], activation="silu", backend=backend),
                          nn.Flatten(), nn.Linear(shape[1] * x_numel_per_channel(shape), 3))
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert groupnorm.group_norm in targets, gm.graph
    x, *_ = _inputs(shape, fmt, torch.float32)
    x.requires_grad_(True)
    y_gm, y = gm(x), model(x)
    torch.testing.assert_close(y_gm, y)
    torch.testing.assert_close(torch.autograd.grad(y_gm.sum(), x)[0],
                               torch.autograd.grad(y.sum(), x)[0])


def x_numel_per_channel(shape) -> int:
    n = 1
    for s in shape[2:]:
        n *= s
    return n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_dx_keeps_memory_format(backend, label, shape, groups, fmt, dtype):
    """y, dx and dresidual come back in x's memory format (torch.autograd.grad applies no
    layout contract, so the backward itself must produce it), with torch's values."""
    x, w, b, r = _leaves(*_inputs(shape, fmt, dtype))
    y = ours(backend, groups, "relu")(x, w, b, r)
    _assert_fast_path(y, backend)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    dx, dr = torch.autograd.grad(y, (x, r), dy)
    for name, t in (("y", y), ("dx", dx), ("dresidual", dr)):
        assert t.is_contiguous(memory_format=fmt), f"{name} lost the layout ({t.stride()})"
    x64 = _leaves(x, w, b, r, dtype=torch.float64)
    want = torch.autograd.grad(theirs(groups, "relu")(*x64), (x64[0], x64[3]), dy.double())
    tol = TOL.get(dtype, 4e-2)
    assert _rel_err(dx, want[0]) <= tol and _rel_err(dr, want[1]) <= tol


@pytest.mark.parametrize("label,shape,groups,fmt", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_dispatch_modes_and_subclasses_take_aten_ops(backend, label, shape, groups, fmt):
    """FakeTensor, make_fx (symbolic shapes), FlopCounter and tensor subclasses see aten's
    group_norm, never the kernels (which need real, plain storage)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b, r = _inputs(shape, fmt, torch.float32)
    f = ours(backend, groups, "silu")
    with FakeTensorMode() as mode:
        y = f(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), mode.from_tensor(r))
        assert y.shape == x.shape
    gm = make_fx(f, tracing_mode="symbolic")(x, w, b, r)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("group_norm" in t for t in targets) and not any("groupnorm" in t for t in targets)
    torch.testing.assert_close(gm(x, w, b, r), f(x, w, b, r))
    with FlopCounterMode(display=False) as counter:
        f(x, w, b, r)
    assert counter.get_total_flops() >= 0

    class Logged(torch.Tensor):
        pass

    y = f(x.as_subclass(Logged), w, b, r)
    assert type(y) is Logged and _rel_err(y, theirs(groups, "silu")(x, w, b, r)) <= 1e-6


# --- triton, under the interpreter --------------------------------------------------------------

@pytest.mark.skipif(INTERPRET, reason="this process already runs the triton cases")
def test_triton_backend_in_interpreter_subprocess():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         "-k", "not subprocess"],
        env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
