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
    nchw = torch.randn(8, 64, 64, 64)  # 2M elements: the NCHW fused threshold (training)
    assert auto_backend(nchw.requires_grad_(), 32, "silu", None) == "cpu"
    with torch.no_grad():
        assert auto_backend(nchw, 32, "silu", None) == "torch"  # fused inference: measured no win
    assert auto_backend(nchw, 32, None, None) == "torch"


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
