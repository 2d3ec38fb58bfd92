"""The C++ CPU backend ("cpu") vs the float64 oracle: values and gradients, layouts, dtypes,
fused variants, determinism, robustness, and the torch fallback."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from groupnorm.kernels import BackendUnavailable, auto_backend, group_norm_fast
from groupnorm.kernels.cpu_ext import load_cpu_ext
from groupnorm.kernels.testing import backward_is_deterministic, make_input, parity_errors

pytestmark = pytest.mark.skipif(not load_cpu_ext(), reason="C++ CPU extension did not build")

# (label, shape, num_groups) at realistic sizes for the CPU (a few ms each).
SHAPES = [
    ("resnet stage", (4, 64, 28, 28), 32),
    ("C/G odd", (3, 45, 9, 11), 5),  # Cg = 9, N = 3: NHWC uses the chunked (not per-sample) path
    ("G=1 (LN)", (2, 24, 13, 13), 1),
    ("G=C (IN)", (2, 16, 10, 10), 16),
    ("N=1 large spatial", (1, 32, 96, 96), 8),  # NHWC row chunks split across threads
    ("video 3d", (2, 16, 4, 12, 12), 4),
    ("1d", (3, 12, 50), 3),
    ("no spatial", (6, 12), 4),
    ("spatial 1x1", (5, 8, 1, 1), 2),
]

# Worst error / max(1, |ref|) allowed per dtype. fp32: accumulation over up to ~10^4 terms in
# fp32 blocks; fp16 / bf16: output rounding (2^-11, 2^-8 relative) on values up to ~5, and the
# gradient is computed from rounded dy.
TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _check(errs: dict[str, float], dtype: torch.dtype) -> None:
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"errors above {TOL[dtype]} for {dtype}: {bad} (all: {errs})"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("label,shape,groups", SHAPES, ids=[s[0] for s in SHAPES])
def test_plain_fp32(label, shape, groups, layout):
    _check(parity_errors("cpu", shape, groups, torch.float32, layout), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", [((3, 45, 9, 11), 5), ((2, 16, 4, 6, 6), 4)])
def test_dtypes(shape, groups, layout, dtype):
    _check(parity_errors("cpu", shape, groups, dtype, layout), dtype)


@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fused(activation, residual, layout):
    for dtype in (torch.float32, torch.bfloat16):
        errs = parity_errors("cpu", (3, 32, 11, 13), 8, dtype, layout, activation, residual)
        _check(errs, dtype)


# Large outputs are written with non-temporal stores (gn_cpu.cpp: write_row); the threshold is
# read from GROUPNORM_CPU_STREAM_MIN_BYTES at every call, so 0 streams these small tensors too.
# Shapes: rows that are not a multiple of 64 bytes (unaligned head and tail), NCHW rows longer
# than the 4 KB staging buffer, NHWC rows at the 256-byte minimum and below it (not streamed).
STREAM_CASES = [
    ("nchw", (3, 12, 45, 37), 4, torch.float32),   # row = 1665 floats: 2 buffers, odd tail
    ("nchw", (2, 8, 9, 11), 2, torch.bfloat16),    # row = 99 bf16 = 198 B
    ("nhwc", (3, 72, 9, 11), 8, torch.float32),    # row = 288 B
    ("nhwc", (2, 128, 5, 7), 16, torch.bfloat16),  # row = 256 B
    ("nhwc", (2, 40, 6, 6), 8, torch.float32),     # row = 160 B: below the minimum
]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout,shape,groups,dtype", STREAM_CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[3]}" for c in STREAM_CASES])
def test_streaming_stores_change_no_bit(monkeypatch, layout, shape, groups, dtype, activation,
                                        residual):
    from groupnorm.kernels.testing import run_op

    torch.manual_seed(0)
    x = make_input(shape, layout, dtype)
    w = (torch.rand(shape[1]) + 0.5).to(dtype)
    b = torch.randn(shape[1]).to(dtype)
    r = make_input(shape, layout, dtype, offset=0.0, scale=1.0) if residual else None
    dy = make_input(shape, layout, dtype, offset=0.0, scale=1.0)
    outs = {}
    for name, threshold in (("streamed", "0"), ("cached", str(1 << 62))):
        monkeypatch.setenv("GROUPNORM_CPU_STREAM_MIN_BYTES", threshold)
        outs[name] = run_op("cpu", x, groups, w, b, r, activation, dy)
    for k, v in outs["cached"].items():
        assert torch.equal(outs["streamed"][k], v), f"{k} differs when streamed"
    monkeypatch.setenv("GROUPNORM_CPU_STREAM_MIN_BYTES", "0")
    _check(parity_errors("cpu", shape, groups, dtype, layout, activation, residual), dtype)


def test_no_affine():
    _check(parity_errors("cpu", (2, 12, 5, 5), 3, torch.float32, "nhwc", "silu", True,
                         affine=False), torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_large_offset_is_robust(layout):
    # mean 1000, std 2: E[x^2] - E[x]^2 in fp32 would give errors of order 1. What is left is the
    # fp32 mean itself (ulp(1000) = 6e-5, i.e. 3e-5 / std on x̂), hence 4e-4 rather than 5e-5.
    errs = parity_errors("cpu", (2, 16, 20, 20), 4, torch.float32, layout, offset=1000.0)
    assert max(errs.values()) < 4e-4, errs


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_backward_is_deterministic(layout):
    assert backward_is_deterministic("cpu", (3, 64, 20, 20), layout, 16, "silu")


# The NHWC schedule (gn_cpu.cpp: nhwc_plan) depends on GROUPNORM_CPU_SLAB_CACHE_BYTES, read at
# every call. For (3, 48, 16, 16) fp32 (37K elements: above kSerialElems, so 2 threads do run) a
# sample's slab is 49 KB (forward: x), 98 KB (backward: x and dy) or 147 KB (with the residual).
# Budget 0: the blocked two-pass sweep (one sample at a time, every chunk from DRAM, output pass
# backwards, dz recomputed); 300 KB: per-sample tasks on 1 thread; on 2 threads (N = 3 does not
# balance) cached sweeps of 2-3 samples, the fused backward keeping dz; 2^50: per-sample tasks
# on 1 thread, one cached sweep of all samples on 2.
SCHEDULE_BUDGETS = ("0", str(300_000), str(1 << 50))


@pytest.mark.parametrize("activation,residual,dtype", [(None, False, torch.float32),
                                                       ("silu", True, torch.float32),
                                                       ("gelu", False, torch.bfloat16)])
def test_nhwc_schedules_give_the_same_bits(monkeypatch, activation, residual, dtype):
    from groupnorm.kernels.testing import run_op

    shape, groups = (3, 48, 16, 16), 6
    torch.manual_seed(0)
    x = make_input(shape, "nhwc", dtype)
    w = (torch.rand(shape[1]) + 0.5).to(dtype)
    b = torch.randn(shape[1]).to(dtype)
    r = make_input(shape, "nhwc", dtype, offset=0.0, scale=1.0) if residual else None
    dy = make_input(shape, "nhwc", dtype, offset=0.0, scale=1.0)
    outs = {}
    old = torch.get_num_threads()
    try:
        for budget in SCHEDULE_BUDGETS:
            monkeypatch.setenv("GROUPNORM_CPU_SLAB_CACHE_BYTES", budget)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs[budget, threads] = run_op("cpu", x, groups, w, b, r, activation, dy)
    finally:
        torch.set_num_threads(old)
    first = outs["0", 1]
    for key, out in outs.items():
        for k, v in first.items():
            assert torch.equal(out[k], v), f"{k} differs between schedules ('0', 1) and {key}"
    for budget in SCHEDULE_BUDGETS[::2]:  # and each is right, not only equal to the others
        monkeypatch.setenv("GROUPNORM_CPU_SLAB_CACHE_BYTES", budget)
        _check(parity_errors("cpu", shape, groups, dtype, "nhwc", activation, residual), dtype)


def _silu_through_kernel(z: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, ...]:
    """silu(z) and silu'(z) as the C++ kernels compute them, for any fp32 values z.

    With weight 0 the pre-activation is exactly the bias (x * 0 + b), so a (1, C, 1, 2) input
    whose bias holds C values of z runs them through the forward's vectorized activation (both
    rows: y[..., 0] and y[..., 1]); with dy = 1 the bias gradient is 2 silu'(z), summed in
    double, so halving it is exact.
    """
    c = z.numel()
    x = torch.randn(1, c, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    w = torch.zeros(c)
    y, mean, rstd = torch.ops.groupnorm_cpu.fwd(x, w, z, None, 1, 1e-5, 2, channels_last)
    _, _, db, _ = torch.ops.groupnorm_cpu.bwd(torch.ones_like(x), x, w, z, None, mean, rstd, 1,
                                              2, channels_last, False)
    return y[0, :, 0, 0], y[0, :, 0, 1], db / 2


def test_silu_error_bound():
    """The vectorized SiLU (gn_cpu.cpp: exp_nonpos, sigmoid) against float64 over every range.

    Bounds, with what was measured on 2026-11-30 (torch's own fp32 F.silu in brackets):
    silu: relative 4e-7 where z >= -87 and the result is a normal float (2.1e-7 [1.6e-7]).
    silu' = s (1 + z (1 - s)), s = sigmoid(z), for z >= -87: error <= 2e-6 (|s| + |s z (1 - s)|),
    the size of its terms (9.8e-7 [9.8e-7]; 1 + z (1 - s) cancels near z = -1.28, in float64
    torch too), and relative 2e-6 where |silu'| > 0.01 (1.3e-6 [1.2e-6]).
    Both for z < -87, where e^z is below FLT_MIN and flushed to 0 from z = -87.7: absolute 1e-36
    (7.3e-37 [torch: 0 below z = -88.7]). NaN and ±inf come out where float64 has them
    (silu(-inf) and silu'(±inf) are NaN, as torch's; silu(+inf) = +inf).
    """
    import numpy as np

    tiny = float(np.finfo(np.float32).tiny)
    z = np.concatenate([
        np.linspace(-110, 110, 1 << 20),                   # dense, past both ends of exp's range
        np.geomspace(1e-45, 3e38, 20000), -np.geomspace(1e-45, 3e38, 20000),  # every binade
        [0.0, -0.0, np.inf, -np.inf, np.nan, tiny, -tiny, 1e-40, -1e-40, 87.0, -87.0, -88.7,
         -103.9, -104.0, -150.0],
    ]).astype(np.float32)
    zt = torch.from_numpy(z)
    y0, y1, dsilu = _silu_through_kernel(zt, channels_last=True)
    # the NCHW path computes the same values (rows of 2: scalar code rather than vectors)
    n0, _, nd = _silu_through_kernel(zt, channels_last=False)
    for a, b in ((y0, y1), (y0, n0), (dsilu, nd)):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    zd = z.astype(np.float64)
    with np.errstate(all="ignore"):
        e = np.exp(-np.abs(zd))
        s = np.where(zd >= 0, 1 / (1 + e), e / (1 + e))
        ref, dref = zd * s, s * (1 + zd * (1 - s))
    ours, dours = y0.double().numpy(), dsilu.double().numpy()
    for name, a, r in (("silu", ours, ref), ("silu'", dours, dref)):
        assert np.array_equal(np.isnan(a), np.isnan(r)), f"{name}: NaN at other inputs"
        inf = np.isinf(r)
        assert np.array_equal(a[inf], r[inf]), f"{name}: ±inf differ"

    def worst(err: np.ndarray, scale: np.ndarray, mask: np.ndarray) -> float:
        return float((err[mask] / scale[mask]).max())

    with np.errstate(invalid="ignore"):  # inf - inf, NaN: masked out below
        err, derr = np.abs(ours - ref), np.abs(dours - dref)
        terms = np.abs(s) + np.abs(s * zd * (1 - s))  # the size of the derivative's terms
    body = zd >= -87  # e^-|z| is a normal float
    for name, e, r in (("silu", err, ref), ("silu'", derr, dref)):
        assert worst(e, np.ones_like(r), np.isfinite(r) & ~body) <= 1e-36, name
    fin = np.isfinite(ref)
    assert worst(err, np.abs(ref), fin & body & (np.abs(ref) >= tiny)) <= 4e-7
    fin = np.isfinite(dref) & body
    assert worst(derr, terms, fin & (np.abs(dref) >= tiny)) <= 2e-6
    assert worst(derr, np.abs(dref), fin & (np.abs(dref) > 0.01)) <= 2e-6


def test_thread_count_does_not_change_results():
    x = make_input((3, 32, 30, 30), "nhwc", torch.float32).requires_grad_()
    w = torch.rand(32, requires_grad=True)
    dy = torch.randn_like(x)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = group_norm_fast("cpu", x, 8, w, None, 1e-5, None, None)
            outs.append((y, *torch.autograd.grad(y, [x, w], dy)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_non_dense_input_and_mixed_residual_layout():
    x = torch.randn(2, 8, 6, 10)[..., ::2]  # strided: neither contiguous nor channels_last
    r = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    y = group_norm_fast("cpu", x, 4, None, None, 1e-5, "relu", r)
    from groupnorm.oracle import group_norm_reference

    torch.testing.assert_close(y, group_norm_reference(x, 4, None, None, 1e-5, "relu", r))


def test_errors_and_auto():
    with pytest.raises(BackendUnavailable, match="int64"):
        group_norm_fast("cpu", torch.ones(2, 4, 3, dtype=torch.int64), 2, None, None, 1e-5,
                        None, None)
    with pytest.raises(ValueError, match="activation"):
        group_norm_fast("cpu", torch.ones(2, 4, 3), 2, None, None, 1e-5, "tanh", None)
    x = torch.randn(2, 8, 4, 4)
    assert auto_backend(x, 4, None, None) == "torch"  # inference, plain: torch (see table)
    assert auto_backend(x.double(), 4, None, None) == "torch"
    big = torch.randn(4, 64, 64, 64).contiguous(memory_format=torch.channels_last)
    assert auto_backend(big, 32, None, None) == "cpu"  # NHWC inference (torch's is not robust)
    assert auto_backend(big.requires_grad_(), 32, None, None) == "cpu"  # NHWC training
    assert auto_backend(big[:1, :, :8, :8], 32, None, None) == "torch"  # too small
    huge = torch.randn(8, 256, 56, 56).contiguous(memory_format=torch.channels_last)
    assert auto_backend(huge.requires_grad_(), 32, None, None) == "cpu"
    nchw = torch.randn(8, 64, 64, 64)  # 2M elements, above the NCHW fused thresholds
    assert auto_backend(nchw.requires_grad_(), 32, "silu", None) == "cpu"
    with torch.no_grad():
        assert auto_backend(nchw, 32, "silu", None) == "cpu"
        assert auto_backend(torch.randn(2, 64, 16, 15), 32, "silu", None) == "torch"  # 30K
    assert auto_backend(nchw, 32, None, None) == "torch"  # plain NCHW: never measured >= 1.1x
    cl_small = torch.randn(2, 16, 16, 16).contiguous(memory_format=torch.channels_last)  # 8K
    assert auto_backend(cl_small, 4, None, None) == "torch"


def test_fallback_to_torch_when_extension_missing(monkeypatch):
    import groupnorm
    import groupnorm.kernels.cpu_ext as cpu_ext

    monkeypatch.setattr(cpu_ext, "load_cpu_ext", lambda: False)
    x = torch.randn(2, 8, 5, 5)
    # group_norm owns the fallback: backend="cpu" without a compiler runs the torch path
    y = groupnorm.group_norm(x, 4, activation="gelu", backend="cpu")
    torch.testing.assert_close(y, torch.nn.functional.gelu(torch.nn.functional.group_norm(x, 4)))
    with pytest.raises(BackendUnavailable, match="could not be built"):
        group_norm_fast("cpu", x, 4, None, None, 1e-5, "gelu", None)
    assert auto_backend(torch.randn(8, 64, 64, 64), 32, "silu", None) == "torch"


def test_bench_smoke(tmp_path, capsys):
    import csv

    from groupnorm import bench

    out = tmp_path / "bench.csv"
    # --fresh-pages: leave this (pytest) process's allocator settings alone
    assert bench.main(["--shapes", "2x32x8x8", "--reps", "3", "--variants", "gn,gn+silu",
                       "--passes", "fwd,fwd+bwd", "--csv", str(out), "--fresh-pages",
                       "--plot", str(tmp_path / "bench.png")]) == 0
    rows = list(csv.DictReader(out.open()))
    # 2 variants x 2 passes x (copy, torch, cpu) for NCHW and (..., torch-robust) for NHWC
    assert len(rows) == 2 * 2 * 3 + 2 * 2 * 4
    assert set(rows[0]) == set(bench.FIELDS)
    assert {r["backend"] for r in rows} == {"copy", "torch", "cpu", "torch-robust"}
    assert {r["allocator"] for r in rows} == {"fresh-pages"}
    for r in rows:  # the robust baseline exists exactly where aten's kernel is not robust
        assert (r["vs_robust"] != "") == (r["layout"] == "nhwc"), r
        assert float(r["p50_ms"]) > 0 and float(r["speedup"]) > 0
    assert "speedup = torch p50 ÷ ours" in capsys.readouterr().out
    # the figure, drawn in the run and again from the CSV alone (--plot-only measures nothing)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.main(["--plot-only", str(out), "--plot", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 10_000
    assert bench.main(["--plot-only", str(tmp_path / "missing.csv"), "--plot", "x.png"]) == 2
    assert bench.main(["--plot-only", str(out)]) == 2


def test_bench_allocator_setting_takes():
    code = "from groupnorm.bench import reuse_freed_memory; print(reuse_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ("True" if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
                   else "False")


def _sysfs_l3_bytes() -> int | None:
    """cpu0's unified level-3 cache in bytes from Linux sysfs (None where there is no such file)."""
    from pathlib import Path

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if level == "3" and kind == "Unified":
            return int(size.rstrip("KMG")) * units.get(size[-1], 1)
    return None


def test_cache_thresholds_follow_the_l3_this_cpu_shares(monkeypatch):
    """The streaming-store threshold and the NHWC slab budget come from the L3 that sysfs gives
    (a quarter, at least 4 MiB; a half), not from sysconf, which under a hypervisor can report the
    whole socket (256 MiB on the AVX2 machine against 32 MiB of one CCX: nothing was streamed)."""
    monkeypatch.delenv("GROUPNORM_CPU_STREAM_MIN_BYTES", raising=False)
    monkeypatch.delenv("GROUPNORM_CPU_SLAB_CACHE_BYTES", raising=False)
    l3, stream_min, slab = torch.ops.groupnorm_cpu.cache_config()
    expected = _sysfs_l3_bytes()
    if expected is None:
        pytest.skip("no level-3 cache in /sys/devices/system/cpu/cpu0/cache")
    assert l3 == expected
    assert stream_min == max(4 << 20, expected // 4)
    assert slab == expected // 2
    monkeypatch.setenv("GROUPNORM_CPU_STREAM_MIN_BYTES", "123")
    monkeypatch.setenv("GROUPNORM_CPU_SLAB_CACHE_BYTES", "456")
    assert torch.ops.groupnorm_cpu.cache_config() == [expected, 123, 456]
