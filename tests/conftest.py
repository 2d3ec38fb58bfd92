"""Shared test helpers: the labelled shape table and per-dtype tolerances."""

from __future__ import annotations

import pytest
import torch

# (label, shape, num_groups): the labelled table every backend is checked on.
SHAPES = [
    ("2d-basic", (2, 8, 5, 5), 4),
    ("1d", (3, 6, 7), 3),
    ("3d-video", (2, 4, 3, 4, 5), 2),
    ("no-spatial", (4, 12), 3),
    ("G=1 (LN)", (2, 6, 4, 4), 1),
    ("G=C (IN)", (2, 6, 4, 4), 6),
    ("C/G odd", (2, 15, 3, 3), 5),
    ("tiny spatial 1x1", (5, 8, 1, 1), 2),
    ("N=1", (1, 16, 6, 6), 4),
    ("N=1 1x1 (one value per channel)", (1, 8, 1, 1), 2),
    ("N=1 no spatial", (1, 12), 3),
]

# (dtype, atol, rtol) vs the float64 reference on the same (rounded) input.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-5),
    # Output rounding alone is half an ulp: 2**-11 ~ 4.9e-4 relative for fp16, 2**-8 for bf16,
    # on values up to ~4 (normalized), plus the affine.
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.6e-2),
}


def ids(table):
    return [row[0] for row in table]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
