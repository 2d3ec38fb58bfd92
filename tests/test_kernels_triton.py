"""The Triton backend vs the float64 oracle, on CUDA when present, else under TRITON_INTERPRET=1.

The interpreter must be switched on before the kernels are decorated, so on a machine without
CUDA this module's one visible test re-runs the module in a subprocess with TRITON_INTERPRET=1;
the table of cases only exists in that subprocess (or on CUDA). Shapes are tiny because the
interpreter runs every program in Python. The launch heuristics pick one tile and one slice per
group for most of the table, so the split reduction, multi-tile loops and slices that start past
the end of S are forced through ``triton_kernels.LAUNCH_OVERRIDES`` in their own cases.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_CUDA = torch.cuda.is_available() and not INTERPRET
RUN_CASES = HAS_TRITON and (INTERPRET or ON_CUDA)
DEVICE = "cuda" if ON_CUDA else "cpu"

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.mark.skipif(RUN_CASES, reason="cases run in this process")
def test_triton_kernels_in_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_unavailable_without_cuda_or_interpreter():
    from groupnorm.kernels import BackendUnavailable, group_norm_fast

    if INTERPRET or torch.cuda.is_available():
        pytest.skip("only meaningful on a plain CPU process")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        group_norm_fast("triton", torch.randn(2, 4, 3, 3), 2, None, None, 1e-5, None, None)


if RUN_CASES:
    import inspect

    from groupnorm.kernels import triton_kernels
    from groupnorm.kernels.testing import backward_is_deterministic, make_input, parity_errors
    from groupnorm.kernels.triton_kernels import _launch_config

    # Worst error / max(1, |ref|) per dtype: fp32 statistics and sums, output rounding for
    # fp16 (2^-11) and bf16 (2^-8) on values up to ~5; dy is rounded to the dtype too.
    TOL = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
    DTYPES = list(TOL)

    # (label, shape, num_groups, layout)
    CASES = [
        ("nchw 2d", (2, 8, 5, 6), 4, "nchw"),
        ("nhwc 2d", (2, 8, 5, 6), 4, "nhwc"),
        ("ncdhw 3d", (2, 6, 3, 4, 5), 3, "nchw"),
        ("ndhwc 3d", (2, 6, 3, 4, 5), 3, "nhwc"),
        ("C/G=3 (not pow2), nhwc", (2, 9, 7, 7), 3, "nhwc"),
        ("spatial 37 (not a block multiple)", (3, 4, 37), 2, "nchw"),
        ("G=1 (LN)", (2, 6, 4, 4), 1, "nhwc"),
        ("G=C (IN)", (2, 6, 4, 4), 6, "nchw"),
        ("no spatial", (5, 12), 4, "nchw"),
    ]

    def _check(errs, dtype):
        bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
        assert not bad, f"errors above {TOL[dtype]} for {dtype}: {bad} (all: {errs})"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("label,shape,groups,layout", CASES, ids=[c[0] for c in CASES])
    def test_forward_backward(label, shape, groups, layout, dtype):
        _check(parity_errors("triton", shape, groups, dtype, layout, device=DEVICE), dtype)

    @pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"])
    @pytest.mark.parametrize("residual", [False, True])
    @pytest.mark.parametrize("layout", ["nchw", "nhwc"])
    def test_fused(activation, residual, layout):
        dtype = torch.bfloat16 if (activation == "silu" and residual) else torch.float32
        errs = parity_errors("triton", (2, 6, 5, 5), 3, dtype, layout, activation, residual,
                             device=DEVICE)
        _check(errs, dtype)

    # Fused variants in the other dtypes and in 3D, and without γ/β: (label, shape, G, dtype,
    # layout, activation, residual, affine).
    FUSED_MORE = [
        ("fp16 gelu+res nhwc", (2, 6, 4, 5), 3, torch.float16, "nhwc", "gelu", True, True),
        ("bf16 relu nchw", (2, 6, 4, 5), 2, torch.bfloat16, "nchw", "relu", False, True),
        ("fp16 silu 3d ndhwc", (2, 4, 3, 4, 3), 2, torch.float16, "nhwc", "silu", False, True),
        ("bf16 gelu+res 3d ncdhw", (2, 4, 3, 3, 4), 4, torch.bfloat16, "nchw", "gelu", True,
         True),
        ("fp32 relu+res 3d ndhwc", (1, 6, 2, 3, 3), 3, torch.float32, "nhwc", "relu", True,
         True),
        ("no affine, silu+res", (2, 6, 4, 4), 3, torch.float32, "nhwc", "silu", True, False),
        ("no affine, fp16", (2, 8, 3, 3), 4, torch.float16, "nchw", None, False, False),
        ("N=1, 1x1 spatial", (1, 8, 1, 1), 4, torch.float32, "nchw", "gelu", True, True),
    ]

    @pytest.mark.parametrize("label,shape,groups,dtype,layout,act,res,affine", FUSED_MORE,
                             ids=[c[0] for c in FUSED_MORE])
    def test_fused_dtypes_3d_and_no_affine(label, shape, groups, dtype, layout, act, res, affine):
        _check(parity_errors("triton", shape, groups, dtype, layout, act, res, affine,
                             device=DEVICE), dtype)

    # Forced launch configurations: several tiles per slice, several slices per group, and
    # slices that start past the end of S (S_PER_SPLIT rounds up to whole tiles), so that the
    # Chan merge of partials, the per-slice dγ/dβ partials and empty slices are all checked.
    FORCED = [
        ("split 4, tiles of 2 rows, nchw", (1, 4, 5, 6), 2, torch.float32, "nchw", None, False,
         dict(SPLIT=4, BLOCK_S=2)),
        ("split 8 > tiles: empty slices, nhwc", (2, 4, 3, 3), 2, torch.float32, "nhwc", "silu",
         True, dict(SPLIT=8, BLOCK_S=1)),
        ("split 2, many tiles, fp16 3d", (1, 6, 3, 4, 5), 3, torch.float16, "nhwc", "gelu", True,
         dict(SPLIT=2, BLOCK_S=4)),
        ("split 4, bf16 C/G=3", (2, 9, 7, 5), 3, torch.bfloat16, "nchw", "relu", False,
         dict(SPLIT=4, BLOCK_S=8)),
    ]

    @pytest.mark.parametrize("label,shape,groups,dtype,layout,act,res,force", FORCED,
                             ids=[c[0] for c in FORCED])
    def test_forced_split_and_tiles(label, shape, groups, dtype, layout, act, res, force):
        triton_kernels.LAUNCH_OVERRIDES.update(force)
        try:
            x = make_input(shape, layout, dtype, DEVICE)
            n, g = shape[0], groups
            s = x.numel() // (shape[0] * shape[1])
            cfg = _launch_config(x, n, g, s, shape[1] // g)
            assert cfg["SPLIT"] == force["SPLIT"] and cfg["BLOCK_S"] == force["BLOCK_S"], cfg
            _check(parity_errors("triton", shape, groups, dtype, layout, act, res,
                                 device=DEVICE), dtype)
        finally:
            triton_kernels.LAUNCH_OVERRIDES.clear()

    def test_split_reduction_path():
        shape, groups = (1, 4, 40, 40), 2  # N·G = 2 programs: the launcher splits S
        x = make_input(shape, "nhwc", torch.float32, DEVICE)
        cfg = _launch_config(x, 1, groups, 1600, 2)
        assert cfg["SPLIT"] > 1, cfg
        for layout in ("nchw", "nhwc"):
            _check(parity_errors("triton", shape, groups, torch.float32, layout, "silu", True,
                                 device=DEVICE), torch.float32)

    def test_large_offset_is_robust():
        errs = parity_errors("triton", (2, 8, 9, 9), 2, torch.float32, "nhwc", offset=1000.0,
                             device=DEVICE)
        assert max(errs.values()) < 4e-4, errs  # fp32 mean of values near 1000: ulp 6e-5

    def test_dw_db_deterministic():
        assert backward_is_deterministic("triton", (1, 8, 24, 24), "nchw", 2, "gelu", DEVICE)
        # The interpreter runs programs one after another, so even float atomics would give
        # equal results here; what makes dγ/dβ deterministic on a GPU is that no kernel uses
        # atomics (partials are summed in a fixed order by _gn_bwd_dwdb_kernel).
        assert "tl.atomic" not in inspect.getsource(triton_kernels)

    def test_strided_weight_and_bias():
        # γ, β as views with stride 2 (or 0): the kernels index them densely, so they are copied
        x = make_input((2, 8, 3, 3), "nhwc", torch.float32, DEVICE)
        wide = torch.randn(16, device=DEVICE)
        for w, b in ((wide[::2], wide[1::2]), (wide[:1].expand(8), wide[1:2].expand(8))):
            y = triton_kernels_group_norm(x, w, b)
            ref = torch.nn.functional.group_norm(x.double(), 4, w.double(), b.double())
            torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)

    def triton_kernels_group_norm(x, w, b):
        from groupnorm.kernels import group_norm_fast

        return group_norm_fast("triton", x, 4, w, b, 1e-5, None, None)

    def test_custom_op_under_torch_compile():
        from groupnorm import group_norm

        def f(x, w, b, r):
            return group_norm(x, 2, w, b, activation="silu", residual=r, backend="triton")

        x = make_input((2, 4, 5, 5), "nhwc", torch.float32, DEVICE).requires_grad_()
        w = torch.rand(4, device=DEVICE, requires_grad=True)
        b = torch.rand(4, device=DEVICE, requires_grad=True)
        r = torch.randn_like(x)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        y_c, y_e = compiled(x, w, b, r), f(x, w, b, r)
        torch.testing.assert_close(y_c, y_e)
        assert y_c.stride() == x.stride()
        g_c = torch.autograd.grad(y_c.square().sum(), [x, w, b])
        g_e = torch.autograd.grad(y_e.square().sum(), [x, w, b])
        for a_, b_ in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a_, b_)
