"""The published numbers the report sets beside ours, read once from groupnorm/reference/*.csv.

``gn_paper_imagenet.csv``: the GN paper's ImageNet ResNet-50 val errors, keyed (study, setting,
norm); ``published_other.csv``: other papers' points (Weight Standardization, Kinetics), keyed
(study, setting, norm, metric). Both files carry their citation in comment lines.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Published:
    """Both tables of published numbers."""

    gn: dict[tuple[str, str, str], float]  # (study, setting, norm) -> val error %
    other: dict[tuple[str, str, str, str], float]  # (study, setting, norm, metric) -> value

    def gn_error(self, study: str, setting: str, norm: str) -> float | None:
        """The GN paper's error (%) for one setting, or None."""
        return self.gn.get((study, setting, norm))


def _read(name: str) -> list[dict[str, str]]:
    text = resources.files("groupnorm").joinpath("reference", name).read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    return list(csv.DictReader(lines))


@functools.cache
def published() -> Published:
    """The published numbers (read from the package data on first use, then kept)."""
    gn = {(r["study"], r["setting"], r["norm"]): float(r["val_error"])
          for r in _read("gn_paper_imagenet.csv")}
    other = {(r["study"], r["setting"], r["norm"], r["metric"]): float(r["value"])
             for r in _read("published_other.csv")}
    return Published(gn, other)


def paper_table() -> dict[tuple[str, str, str], float]:
    """The GN paper's ImageNet numbers: (study, setting, norm) -> val error %."""
    return dict(published().gn)
