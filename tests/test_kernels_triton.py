"""The Triton backend vs the float64 oracle, on CUDA when present, else under TRITON_INTERPRET=1.

The interpreter must be switched on before the kernels are decorated, so on a machine without
CUDA this module's one visible test re-runs the module in a subprocess with TRITON_INTERPRET=1;
the table of cases only exists in that subprocess (or on CUDA). Shapes are tiny because the
interpreter runs every program in Python; the launch heuristics use tiles of <= 256 elements
and aim at 8 programs there, so the split reduction (several programs per group) is exercised.
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
