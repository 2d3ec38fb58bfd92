"""group_norm vs torch.nn.functional and the float64 reference: values, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import groupnorm
from conftest import SHAPES, TOLERANCES
from groupnorm import group_norm, group_norm_reference

CORE_BACKENDS = ["reference", "torch", "auto"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _formats(ndim: int):
    yield "contiguous", torch.contiguous_format
    if ndim == 4:
        yield "channels_last", torch.channels_last
    if ndim == 5:
        yield "channels_last_3d", torch.channels_last_3d


def _inputs(shape, dtype, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if fmt is not torch.contiguous_format:
        x = x.contiguous(memory_format=fmt)
    w = (torch.rand(c, generator=g) + 0.5).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    return x, w, b


def _case_table():
    for label, shape, g in SHAPES:
        for fname, fmt in _formats(len(shape)):
            yield pytest.param(shape, g, fmt, id=f"{label}-{fname}")


def _group_by_group_float64(x, groups, w, b, eps=1e-5):
    """GroupNorm written differently from the oracle: one (sample, group) slice at a time,
    torch.var_mean for the statistics. For float64 input the oracle *is* the "reference"
    backend, so this second formula is what those cases are checked against."""
    n, c = x.shape[0], x.shape[1]
    cg = c // groups
    rows = []
    for i in range(n):
        parts = []
        for g in range(groups):
            xs = x[i, g * cg:(g + 1) * cg]
            var, mean = torch.var_mean(xs, correction=0)
            parts.append((xs - mean) / torch.sqrt(var + eps))
        rows.append(torch.cat(parts))
    shape = (1, c) + (1,) * (x.dim() - 2)
    return torch.stack(rows) * w.reshape(shape) + b.reshape(shape)


def test_float64_oracle_is_independent_of_the_reference_backend():
    """The float64 cases above can fail: a reference with the unbiased variance (a classic
    GroupNorm bug) is caught by the group-by-group oracle at the float64 tolerance."""
    x, w, b = _inputs((2, 8, 5, 5), torch.float64, torch.contiguous_format)
    good = _group_by_group_float64(x, 4, w, b)
    torch.testing.assert_close(group_norm(x, 4, w, b, backend="reference"), good,
                               atol=1e-10, rtol=1e-10)
    xg = x.reshape(2, 4, -1)
    unbiased = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, keepdim=True) + 1e-5))
    bad = unbiased.reshape(x.shape) * w.reshape(1, 8, 1, 1) + b.reshape(1, 8, 1, 1)
    assert (bad - good).abs().max().item() > 1e-3


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,fmt", list(_case_table()))
def test_forward_backward_vs_float64(shape, groups, fmt, dtype, backend):
    x, w, b = _inputs(shape, dtype, fmt)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    y = group_norm(x, groups, w, b, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=fmt), "memory format must be kept"

    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    oracle = _group_by_group_float64 if dtype == torch.float64 else group_norm_reference
    y64 = oracle(x64, groups, w64, b64)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), y64, atol=atol, rtol=rtol)

    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    gx64, gw64, gb64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    # Gradients accumulate over the group (dx) and over N*spatial (dw, db): one more rounding
    # of the low-precision sum, so twice the forward tolerance, scaled by the sum's magnitude.
    scale = 1 + gw64.abs().max().item()
    torch.testing.assert_close(gx.double(), gx64, atol=2 * atol * 4, rtol=2 * rtol)
    torch.testing.assert_close(gw.double(), gw64, atol=2 * atol * scale, rtol=2 * rtol)
    torch.testing.assert_close(gb.double(), gb64, atol=2 * atol * scale, rtol=2 * rtol)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,fmt", list(_case_table()))
def test_matches_torch_functional(shape, groups, fmt, dtype, backend):
    """Values and x/γ/β gradients against torch's own GroupNorm (F.group_norm's aten op)."""
    x, w, b = _inputs(shape, dtype, fmt)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    ours = group_norm(*leaves[:1], groups, *leaves[1:], backend=backend)
    mine = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    # F.group_norm itself refuses input with one value per group ("more than 1 value per
    # channel", a BatchNorm check); the aten op it calls does not.
    theirs = torch.group_norm(mine[0], groups, mine[1], mine[2], 1e-5)
    # Both round the same fp32 result to the dtype; low precision differs by about an ulp.
    atol, rtol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
                  torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}[dtype]
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(ours, leaves, dy)
    want = torch.autograd.grad(theirs, mine, dy)
    # dγ, dβ sum over N·spatial values (up to 150 here) rounded to the dtype by both sides
    for name, g_ours, g_theirs in zip("x w b".split(), got, want, strict=True):
        scale = 1.0 if name == "x" else 1 + g_theirs.abs().max().item()
        torch.testing.assert_close(g_ours, g_theirs, atol=4 * atol * scale, rtol=4 * rtol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", [*CORE_BACKENDS, "cpu"])
def test_bf16_statistics_are_fp32(backend):
    """bf16 input with an offset: its statistics must be accumulated in fp32.

    x = 64 + randn over 4096 values per group. bf16 holds 64 + z with a step of 0.5, so the
    *input* is coarse but exact; a mean or variance accumulated in bf16 would lose the unit
    variance entirely (64² = 4096 with an 8-bit mantissa), while fp32 statistics give the
    float64 answer on the same bf16 input to about an output ulp.
    """
    x = (torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(5)) + 64).bfloat16()
    ref = group_norm_reference(x.double(), 2)
    y = group_norm(x, 2, backend=backend)
    assert (y.double() - ref).abs().max().item() <= 2 ** -8 * ref.abs().max().item() * 2
    naive = x.reshape(2, 2, -1)  # the same formula with bf16 accumulation fails the bound
    m = naive.mean(-1, keepdim=True, dtype=torch.bfloat16)
    v = ((naive - m) ** 2).mean(-1, keepdim=True, dtype=torch.bfloat16)
    bad = ((naive - m) / torch.sqrt(v + 1e-5)).reshape(x.shape)
    assert (bad.double() - ref).abs().max().item() > 2 ** -8 * ref.abs().max().item() * 2


def test_group_size_equals_num_groups():
    x = torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(group_norm(x, group_size=4), group_norm(x, num_groups=3))


@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"])
@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_fused_activation_and_residual(activation, backend):
    x, w, b = _inputs((2, 8, 4, 4), torch.float64, torch.contiguous_format)
    r = torch.randn_like(x)
    for t in (x, w, b, r):
        t.requires_grad_(True)
    y = group_norm(x, 4, w, b, activation=activation, residual=r, backend=backend)
    expected = F.group_norm(x, 4, w, b) + r
    expected = {None: lambda t: t, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}[activation](
        expected)
    torch.testing.assert_close(y, expected)
    got = torch.autograd.grad(y.sum(), (x, w, b, r))
    want = torch.autograd.grad(expected.sum(), (x, w, b, r))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(backend):
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: group_norm(x, 3, w, b, backend=backend), (x, w, b))
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: group_norm(x, 3, w, b, backend=backend), (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: group_norm(x, 3, w, b, activation="silu", residual=r,
                                      backend=backend), (x, w, b, r))


def test_identities_layernorm_and_instancenorm():
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(group_norm(x, 1), F.layer_norm(x, x.shape[1:]))
    torch.testing.assert_close(group_norm(x, 6), F.instance_norm(x))


# --- robustness ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CORE_BACKENDS + ["cpu"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_large_mean_offset_fp32(backend, fmt, requires_grad):
    """Offset 1e4, unit variance: E[x²]−E[x]² in fp32 is wrong by ~300x; we need ≤ 2e-3.

    aten's own CPU channels-last kernel fails this (relative error ~313 with torch 2.13); the
    "torch" backend routes around it.
    """
    x = torch.randn(4, 32, 16, 16, generator=torch.Generator().manual_seed(3)) + 1e4
    ref = group_norm_reference(x.double(), 8)
    x = x.contiguous(memory_format=fmt).requires_grad_(requires_grad)
    y = group_norm(x, 8, backend=backend)
    assert y.is_contiguous(memory_format=fmt)
    rel = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 2e-3, rel


def test_naive_formula_fails_at_offset_so_the_test_can_fail():
    """The offset test above is meaningful: the one-pass formula in fp32 breaks on it."""
    x = torch.randn(4, 32, 16, 16, generator=torch.Generator().manual_seed(3)) + 1e4
    xg = x.reshape(4, 8, -1)
    var = (xg * xg).mean(-1, keepdim=True) - xg.mean(-1, keepdim=True) ** 2
    y = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(var.clamp_min(0) + 1e-5)).reshape(x.shape)
    ref = group_norm_reference(x.double(), 8)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() > 2e-3


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_fp16_large_magnitude_no_overflow(backend):
    x = (torch.rand(2, 8, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1) * 6e4
    x = x.half()
    y = group_norm(x, 4, backend=backend)
    assert torch.isfinite(y).all()
    ref = group_norm_reference(x.double(), 4)
    assert (y.double() - ref).abs().max().item() < 4e-3 * ref.abs().max().item()


@pytest.mark.parametrize("backend", [*CORE_BACKENDS, "cpu"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (2, 64, 64, 48)], ids=["tiny", "auto-uses-cpu"])
def test_nan_and_inf_propagate(backend, fmt, shape):
    x = torch.randn(shape)
    x[0, 0, 0, 0] = float("nan")
    x[1, -1, 1, 1] = float("inf")
    x = x.contiguous(memory_format=fmt)
    y = group_norm(x, 2, backend=backend)
    h = shape[1] // 2
    assert torch.isnan(y[0, :h]).all(), "the NaN's group becomes NaN"
    assert torch.isfinite(y[0, h:]).all() and torch.isfinite(y[1, :h]).all(), "others untouched"
    assert torch.isnan(y[1, h:]).all(), "the Inf's group becomes NaN (Inf - Inf), as torch's"


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 8, 4, 4, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    y = group_norm(x, 4, w, b, backend=backend)
    assert y.shape == (0, 8, 4, 4)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    # as torch.nn.GroupNorm: zero (not missing) gradients for γ and β
    assert torch.equal(w.grad, torch.zeros(8)) and torch.equal(b.grad, torch.zeros(8))


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_groups=3), r"num_channels \(8\) must be divisible by num_groups \(3\).*such as 4"),
    (dict(group_size=3), r"num_channels \(8\) must be divisible by group_size \(3\)"),
    (dict(num_groups=2, group_size=4), r"exactly one of num_groups / group_size.*num_groups=2"),
    (dict(), r"exactly one of num_groups / group_size.*None"),
    (dict(num_groups=0), r"num_groups must be a positive integer, got 0"),
    (dict(num_groups=2, weight=torch.ones(7)), r"weight must have shape \(8,\).*got \(7,\)"),
    (dict(num_groups=2, bias=torch.ones(8, 1)), r"bias must have shape \(8,\).*got \(8, 1\)"),
    (dict(num_groups=2, residual=torch.ones(2, 8, 4)), r"residual must have the shape of x"),
    (dict(num_groups=2, activation="tanh"), r"activation must be None or one of"),
    (dict(num_groups=2, backend="cuda"), r"backend must be one of"),
    (dict(num_groups=2, eps=-1.0), r"eps must be a finite number >= 0, got -1.0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_norm(torch.randn(2, 8, 4, 4), **kwargs)


@pytest.mark.parametrize("shape", [(8,), (2, 8, 2, 2, 2, 2)])
def test_bad_rank(shape):
    with pytest.raises(ValueError, match=rf"ndim 2-5\); got ndim={len(shape)}"):
        group_norm(torch.randn(shape), 2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_dtypes(dtype):
    with pytest.raises(TypeError, match=rf"floating-point tensor .* got {dtype}"):
        group_norm(torch.ones(2, 4, 3, dtype=dtype), 2)


def test_public_api_exports():
    for name in groupnorm.__all__:
        assert hasattr(groupnorm, name), name


# --- mixed parameter dtypes -------------------------------------------------------------------

PARAM_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", [*CORE_BACKENDS, "cpu"])
@pytest.mark.parametrize("x_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("p_dtype", PARAM_DTYPES, ids=str)
def test_mixed_param_dtypes_same_on_every_backend(x_dtype, p_dtype, backend, monkeypatch):
    """γ/β in another dtype than x: torch's rule on every backend — equal dtypes, or fp32
    γ/β with fp16/bf16 x (mixed precision) — else one error naming both dtypes."""
    from groupnorm import kernels

    if backend == "auto":  # force auto onto the C++ path, where the mix used to pass
        for key in kernels.CPU_AUTO_TABLE:
            monkeypatch.setitem(kernels.CPU_AUTO_TABLE, key, (0, 1 << 62))
    x = torch.randn(2, 4, 3, 3).to(x_dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4).to(p_dtype) + 0.5, torch.randn(4).to(p_dtype)
    allowed = p_dtype == x_dtype or (x_dtype in (torch.float16, torch.bfloat16)
                                     and p_dtype == torch.float32)
    if not allowed:
        with pytest.raises(TypeError, match=rf"weight {p_dtype}, bias {p_dtype}.*{x_dtype}"):
            group_norm(x, 2, w, b, backend=backend)
        with pytest.raises(TypeError, match=rf"weight {p_dtype}\).*{x_dtype}"):
            group_norm(x, 2, w, None, backend=backend)
        return
    y = group_norm(x, 2, w, b, backend=backend)
    want = F.group_norm(x.contiguous(), 2, w, b)  # aten accepts exactly these combinations
    assert y.dtype == want.dtype == x_dtype
    atol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(x_dtype, 2e-2)
    torch.testing.assert_close(y, want.contiguous(memory_format=torch.channels_last), atol=atol,
                               rtol=atol)


def test_residual_dtype_must_match():
    with pytest.raises(TypeError, match=r"residual dtype torch.float64 differs .* torch.float32"):
        group_norm(torch.randn(2, 4, 3), 2, residual=torch.randn(2, 4, 3, dtype=torch.float64))
