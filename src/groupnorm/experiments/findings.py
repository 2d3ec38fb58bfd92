"""Comparisons in plain words: differences between cells, paired by seed, beside the paper's.

A finding reads ``GN − BN error at n=2: -1.3 ± 0.4 points over 3 seed(s) (paper: -10.6)``: the
mean and sample std of the per-seed differences (runs with the same seed were trained on the
same data order), or of the cells' means when no seed is shared. One seed gives no spread, so
none is shown.
"""

from __future__ import annotations

import math

from .cells import Cell, mean_std


def diff(a: Cell | None, b: Cell | None) -> tuple[float, float, int] | None:
    """a - b, paired by seed where both have the seed: (mean, std, count)."""
    if a is None or b is None:
        return None
    sa, sb = a.by_seed(), b.by_seed()
    common = sorted(set(sa) & set(sb))
    if common:
        d = [sa[s] - sb[s] for s in common]
        m, s = mean_std(d)
        return m, s, len(d)
    ma, sa_ = mean_std(a.errors())
    mb, sb_ = mean_std(b.errors())
    return ma - mb, math.hypot(sa_, sb_), min(len(a.runs), len(b.runs))


def fmt_diff(d: tuple[float, float, int] | None, paper: float | None) -> str:
    """`+1.2 ± 0.3 points over 3 seed(s) (paper: +7.4)`, `+1.2 points over 1 seed`, or
    `not measured`."""
    if d is None:
        return "not measured"
    paper_txt = f" (paper: {paper:+.1f})" if paper is not None else ""
    if d[2] == 1:
        return f"{d[0]:+.1f} points over 1 seed{paper_txt}"
    return f"{d[0]:+.1f} ± {d[1]:.1f} points over {d[2]} seed(s){paper_txt}"


def gap(a: float | None, b: float | None) -> float | None:
    """a - b of two published numbers, or None if either is missing."""
    return None if a is None or b is None else a - b
