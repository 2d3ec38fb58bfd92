"""How each kind of study is shown: which published number stands beside a cell, which of the
paper's claims it tests, and what the findings compare. One class per kind of
``presets.STUDY_KINDS``; ``KINDS`` maps names to them.

Figures are chosen by what varies (plots.py): error vs n when the batch size varies, error vs G
when the group setting does, and the error curves always; a kind supplies their title in words,
and the published curve drawn at the paper's own settings (``paper_series``) with its axis.
"""

from __future__ import annotations

from typing import Any

from .cells import Cell, col_name, find, fmt_pm, mean_std, sort_key
from .findings import NOT_WORSE, Finding, diff, gap
from .paper import published
from .recipe import norm_label


def _norms(cells: list[Cell]) -> list[Any]:
    return sorted({c.values.get("norm") for c in cells if "norm" in c.values}, key=sort_key)


_SIZES = (2, 4, 8, 16, 32)  # the paper's Table 2 / Figure 1: images per GPU


class StudyKind:
    """A study with no published counterpart (kind "grid"): a table of cells, no findings."""

    title = "Grid of runs"  # what the study is, in words (the figures' titles start with it)
    claim = ""  # the paper's claim it tests, "C1 ..." ("" for none)
    published_title = "published"  # title of the figures' published panel
    published_axis = "published val error (%)"  # y label of that panel
    unit = "images"  # what a batch holds (x labels: "images per worker n")

    def paper(self, values: dict[str, Any]) -> float | None:
        """The published error (%) for a cell with these field values, or None."""
        return None

    def paper_series(self, key: str, norms: list[Any]) -> dict[str, list[tuple[float, float]]]:
        """The published curve(s) against field `key`, at the paper's own values of it: one
        (x, error) list per label (a norm, or "GN" for the group ablation); {} when none."""
        return {}

    def findings(self, varying: list[str], cells: list[Cell]) -> list[Finding]:
        """Comparisons of the study's cells, beside the paper's where it has them."""
        return []


class BatchSize(StudyKind):
    """Error vs images per worker n (paper Figure 1 / Table 2): the gap between the smallest and
    largest n per norm, and GN − BN at both ends."""

    title = "Batch-size study"
    claim = "C1 BN's error rises as n shrinks; GN's stays flat"
    published_title = "Paper, Table 2: ResNet-50 on ImageNet"
    published_axis = "paper's ImageNet val error (%)"

    def paper(self, values: dict[str, Any]) -> float | None:
        n = values.get("batch_size")
        return published().gn_error("table2_batch", f"n={n}", norm_label(values.get("norm", "")))

    def paper_series(self, key: str, norms: list[Any]) -> dict[str, list[tuple[float, float]]]:
        if key != "batch_size":
            return {}
        out = {}
        for norm in norms:
            pts = [(float(n), self.paper({"norm": norm, "batch_size": n})) for n in _SIZES]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                out[norm_label(norm)] = pts
        return out

    def batch_gap(self, norm: Any, lo: int, hi: int) -> float | None:
        """Published error at n=lo minus at n=hi for one norm."""
        return gap(self.paper({"norm": norm, "batch_size": lo}),
                   self.paper({"norm": norm, "batch_size": hi}))

    def gn_minus_bn(self, n: int) -> float | None:
        """Published GN − BN error at n."""
        return gap(self.paper({"norm": "gn", "batch_size": n}),
                   self.paper({"norm": "bn", "batch_size": n}))

    def findings(self, varying: list[str], cells: list[Cell]) -> list[Finding]:
        if "batch_size" not in varying:
            return []
        out = []
        sizes = sorted({c.values["batch_size"] for c in cells})
        lo, hi = sizes[0], sizes[-1]
        norms = _norms(cells)
        # one norm for the whole study (set, not varied, e.g. the BN-only quick preset): the
        # paper's curve of that norm is still the comparison
        shared = {r["config"].get("norm") for c in cells for r in c.runs}
        fixed = shared.pop() if not norms and len(shared) == 1 else None
        for norm in norms or [None]:
            sel = {"norm": norm} if norm is not None else {}
            a, b = find(cells, batch_size=lo, **sel), find(cells, batch_size=hi, **sel)
            named = norm if norm is not None else fixed
            who = f"{norm_label(named)} " if named is not None else ""
            out.append(Finding(f"{who}error at n={lo} − at n={hi}", diff(a, b),
                               self.batch_gap(named, lo, hi)))
        if "bn" in norms and "gn" in norms:
            for n in (lo, hi):
                d = diff(find(cells, batch_size=n, norm="gn"), find(cells, batch_size=n, norm="bn"))
                out.append(Finding(f"GN − BN error at n={n}", d, self.gn_minus_bn(n),
                                   expect=NOT_WORSE))
        return out


class Video(BatchSize):
    """The batch-size study on clips; the published numbers are Kinetics top-1 (error = 100 −
    accuracy) of I3D with 32 frames (the GN paper, Section 6.2)."""

    title = "Video batch-size study"
    claim = "C7 video at small n: GN is at least as good as BN"
    published_title = "Paper, Table 6: I3D ResNet-50 on Kinetics (32 frames)"
    published_axis = "paper's Kinetics top-1 error (%)"
    unit = "clips"

    def paper(self, values: dict[str, Any]) -> float | None:
        acc = published().other.get(("kinetics_i3d", f"32 frames n={values.get('batch_size')}",
                                     norm_label(values.get("norm", "")), "top1_acc"))
        return None if acc is None else round(100.0 - acc, 2)

    def paper_series(self, key: str, norms: list[Any]) -> dict[str, list[tuple[float, float]]]:
        if key != "batch_size":
            return {}
        out = {}
        for norm in norms:
            pts = [(float(n), self.paper({"norm": norm, "batch_size": n})) for n in (4, 8)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                out[norm_label(norm)] = pts
        return out

    def batch_gap(self, norm: Any, lo: int, hi: int) -> float | None:
        return None

    def gn_minus_bn(self, n: int) -> float | None:
        other = published().other
        g = other.get(("kinetics_i3d", f"32 frames n={n}", "GN", "top1_acc"))
        b = other.get(("kinetics_i3d", f"32 frames n={n}", "BN", "top1_acc"))
        return None if g is None or b is None else b - g  # error = 100 - acc


class NormCompare(StudyKind):
    """Every norm against BN (or the first norm) in each setting of the other varying fields."""

    def norm_gap(self, norm: Any, base: Any, cell: Cell) -> float | None:
        """Published error of `norm` minus that of `base` (for this cell's setting), or None."""
        return None

    def findings(self, varying: list[str], cells: list[Cell]) -> list[Finding]:
        if "norm" not in varying:
            return []
        out = []
        norms = _norms(cells)
        base = "bn" if "bn" in norms else norms[0]
        for norm in norms:
            if norm == base:
                continue
            for c in cells:
                if c.values.get("norm") != norm:
                    continue
                rest = {k: v for k, v in c.values.items() if k != "norm"}
                b = find(cells, norm=base, **rest)
                where = " ".join(f"{col_name(k)}={v}" for k, v in rest.items())
                out.append(Finding(f"{norm_label(norm)} − {norm_label(base)} error"
                                   f"{' at ' + where if where else ''}", diff(c, b),
                                   self.norm_gap(norm, base, c), expect=NOT_WORSE))
        return out


class Norms(NormCompare):
    """BN, LN, IN, GN and no norm at n = 32 (paper Table 1)."""

    title = "Normalization methods"
    claim = "C2 at n = 32: BN ≤ GN < LN < IN"

    def paper(self, values: dict[str, Any]) -> float | None:
        return published().gn_error("table1_norms", "n=32", norm_label(values.get("norm", "")))

    def norm_gap(self, norm: Any, base: Any, cell: Cell) -> float | None:
        return gap(self.paper({"norm": norm}), published().gn_error("table1_norms", "n=32", "BN"))


class BatchRenorm(NormCompare):
    """Batch Renormalization vs BN vs GN at n = 4 (paper Section 5.1)."""

    title = "Batch Renormalization vs BN and GN"
    claim = "C4 at n = 4: BR lies between BN and GN"

    @staticmethod
    def _label(norm: Any) -> str:
        return "BR (r_max=1.5 d_max=0.5)" if norm_label(norm) == "BR" else norm_label(norm)

    def paper(self, values: dict[str, Any]) -> float | None:
        return published().gn_error("batch_renorm", "n=4", self._label(values.get("norm", "")))

    def norm_gap(self, norm: Any, base: Any, cell: Cell) -> float | None:
        return gap(self.paper({"norm": norm}), published().gn_error("batch_renorm", "n=4", "BN"))


class WeightStandardization(NormCompare):
    """GN+WS vs BN and GN at small and large n (Qiao et al. 2019; BN and GN from Table 2)."""

    title = "GN + Weight Standardization vs BN and GN"
    claim = "C5 GN+WS closes GN's gap to BN"
    published_title = "Published: ResNet-50 on ImageNet"
    published_axis = "published ImageNet val error (%)"

    def paper(self, values: dict[str, Any]) -> float | None:
        norm = norm_label(values.get("norm", ""))
        if norm == "GN+WS":  # batch-independent, so one number for every n
            return published().other.get(("weight_standardization", "micro-batch", "GN+WS",
                                          "val_error"))
        return published().gn_error("table2_batch", f"n={values.get('batch_size')}", norm)

    def paper_series(self, key: str, norms: list[Any]) -> dict[str, list[tuple[float, float]]]:
        if key != "batch_size":
            return {}
        out = {}
        for norm in norms:
            if norm_label(norm) == "GN+WS":
                # Qiao et al. trained with 1 image per GPU: their one point sits at n = 1
                y = self.paper({"norm": norm})
                if y is not None:
                    out["GN+WS (Qiao et al., 1 image/GPU)"] = [(1.0, y)]
                continue
            pts = [(float(n), self.paper({"norm": norm, "batch_size": n})) for n in _SIZES]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                out[f"{norm_label(norm)} (Wu & He, Table 2)"] = pts
        return out

    def norm_gap(self, norm: Any, base: Any, cell: Cell) -> float | None:
        return gap(self.paper(cell.values), self.paper({**cell.values, "norm": base}))


class Finetune(NormCompare):
    """Pretrain at n = 32, fine-tune at n = 2 (the paper's detection fine-tuning, Section 6.1)."""

    title = "Pretraining at a large batch, then fine-tuning at a small one"
    claim = "C6 fine-tuning at a small n: GN transfers, BN degrades"

    def norm_gap(self, norm: Any, base: Any, cell: Cell) -> float | None:
        # COCO: GN box AP 40.3 vs frozen BN* 38.6; as "error" (100 - AP) the gap is -1.7
        return -1.7 if norm == "gn" else None


class Groups(StudyKind):
    """Group count G or channels per group (paper Table 3): the best setting, and the extreme
    (G = 1 is LN, 1 channel per group is IN) against the largest."""

    title = "GN's group setting"
    claim = "C3 G = 1 (LN) and 1 channel per group (IN) are the worst group settings"
    published_title = "Paper, Table 3: ResNet-50 on ImageNet, n = 32"
    published_axis = "paper's ImageNet val error (%)"

    _KEYS = (("norm_options.num_groups", "G"), ("norm_options.group_size", "channels/group"))

    def paper(self, values: dict[str, Any]) -> float | None:
        g, cpg = values.get("norm_options.num_groups"), values.get("norm_options.group_size")
        if g is not None:
            return published().gn_error("table3_groups", "G=1 (LN)" if g == 1 else f"G={g}",
                                        "GN")
        if cpg is not None:
            return published().gn_error("table3_groups",
                                        "cpg=1 (IN)" if cpg == 1 else f"cpg={cpg}", "GN")
        return None

    def paper_series(self, key: str, norms: list[Any]) -> dict[str, list[tuple[float, float]]]:
        if key not in dict(self._KEYS):
            return {}
        pts = [(float(v), self.paper({key: v})) for v in (1, 2, 4, 8, 16, 32, 64)]
        pts = [(x, y) for x, y in pts if y is not None]
        return {"GN": pts} if pts else {}

    def findings(self, varying: list[str], cells: list[Cell]) -> list[Finding]:
        out = []
        for key, lbl in self._KEYS:
            sel = [c for c in cells if c.values.get(key) is not None]
            if not sel:
                continue
            best = min(sel, key=lambda c: mean_std(c.errors())[0])
            out.append(Finding(f"best {lbl}", None, None,
                               note=f"best {lbl}: {best.values[key]} ({fmt_pm(best.errors())}%)"))
            values = sorted(c.values[key] for c in sel)
            lo, hi = values[0], values[-1]
            if lo != hi:
                a, b = find(sel, **{key: lo}), find(sel, **{key: hi})
                ref = gap(self.paper({key: lo}), self.paper({key: hi}))
                out.append(Finding(f"{lbl}={lo} − {lbl}={hi} error", diff(a, b), ref))
        return out


#: Study kind name -> how it is shown (every name of presets.STUDY_KINDS).
KINDS: dict[str, StudyKind] = {
    "batch": BatchSize(), "video": Video(), "norms": Norms(), "batch_renorm": BatchRenorm(),
    "ws": WeightStandardization(), "finetune": Finetune(), "groups": Groups(),
    "grid": StudyKind(),
}


def kind_of(name: str) -> StudyKind:
    """How to show a study of kind `name` (an unknown kind from an old database: as a grid)."""
    return KINDS.get(name, KINDS["grid"])
