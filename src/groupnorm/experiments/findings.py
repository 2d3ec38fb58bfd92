"""Comparisons in plain words: differences between cells, paired by seed, beside the paper's,
and a verdict on each.

A finding reads ``GN − BN error at n=2: -1.3 ± 0.4 points over 3 seed(s) (paper: -10.6)``: the
mean and sample std of the per-seed differences (runs with the same seed were trained on the
same data order), or of the cells' means when no seed is shared. One seed gives no spread, so
none is shown.

The verdict compares the difference with the paper's, by one rule written down here and in the
report (``VERDICT_RULE``), never tuned per study. A paper difference of 1 point or more is a
*direction* (BN is worse at n = 2): the claim holds when ours lies on the paper's side of 0 by
more than two standard errors of the mean (std/√seeds), and is reversed when it lies on the other
side by as much. A smaller paper difference says *about equal*, in one of two senses the kind
gives: one norm across settings ("GN's error stays flat": ours within ±1.5 points) or one norm
against another ("GN is as good as BN at n = 32": ours not worse by more than 1.5 points; being
better is no violation). 1.5 points is the band the CIFAR-10 calibration of issue 12 asks of GN
against BN. Anything in between is "within noise". With one seed there is no standard error: the
verdict only says on which side the single number fell. With two or three seeds the
two-standard-error margin is a screen, not a significance test (a t-test would need ~4.3
standard errors at three seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cells import Cell, mean_std

DIRECTION_MIN = 1.0  # a paper difference of at least this many points is read as a direction
SAME_WITHIN = 1.5  # "about equal" means within this many points

VERDICT_RULE = (
    "Verdict rule: where the paper's difference is 1 point or more, the claim *holds* when ours "
    "has the paper's sign by more than two standard errors (std/√seeds), is *reversed* when it "
    "has the other sign by as much, and is *within noise* otherwise. Where the paper's "
    "difference is under 1 point, the paper says \"about equal\": for one norm across settings "
    "(GN's error at n=2 − at n=32) the claim *holds* when ours is within ±1.5 points by two "
    "standard errors; for one norm against another (GN − BN at n=32) when ours is not worse "
    "than +1.5 points by two standard errors; it *does not hold* when ours is outside by as "
    "much. With one seed there is no spread: the verdict says only on which side the number "
    "fell. With 2-3 seeds this is a screen, not a significance test.")

# what a finding's paper difference asks of ours (Finding.expect)
SAME, NOT_WORSE = "same", "not worse"


@dataclass(frozen=True)
class Finding:
    """One comparison of a study in words: ours (paired by seed) beside the paper's."""

    label: str  # what is compared: "BN error at n=2 − at n=32"
    ours: tuple[float, float, int] | None  # (mean, sample std, seeds) of ours; None: not measured
    paper: float | None  # the paper's difference in points; None: no published counterpart
    note: str = ""  # a finding without a difference ("best G: 4 (14.93%)") says only this
    # for a paper difference under 1 point: SAME (one norm across settings, two-sided) or
    # NOT_WORSE (one norm against another, one-sided); a larger one is always a direction
    expect: str = SAME

    def __str__(self) -> str:
        if self.note:
            return self.note
        return f"{self.label}: {fmt_diff(self.ours, self.paper)}"

    @property
    def verdict(self) -> str:
        """The rule's verdict on this comparison ("" when there is nothing to judge)."""
        return "" if self.note else verdict(self.ours, self.paper, self.expect)


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


def fmt_short(d: tuple[float, float, int] | None) -> str:
    """`+1.2 ± 0.3 (3 seeds)`, `+1.2 (1 seed)` or `—`: a difference in a table cell."""
    if d is None:
        return "—"
    if d[2] == 1:
        return f"{d[0]:+.1f} (1 seed)"
    return f"{d[0]:+.1f} ± {d[1]:.1f} ({d[2]} seeds)"


def verdict(d: tuple[float, float, int] | None, paper: float | None,
            expect: str = SAME) -> str:
    """The verdict of ``VERDICT_RULE`` on our difference `d` against the paper's; `expect`
    (SAME or NOT_WORSE) says how a paper difference under 1 point is read."""
    if d is None:
        return "not measured"
    if paper is None:
        return "no published number"
    m, s, k = d
    margin = 2.0 * s / math.sqrt(k) if k >= 2 else 0.0
    one = " (1 seed)" if k < 2 else ""
    if abs(paper) >= DIRECTION_MIN:
        along = m * math.copysign(1.0, paper)  # > 0: the paper's side of 0
        if k < 2:
            return f"paper's sign{one}" if along > 0 else f"other sign{one}"
        if along > margin:
            return "holds"
        if along < -margin:
            return "reversed"
        return "within noise"
    if expect == NOT_WORSE:
        if m + margin <= SAME_WITHIN:
            return f"holds (not worse by over {SAME_WITHIN:g}){one}"
        if m - margin > SAME_WITHIN:
            return f"does not hold (worse by over {SAME_WITHIN:g}){one}"
        return "within noise"
    if expect != SAME:
        raise ValueError(f"expect={expect!r}: must be {SAME!r} or {NOT_WORSE!r}")
    if abs(m) + margin <= SAME_WITHIN:
        return f"holds (within ±{SAME_WITHIN:g}){one}"
    if abs(m) - margin > SAME_WITHIN:
        return f"does not hold (beyond ±{SAME_WITHIN:g}){one}"
    return "within noise"


def gap(a: float | None, b: float | None) -> float | None:
    """a - b of two published numbers, or None if either is missing."""
    return None if a is None or b is None else a - b
