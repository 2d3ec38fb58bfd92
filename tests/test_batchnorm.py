"""BN on virtual workers through aten's kernels vs the per-chunk oracle, float64 and the old path.

``worker_batch_norm`` (what ``BatchNorm(virtual_batch=n)`` runs) makes one aten batch-norm call per
worker; ``per_chunk_batch_norm`` is the per-chunk formula in plain tensor ops, which is also the
path BatchNorm took before. Checked here, over a labelled table of ranks, layouts and uneven
batches: values, dx, dγ, dβ, second derivatives and running statistics against the float64
oracle; and the statistics themselves: where they differ from the old float32 path, that the
difference is the reduction order alone (aten's order is reproduced bit for bit in NumPy, and on
inputs whose sums are exact in any order both paths agree bit for bit), with the tightest bound
that holds against the exact float64 statistics.
"""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch

from groupnorm.layers import batchnorm as bn_module
from groupnorm.layers.batchnorm import (
    BatchNorm,
    BatchRenorm,
    SyncBatchNorm,
    per_chunk_batch_norm,
    worker_batch_norm,
)

CL, CL3 = torch.channels_last, torch.channels_last_3d

# (label, shape, n, memory format): the table every check runs on.
TABLE = [
    ("1d (N, C)", (12, 6), 4, None),
    ("1d (N, C, L)", (12, 6, 5), 4, None),
    ("2d", (16, 6, 5, 5), 4, None),
    ("2d channels_last", (16, 6, 5, 5), 4, CL),
    ("3d", (8, 4, 3, 4, 5), 2, None),
    ("3d channels_last_3d", (8, 4, 3, 4, 5), 2, CL3),
    ("uneven 4+4+2", (10, 4, 3, 3), 4, None),
    ("uneven 4+4+2 channels_last", (10, 4, 3, 3), 4, CL),
    ("tail of one sample, one value per channel", (9, 5), 4, None),
    ("n=1 (one sample per worker)", (4, 3, 4, 4), 1, None),
    ("the study's n=2, W=4", (8, 16, 8, 8), 2, CL),
]


def ids(table):
    return [row[0] for row in table]


def _inputs(shape, fmt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1  # mean offset on purpose
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, w.to(dtype), b.to(dtype), dy.to(dtype)


def _run(fn, x, n, w, b, dy):
    """y, dx, dw, db, chunk means, chunk unbiased variances of fn on fresh leaves."""
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))  # clone keeps layout
    y, means, unbiased = fn(x, n, w, b, 1e-5)
    y.backward(dy)
    return y, x.grad, w.grad, b.grad, means, unbiased


@pytest.mark.parametrize("label,shape,n,fmt", TABLE, ids=ids(TABLE))
def test_workers_equal_the_per_chunk_oracle_in_float64(label, shape, n, fmt):
    x, w, b, dy = _inputs(shape, fmt, torch.float64)
    ours = _run(worker_batch_norm, x, n, w, b, dy)
    oracle = _run(per_chunk_batch_norm, x, n, w, b, dy)
    for name, a, e in zip(("y", "dx", "dw", "db", "means", "unbiased"), ours, oracle, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10, msg=f"{label}: {name}")
    if fmt is not None:  # the layout is kept on the way out and for the gradient
        assert ours[0].is_contiguous(memory_format=fmt) and ours[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("label,shape,n,fmt", TABLE, ids=ids(TABLE))
def test_workers_float32_vs_float64_oracle_and_the_old_path(label, shape, n, fmt):
    x, w, b, dy = _inputs(shape, fmt, torch.float32)
    ours = _run(worker_batch_norm, x, n, w, b, dy)
    old = _run(per_chunk_batch_norm, x, n, w, b, dy)
    exact = _run(per_chunk_batch_norm, x.double(), n, w.double(), b.double(), dy.double())
    names = ("y", "dx", "dw", "db", "means", "unbiased")
    for name, a, o, e in zip(names, ours, old, exact, strict=True):
        # float32's usual tolerance, except y of a one-value-per-channel worker: there x̂ = 0 and
        # aten folds γ into 1/sqrt(eps) ≈ 316, so y = x·α + (β − x·α) cancels to ulp(316·x).
        atol = 1e-4 if (name == "y" and "one value" in label) else 2e-5
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=1e-5, msg=f"{label}: {name}")
        torch.testing.assert_close(a, o, atol=atol, rtol=1e-5, msg=f"{label}: {name} vs old")


@pytest.mark.parametrize("label,shape,n,fmt", [TABLE[i] for i in (1, 3, 5, 7)],
                         ids=ids([TABLE[i] for i in (1, 3, 5, 7)]))
def test_second_derivatives_match_the_oracle(label, shape, n, fmt):
    """Double backward (dx of a function of dx, dγ): aten's formula vs the plain-ops oracle."""
    x, w, b, dy = _inputs(shape, fmt, torch.float64)
    v = torch.randn_like(x)

    def second(fn):
        xx, ww, bb = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        y = fn(xx, n, ww, bb, 1e-5)[0]
        gx, gw = torch.autograd.grad((y * dy).sum(), (xx, ww), create_graph=True)
        return torch.autograd.grad((gx * v).sum() + gw.square().sum(), (xx, ww, bb),
                                   allow_unused=True)

    for a, e in zip(second(worker_batch_norm), second(per_chunk_batch_norm), strict=True):
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8, msg=label)


@pytest.mark.parametrize("label,shape,n,fmt", TABLE, ids=ids(TABLE))
def test_module_running_stats_are_the_workers_average_once_per_step(label, shape, n, fmt):
    x, w, b, _ = _inputs(shape, fmt, torch.float64)
    m = BatchNorm(shape[1], momentum=0.1, virtual_batch=n).double()
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        m.running_var.fill_(2.0)
    y = m(x)
    ref, means, unbiased = per_chunk_batch_norm(x, n, w, b)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(m.running_mean, 0.1 * means.mean(0), atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(m.running_var, 0.9 * 2.0 + 0.1 * unbiased.mean(0),
                               atol=1e-14, rtol=1e-12)
    assert int(m.num_batches_tracked) == 1
    m.eval()  # eval: the running statistics, whatever virtual_batch says
    torch.testing.assert_close(m(x), torch.nn.functional.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias))


def test_low_precision_input_keeps_fp32_statistics():
    """bf16 activations in an fp32 module: aten's mixed-precision path, statistics in fp32."""
    x, w, b, dy = _inputs((16, 8, 4, 4), CL, torch.float32)
    m = BatchNorm(8, virtual_batch=4)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    xb = x.bfloat16().requires_grad_(True)
    y = m(xb)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    y.backward(dy.bfloat16())
    ref, means, unbiased = per_chunk_batch_norm(xb.detach().double(), 4, w.double(), b.double())
    torch.testing.assert_close(y.double(), ref, atol=3e-2, rtol=1.6e-2)
    assert m.running_mean.dtype == torch.float32
    torch.testing.assert_close(m.running_mean.double(), 0.1 * means.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.running_var.double(), 0.9 + 0.1 * unbiased.mean(0), atol=1e-6,
                               rtol=1e-5)


# --- the statistics: why they are not bit-for-bit the old path's, and how close they are -------


def _aten_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One worker's (mean, unbiased variance) as worker_batch_norm gets them from aten."""
    _, means, unbiased = worker_batch_norm(x, x.shape[0])
    return means[0].numpy(), unbiased[0].numpy()


def _nchw_order(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """aten's reduction for contiguous NCHW float32 (batch_norm_cpu_collect_stats_contiguous):
    per channel, a sequential float64 sum in memory order; var_sum = Σ fl32((x−m)²) summed in
    float64 then stored as float32; unbiased = fl32(var_sum / (count − 1))."""
    n, c = x.shape[:2]
    per_channel = x.reshape(n, c, -1).transpose(1, 0, 2).reshape(c, -1)
    count = per_channel.shape[1]
    means, unbiased = np.empty(c, np.float32), np.empty(c, np.float32)
    for k in range(c):
        s = 0.0
        for v in per_channel[k].astype(np.float64).tolist():
            s += v
        m = np.float32(s / count)
        d = per_channel[k] - m  # float32
        s2 = 0.0
        for v in (d * d).astype(np.float64).tolist():
            s2 += v
        means[k], unbiased[k] = m, np.float32(np.float64(np.float32(s2)) / (count - 1))
    return means, unbiased


def _rows_order(rows: np.ndarray, fused: bool) -> tuple[np.ndarray, np.ndarray]:
    """aten's reduction for channels-last and (N, C) float32 input on one thread
    (batch_norm_cpu_collect_stats_channels_last): one float32 accumulator per channel, rows added
    in memory order; var accumulates (x−m)² the same way, as one fused multiply-add when the
    compiler contracted it (``fused``); unbiased = fl32(fl32(var_sum) / (count − 1))."""
    count = rows.shape[0]
    acc = np.zeros(rows.shape[1], np.float32)
    for r in rows:
        acc = acc + r
    m = np.float32(acc.astype(np.float64) / count)
    acc = np.zeros(rows.shape[1], np.float32)
    for r in rows:
        d = r - m
        if fused:  # fl32(acc + d·d) with one rounding: d·d and the sum are exact in long double
            acc = (acc.astype(np.longdouble) + d.astype(np.longdouble) ** 2).astype(np.float32)
        else:
            acc = acc + d * d
    return m, np.float32(acc.astype(np.float64) / (count - 1))


@pytest.mark.parametrize("shape,fmt", [((3, 5, 6, 7), None), ((3, 5, 6, 7), CL), ((40, 6), None),
                                       ((2, 4, 3, 5, 6), CL3)],
                         ids=["NCHW", "channels_last", "(N, C)", "channels_last_3d"])
def test_statistics_are_atens_reduction_order_bit_for_bit(shape, fmt):
    """The statistics are exactly aten's documented summation order, reproduced in NumPy: the
    only source of their difference from the old path (torch.mean in float32)."""
    x, *_ = _inputs(shape, fmt, torch.float32, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the channels-last kernel splits rows over threads
    try:
        means, unbiased = _aten_stats(x)
    finally:
        torch.set_num_threads(threads)
    if fmt is None and len(shape) > 2:
        expected = [_nchw_order(x.numpy())]
    else:  # rows = (N·spatial, C) in memory order
        rows = x.movedim(1, -1).reshape(-1, shape[1]).numpy()
        expected = [_rows_order(rows, fused=True), _rows_order(rows, fused=False)]
    assert any(np.array_equal(means, m) and np.array_equal(unbiased, v) for m, v in expected), (
        f"aten's statistics {means}, {unbiased} are not the documented order's {expected}")


def test_statistics_equal_the_old_path_bit_for_bit_when_sums_are_exact():
    """Small integers with a power-of-two count per worker: every partial sum and the mean are
    exact in float32 whatever the order, so the formulas (two-pass, biased → unbiased, chunking,
    averaging) must agree bit for bit. Means do; the unbiased variance is fl(S/(k−1)) for aten and
    fl(fl(S/k)·fl(k/(k−1))) for the old path, so the old one is within 1 ulp of aten's, which is
    the correctly rounded value."""
    g = torch.Generator().manual_seed(0)
    for shape, n, fmt in (((16, 8, 4, 4), 4, None), ((16, 8, 4, 4), 4, CL), ((32, 8), 8, None)):
        x = torch.randint(-8, 9, shape, generator=g).float()
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        _, m_new, v_new = worker_batch_norm(x, n)
        _, m_old, v_old = per_chunk_batch_norm(x, n)
        assert torch.equal(m_new, m_old), shape
        exact = per_chunk_batch_norm(x.double(), n)[2]
        assert torch.equal(v_new, exact.float()), "aten's unbiased variance is correctly rounded"
        ulp = torch.nextafter(v_new, torch.full_like(v_new, float("inf"))) - v_new
        assert ((v_old - v_new).abs() <= ulp).all(), shape
        for momentum in (1.0, 0.1):  # and the module's running buffers
            new, old = BatchNorm(shape[1], momentum=momentum, virtual_batch=n), BatchNorm(
                shape[1], momentum=momentum, virtual_batch=n)
            new(x)
            with torch.no_grad():
                old.running_mean.lerp_(m_old.mean(0), momentum)
            assert torch.equal(new.running_mean, old.running_mean)


def _ulps(a: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|a − exact| in units of the float32 spacing at |exact|."""
    e32 = exact.float().abs()
    spacing = (torch.nextafter(e32, torch.full_like(e32, float("inf"))) - e32).double()
    return (a.double() - exact).abs() / spacing


def test_statistics_bounds_against_float64():
    """The tightest bounds that hold (each follows from the order above):

    * NCHW: the mean is within 0.5 ulp of the exact mean (a float64 sum of at most 2**24 float32
      values is exact to ~2**-29 ulp, then one rounding); the unbiased variance within 2 ulp
      (each (x−m)² is rounded twice, ≤ 1.5 ulp relative, in a float64 sum, then two roundings).
    * channels-last: a float32 running sum, |error| ≤ (count−1)·u·Σ|x| (Higham's bound for
      recursive summation), plus the final rounding.

    The old path (torch.mean in float32) fails the first bound: its means stray by up to a few
    ulp, which is where the two paths differ.
    """
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(128, 16, 16, 16, generator=g) * 2 + 3)
    exact_m, exact_v = (t for t in per_chunk_batch_norm(x.double(), 32)[1:])
    _, m, v = worker_batch_norm(x, 32)
    assert _ulps(m, exact_m).max() <= 0.5 + 1e-6
    assert _ulps(v, exact_v).max() <= 2.0
    old_m = per_chunk_batch_norm(x, 32)[1]
    assert _ulps(old_m, exact_m).max() > 0.5  # the bound is not vacuous: the old path breaks it

    xc = x.contiguous(memory_format=CL)
    _, m_cl, v_cl = worker_batch_norm(xc, 32)
    count = 32 * 16 * 16
    u = 2.0 ** -24
    abs_mean = x.double().abs().reshape(4, 32, 16, -1).transpose(1, 2).reshape(4, 16, -1).mean(-1)
    bound = (count - 1) * u * abs_mean + 0.5 * (m_cl.double().abs() * 2 * u)
    assert ((m_cl.double() - exact_m).abs() <= bound).all()
    assert torch.isfinite(v_cl).all()


# --- Batch Renorm on workers ---------------------------------------------------------------------


def test_brn_workers_apply_r_and_d_per_chunk():
    """BRN with virtual workers and an uneven tail: each chunk x̂·r + d with its own statistics
    against the running ones (float64 formula), then γ, β; r and d constant in the gradient."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(10, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1).contiguous(
        memory_format=CL).requires_grad_(True)
    m = BatchRenorm(3, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0,
                    virtual_batch=4).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, 1.0, 1.5]))
        m.running_var.copy_(torch.tensor([1.0, 4.0, 9.0]))
        m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    assert y.is_contiguous(memory_format=CL)
    x2 = x.detach().clone().requires_grad_(True)
    parts = []
    for p in x2.split(4):
        mean = p.mean((0, 2, 3))
        std = (p.var((0, 2, 3), unbiased=False) + m.eps).sqrt()
        rs = (rv + m.eps).sqrt()
        r = (std.detach() / rs).clamp(1 / 1.5, 1.5)
        d = ((mean.detach() - rm) / rs).clamp(-0.5, 0.5)
        xhat = (p - mean[:, None, None]) / std[:, None, None]
        parts.append((xhat * r[:, None, None] + d[:, None, None]) * m.weight[:, None, None]
                     + m.bias[:, None, None])
    expected = torch.cat(parts)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)


# --- the import graph ----------------------------------------------------------------------------


def test_batchnorm_module_imports_nothing_that_imports_it():
    """layers/batchnorm imported convert (→ factory → batchnorm) for convert_sync_batchnorm."""
    tree = ast.parse(inspect.getsource(bn_module))
    imported = {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"convert", "factory", ".convert", ".factory"}, imported


def test_convert_sync_batchnorm_carries_state_and_leaves_other_norms():
    from torch import nn

    from groupnorm.layers import GroupNorm

    bn = nn.BatchNorm2d(4, momentum=0.2, eps=1e-3)
    bn(torch.randn(8, 4, 3, 3) * 3 + 1)
    brn = BatchRenorm(4)
    ours = BatchNorm(4, virtual_batch=2, dim=2)
    model = nn.Sequential(bn, nn.Sequential(GroupNorm(2, 4), brn, ours))
    out = SyncBatchNorm.convert_sync_batchnorm(model)
    sync = out[0]
    assert type(sync) is SyncBatchNorm and sync.momentum == 0.2 and sync.eps == 1e-3
    assert torch.equal(sync.running_mean, bn.running_mean)
    assert torch.equal(sync.running_var, bn.running_var)
    assert int(sync.num_batches_tracked) == 1
    assert type(out[1][0]) is GroupNorm and out[1][1] is brn
    assert type(out[1][2]) is SyncBatchNorm and out[1][2].virtual_batch == 2
    assert out[1][2].dim == 2
    root = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert type(root) is SyncBatchNorm
