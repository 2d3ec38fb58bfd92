"""The C++ CPU backend ("cpu") vs the float64 oracle: values and gradients, layouts, dtypes,
fused variants, determinism, robustness, and the torch fallback."""

from __future__ import annotations

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
    from groupnorm.reference import group_norm_reference

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
    nchw = torch.randn(8, 64, 64, 64)  # 2M elements: the NCHW fused threshold
    assert auto_backend(nchw, 32, "silu", None) == "cpu"
    assert auto_backend(nchw, 32, None, None) == "torch"


def test_fallback_to_torch_when_extension_missing(monkeypatch):
    import groupnorm.kernels.cpu_ext as cpu_ext

    monkeypatch.setattr(cpu_ext, "load_cpu_ext", lambda: False)
    x = torch.randn(2, 8, 5, 5)
    y = group_norm_fast("cpu", x, 4, None, None, 1e-5, "gelu", None)
    torch.testing.assert_close(y, torch.nn.functional.gelu(torch.nn.functional.group_norm(x, 4)))
    assert auto_backend(torch.randn(8, 64, 64, 64), 32, "silu", None) == "torch"


def test_bench_smoke(tmp_path, capsys):
    import csv

    from groupnorm import bench

    out = tmp_path / "bench.csv"
    assert bench.main(["--shapes", "2x32x8x8", "--reps", "3", "--variants", "gn,gn+silu",
                       "--passes", "fwd,fwd+bwd", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    # 2 layouts x 2 variants x 2 passes x (copy, torch, cpu)
    assert len(rows) == 24
    assert set(rows[0]) == set(bench.FIELDS)
    assert {r["backend"] for r in rows} == {"copy", "torch", "cpu"}
    assert "ours/torch" in capsys.readouterr().out
