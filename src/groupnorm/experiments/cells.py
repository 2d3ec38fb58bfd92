"""A study's runs grouped into cells: the runs that differ only in their seed.

A cell shows mean ± sample std (ddof=1) of its runs' reported errors and n, the number of seeds.
The fields that vary across a study (except the seed and the runtime knobs) name its cells.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from .config import flatten, identity_of
from .recipe import norm_label

# the most telling fields first: norm, then batch size, then the rest alphabetically
_ORDER = {"norm": 0, "batch_size": 1, "norm_options.num_groups": 2, "norm_options.group_size": 3}
_COLUMNS = {"batch_size": "n", "norm_options.num_groups": "G",
            "norm_options.group_size": "channels/group"}


@dataclass
class Cell:
    """The runs of one study that differ only in their seed."""

    values: dict[str, Any]  # the varying fields' values
    runs: list[dict[str, Any]]  # done runs, by seed

    def errors(self, field: str = "median_val_error") -> list[float]:
        """The runs' values of a summary field (default: the reported error)."""
        return [r[field] for r in self.runs if r[field] is not None]

    def by_seed(self) -> dict[int, float]:
        """Reported error per seed (for differences paired by seed)."""
        return {r["config"]["seed"]: r["median_val_error"] for r in self.runs}


def sort_key(value: Any) -> Any:
    """Sort key that orders None, numbers and strings without comparing across types."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, bool | int | float):
        return (1, float(value), "")
    return (2, 0, json.dumps(value, sort_keys=True))


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_pm(xs: list[float]) -> str:
    """`12.34 ± 0.56` (or `12.34` for one value, `—` for none)."""
    if not xs:
        return "—"
    m, s = mean_std(xs)
    return f"{m:.2f} ± {s:.2f}" if len(xs) > 1 else f"{m:.2f}"


def col_name(key: str) -> str:
    """Column title of a varying field (batch_size -> n, norm_options.num_groups -> G)."""
    return _COLUMNS.get(key, key.split(".")[-1])


def dataset_words(name: Any) -> str:
    """A dataset's name for readers: "cifar10-jpeg" -> "CIFAR-10 (JPEG q75)"."""
    from groupnorm.data import dataset_title

    return dataset_title(str(name))


def fmt_value(key: str, value: Any) -> str:
    """A varying field's value as a table shows it (norm bn -> BN, a dataset by its title)."""
    if key == "norm":
        return norm_label(value)
    if key == "dataset" and value is not None:
        return dataset_words(value)
    if value is None:
        return "—"
    return str(value)


def study_cells(runs: list[dict[str, Any]]) -> tuple[list[str], list[Cell]]:
    """(varying fields, cells) of a study's done runs, cells sorted by their field values."""
    flats = [flatten(identity_of(r["config"])) for r in runs]
    keys = sorted({k for f in flats for k in f} - {"seed"})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    varying.sort(key=lambda k: (_ORDER.get(k, 9), k))
    groups: dict[str, Cell] = {}
    for run, flat in zip(runs, flats, strict=True):
        values = {k: flat.get(k) for k in varying}
        groups.setdefault(json.dumps(values, sort_keys=True), Cell(values, [])).runs.append(run)
    cells = sorted(groups.values(), key=lambda c: [sort_key(c.values[k]) for k in varying])
    for c in cells:
        c.runs.sort(key=lambda r: r["config"]["seed"])
    return varying, cells


def by_dataset(varying: list[str], cells: list[Cell]
               ) -> list[tuple[Any, list[str], list[Cell]]]:
    """A study's cells per dataset, for comparisons that must not mix datasets: one (dataset,
    the other varying fields, cells without the dataset in their values) per dataset, in the
    cells' order; one (None, varying, cells) when the dataset does not vary."""
    if "dataset" not in varying:
        return [(None, varying, cells)]
    rest = [k for k in varying if k != "dataset"]
    out: dict[str, tuple[Any, list[str], list[Cell]]] = {}
    for c in cells:
        name = c.values["dataset"]
        entry = out.setdefault(json.dumps(name), (name, rest, []))
        entry[2].append(Cell({k: v for k, v in c.values.items() if k != "dataset"}, c.runs))
    return list(out.values())


def find(cells: list[Cell], **want: Any) -> Cell | None:
    """The first cell whose values match `want` (fields it does not vary are ignored)."""
    for c in cells:
        if all(c.values.get(k) == v for k, v in want.items() if k in c.values):
            return c
    return None
