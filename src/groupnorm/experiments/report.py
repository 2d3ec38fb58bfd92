"""Reports built only from a results database: report.md, PNG figures and CSV exports.

Every number comes from the database (never from the clock or the environment), tables and
lines are sorted, floats have fixed formats: the same database gives the same report.md, byte
for byte. Per study, runs are grouped into cells by the fields that vary across the study except
the seed; a cell shows mean +- std (sample std, ddof=1) of the runs' reported errors and n, the
number of seeds. The paper's published numbers (package data in groupnorm/reference/) stand in a
column beside ours wherever the study maps onto one of its tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .store import Store

NORM_LABELS = {"bn": "BN", "gn": "GN", "ln": "LN", "in": "IN", "brn": "BR", "syncbn": "SyncBN",
               "none": "none", "gn+ws": "GN+WS", "bn+ws": "BN+WS"}
KEY_SETUP_FIELDS = ("model", "dataset", "train_size", "val_size", "epochs", "workers",
                    "optimizer", "lr", "schedule", "weight_decay", "augment", "pretrain_epochs")


def norm_label(norm: Any) -> str:
    """Display name of a norm kind (bn -> BN)."""
    return NORM_LABELS.get(str(norm), str(norm))


# ---------------------------------------------------------------------------------------------
# published numbers


def _read_reference(name: str) -> list[dict[str, str]]:
    text = resources.files("groupnorm").joinpath("reference", name).read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    return list(csv.DictReader(lines))


def paper_table() -> dict[tuple[str, str, str], float]:
    """The GN paper's ImageNet numbers: (study, setting, norm) -> val error %."""
    return {(r["study"], r["setting"], r["norm"]): float(r["val_error"])
            for r in _read_reference("gn_paper_imagenet.csv")}


def other_published() -> dict[tuple[str, str, str, str], float]:
    """Other published points: (study, setting, norm, metric) -> value."""
    return {(r["study"], r["setting"], r["norm"], r["metric"]): float(r["value"])
            for r in _read_reference("published_other.csv")}


def paper_value(kind: str, cell: dict[str, Any]) -> float | None:
    """The published error (%) for one cell of a study of `kind`, or None."""
    paper, other = paper_table(), other_published()
    norm = norm_label(cell.get("norm", ""))
    n = cell.get("batch_size")
    if kind == "batch":
        return paper.get(("table2_batch", f"n={n}", norm))
    if kind == "norms":
        return paper.get(("table1_norms", "n=32", norm))
    if kind == "groups":
        g, cpg = cell.get("norm_options.num_groups"), cell.get("norm_options.group_size")
        if g is not None:
            return paper.get(("table3_groups", "G=1 (LN)" if g == 1 else f"G={g}", "GN"))
        if cpg is not None:
            return paper.get(("table3_groups", "cpg=1 (IN)" if cpg == 1 else f"cpg={cpg}", "GN"))
        return None
    if kind == "batch_renorm":
        if norm == "BR":
            return paper.get(("batch_renorm", "n=4", "BR (r_max=1.5 d_max=0.5)"))
        return paper.get(("batch_renorm", "n=4", norm))
    if kind == "ws":
        if norm == "GN+WS":  # batch-independent, so one number for every n
            return other.get(("weight_standardization", "micro-batch", "GN+WS", "val_error"))
        return paper.get(("table2_batch", f"n={n}", norm))
    if kind == "video":
        acc = other.get(("kinetics_i3d", f"32 frames n={n}", norm, "top1_acc"))
        return None if acc is None else round(100.0 - acc, 2)
    return None


# ---------------------------------------------------------------------------------------------
# cells


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Config dict with dict fields flattened to dotted keys (norm_options.num_groups)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            for sk, sv in v.items():
                out[f"{k}.{sk}"] = sv
        else:
            out[k] = v
    return out


def _key(value: Any) -> Any:
    """Sort key that orders None, numbers and strings without comparing across types."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, bool | int | float):
        return (1, float(value), "")
    return (2, 0, json.dumps(value, sort_keys=True))


@dataclass
class Cell:
    """The runs of one study that differ only in their seed."""

    values: dict[str, Any]  # the varying fields' values
    runs: list[dict[str, Any]]  # done runs, by seed

    def errors(self, field: str = "median_val_error") -> list[float]:
        return [r[field] for r in self.runs if r[field] is not None]

    def by_seed(self) -> dict[int, float]:
        return {r["config"]["seed"]: r["median_val_error"] for r in self.runs}


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def study_cells(runs: list[dict[str, Any]]) -> tuple[list[str], list[Cell]]:
    """(varying fields, cells) of a study's done runs, cells sorted by their field values."""
    ignore = {"seed"} | {"device", "num_threads", "progress"}
    flats = [flat_config(r["config"]) for r in runs]
    keys = sorted({k for f in flats for k in f} - ignore)
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    # the most telling fields first: norm, then batch size, then the rest alphabetically
    order = {"norm": 0, "batch_size": 1, "norm_options.num_groups": 2,
             "norm_options.group_size": 3}
    varying.sort(key=lambda k: (order.get(k, 9), k))
    groups: dict[str, Cell] = {}
    for run, flat in zip(runs, flats, strict=True):
        values = {k: flat.get(k) for k in varying}
        groups.setdefault(json.dumps(values, sort_keys=True), Cell(values, [])).runs.append(run)
    cells = sorted(groups.values(), key=lambda c: [_key(c.values[k]) for k in varying])
    for c in cells:
        c.runs.sort(key=lambda r: r["config"]["seed"])
    return varying, cells


def fmt_pm(xs: list[float]) -> str:
    """`12.34 ± 0.56` (or `12.34` for one value, `—` for none)."""
    if not xs:
        return "—"
    m, s = mean_std(xs)
    return f"{m:.2f} ± {s:.2f}" if len(xs) > 1 else f"{m:.2f}"


def _fmt_value(key: str, value: Any) -> str:
    if key == "norm":
        return norm_label(value)
    if value is None:
        return "—"
    return str(value)


def _col_name(key: str) -> str:
    return {"batch_size": "n", "norm_options.num_groups": "G",
            "norm_options.group_size": "channels/group"}.get(key, key.split(".")[-1])


# ---------------------------------------------------------------------------------------------
# findings in plain words


def _diff(a: Cell | None, b: Cell | None) -> tuple[float, float, int] | None:
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


def _fmt_diff(d: tuple[float, float, int] | None, paper: float | None) -> str:
    if d is None:
        return "not measured"
    paper_txt = f" (paper: {paper:+.1f})" if paper is not None else ""
    return f"{d[0]:+.1f} ± {d[1]:.1f} points over {d[2]} seed(s){paper_txt}"


def _find(cells: list[Cell], **want: Any) -> Cell | None:
    for c in cells:
        if all(c.values.get(k) == v for k, v in want.items() if k in c.values):
            return c
    return None


def findings(kind: str, varying: list[str], cells: list[Cell]) -> list[str]:
    """Plain-words comparisons of one study next to the paper's claims."""
    out: list[str] = []
    paper = paper_table()

    def p(study: str, setting: str, norm: str) -> float | None:
        return paper.get((study, setting, norm))

    def pd(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    norms = sorted({c.values.get("norm") for c in cells if "norm" in c.values}, key=_key)
    if kind in ("batch", "video") and "batch_size" in varying:
        sizes = sorted({c.values["batch_size"] for c in cells})
        lo, hi = sizes[0], sizes[-1]
        for norm in norms or [None]:
            sel = {"norm": norm} if norm is not None else {}
            a, b = _find(cells, batch_size=lo, **sel), _find(cells, batch_size=hi, **sel)
            ref = pd(p("table2_batch", f"n={lo}", norm_label(norm)),
                     p("table2_batch", f"n={hi}", norm_label(norm))) if kind == "batch" else None
            out.append(f"{norm_label(norm)} error at n={lo} − at n={hi}: "
                       f"{_fmt_diff(_diff(a, b), ref)}")
        if "bn" in norms and "gn" in norms:
            for n in (lo, hi):
                ref = pd(p("table2_batch", f"n={n}", "GN"), p("table2_batch", f"n={n}", "BN"))
                if kind == "video":
                    other = other_published()
                    g = other.get(("kinetics_i3d", f"32 frames n={n}", "GN", "top1_acc"))
                    b_ = other.get(("kinetics_i3d", f"32 frames n={n}", "BN", "top1_acc"))
                    ref = None if g is None or b_ is None else b_ - g  # error = 100 - acc
                d = _diff(_find(cells, batch_size=n, norm="gn"), _find(cells, batch_size=n,
                                                                       norm="bn"))
                out.append(f"GN − BN error at n={n}: {_fmt_diff(d, ref)}")
    elif kind in ("norms", "ws", "batch_renorm", "finetune") and "norm" in varying:
        base = "bn" if "bn" in norms else norms[0]
        for norm in norms:
            if norm == base:
                continue
            ref = None
            if kind == "norms":
                ref = pd(p("table1_norms", "n=32", norm_label(norm)),
                         p("table1_norms", "n=32", "BN"))
            elif kind == "batch_renorm":
                lbl = "BR (r_max=1.5 d_max=0.5)" if norm == "brn" else norm_label(norm)
                ref = pd(p("batch_renorm", "n=4", lbl), p("batch_renorm", "n=4", "BN"))
            elif kind == "finetune" and norm == "gn":
                # COCO: GN box AP 40.3 vs frozen BN* 38.6; as "error" (100 - AP) the gap is -1.7
                ref = -1.7
            for c in cells:
                if c.values.get("norm") != norm:
                    continue
                rest = {k: v for k, v in c.values.items() if k != "norm"}
                b = _find(cells, norm=base, **rest)
                if kind == "ws":  # against BN at the same n in the GN paper's Table 2
                    ref = pd(paper_value("ws", c.values),
                             paper_value("ws", {**c.values, "norm": base}))
                where = " ".join(f"{_col_name(k)}={v}" for k, v in rest.items())
                out.append(f"{norm_label(norm)} − {norm_label(base)} error"
                           f"{' at ' + where if where else ''}: {_fmt_diff(_diff(c, b), ref)}")
    elif kind == "groups":
        for key, lbl in (("norm_options.num_groups", "G"),
                         ("norm_options.group_size", "channels/group")):
            sel = [c for c in cells if c.values.get(key) is not None]
            if not sel:
                continue
            best = min(sel, key=lambda c: mean_std(c.errors())[0])
            out.append(f"best {lbl}: {best.values[key]} ({fmt_pm(best.errors())}%)")
            # the extreme (G=1 is LN, 1 channel/group is IN) against the largest other setting
            values = sorted(c.values[key] for c in sel)
            lo, hi = values[0], values[-1]
            if lo != hi:
                a, b = _find(sel, **{key: lo}), _find(sel, **{key: hi})
                ref = pd(paper_value("groups", {key: lo}), paper_value("groups", {key: hi}))
                out.append(f"{lbl}={lo} − {lbl}={hi} error: {_fmt_diff(_diff(a, b), ref)}")
    return out


# ---------------------------------------------------------------------------------------------
# markdown


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def study_table(kind: str, varying: list[str], cells: list[Cell]) -> str:
    """Markdown table of a study: one row per cell, ours beside the paper's."""
    header = [_col_name(k) for k in varying] + [
        "val error % (median of last epochs)", "final epoch %", "seeds", "paper %"]
    rows = []
    for c in cells:
        pv = paper_value(kind, c.values)
        rows.append([_fmt_value(k, c.values[k]) for k in varying] + [
            fmt_pm(c.errors()), fmt_pm(c.errors("final_val_error")), str(len(c.runs)),
            "—" if pv is None else f"{pv:.1f}"])
    return _table(header, rows)


def _setup_line(runs: list[dict[str, Any]], varying: list[str]) -> str:
    flats = [flat_config(r["config"]) for r in runs]
    parts = []
    for k in KEY_SETUP_FIELDS:
        if k in varying:
            continue
        vals = sorted({json.dumps(f.get(k)) for f in flats})
        if len(vals) == 1:
            parts.append(f"{k}={json.loads(vals[0])}")
    n = sorted({f.get("batch_size") for f in flats}, key=_key)
    w = sorted({f.get("workers") for f in flats}, key=_key)
    if "batch_size" not in varying and len(n) == 1 and len(w) == 1:
        parts.append(f"step batch = {w[0]}×{n[0]}")
    last = sorted({f.get("report_last") for f in flats}, key=_key)
    parts.append(f"reported = median val error of the last {', '.join(map(str, last))} epochs")
    return "; ".join(parts)


def build_report(db: str | Path, out_dir: str | Path, *, plots: bool = True,
                 csv_export: bool = False, title: str | None = None) -> Path:
    """Write report.md (and PNGs, CSVs) for a results database; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(db)
    try:
        md = render_report(store, out if plots else None, title=title)
        if csv_export:
            export_csv(store, out)
    finally:
        store.close()
    path = out / "report.md"
    path.write_text(md, encoding="utf-8")
    return path


def render_report(store: Store, plot_dir: Path | None, *, title: str | None = None) -> str:
    """The report's markdown (and its figures into plot_dir when given)."""
    all_runs = store.runs()
    done = [r for r in all_runs if r["status"] == "done"]
    counts = store.counts()
    if title is None:  # from the database, so `groupnorm report` and `reproduce` agree
        presets = sorted({s["preset"] for s in store.studies() if s["preset"]})
        title = ("Group Normalization experiments: preset " + ", ".join(f"`{p}`" for p in presets)
                 if presets else "Group Normalization experiments")
    lines = [f"# {title}", ""]
    lines.append(
        "Generated by `groupnorm report` from the results database alone; every number below "
        "is in it. Errors are top-1 classification errors in %, mean ± sample std over seeds "
        "(`seeds` = number of runs per cell); a run's error is the median val error of its last "
        "epochs, as in the paper. Paper numbers: Wu & He, Group Normalization, ECCV 2018 "
        "(ImageNet, ResNet-50), except where a study says otherwise."
    )
    lines.append("")
    lines.append("## Runs")
    lines.append("")
    lines.append("- status: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if done:
        versions = sorted({r["code_version"] or "?" for r in done})
        torches = sorted({r["torch_version"] or "?" for r in done})
        devices = sorted({r["device"] or "?" for r in done})
        lines.append(f"- code: {', '.join(versions)}; torch {', '.join(torches)}; "
                     f"device {', '.join(devices)}")
        started = min(r["started_at"] or "" for r in done)
        finished = max(r["finished_at"] or "" for r in done)
        total = sum(r["train_seconds"] or 0.0 for r in done)
        lines.append(f"- recorded between {started} and {finished} (UTC); "
                     f"training wall time {total / 60:.1f} min in total")
        sweeps = store.get_meta("sweeps", [])
        if sweeps:
            wall = sum(s["wall_s"] for s in sweeps)
            jobs = sorted({s["jobs"] for s in sweeps})
            lines.append(f"- sweep wall time {wall / 60:.1f} min over {len(sweeps)} "
                         f"invocation(s) of the sweep command (jobs {', '.join(map(str, jobs))})")
        lines.append(_overhead_line(done))
    lines.append("")
    for study in store.studies():
        ids = set(store.study_run_ids(study["name"]))
        runs = [r for r in done if r["id"] in ids]
        lines.append(f"## {study['name']} ({study['kind']})")
        lines.append("")
        if study["description"]:
            lines.append(study["description"])
            lines.append("")
        n_all = sum(1 for r in all_runs if r["id"] in ids)
        if not runs:
            lines.append(f"No finished runs yet ({n_all} in the database).")
            lines.append("")
            continue
        varying, cells = study_cells(runs)
        lines.append(f"Setup: {_setup_line(runs, varying)}. {len(runs)} of {n_all} runs done.")
        lines.append("")
        lines.append(study_table(study["kind"], varying, cells))
        lines.append("")
        found = findings(study["kind"], varying, cells)
        if found:
            lines.append("Findings:")
            lines.append("")
            lines += [f"- {f}" for f in found]
            lines.append("")
        if plot_dir is not None:
            from . import plots as _plots

            for name, caption in _plots.study_figures(study, varying, cells, store, plot_dir):
                lines.append(f"![{caption}]({name})")
                lines.append("")
    failed = [r for r in all_runs if r["status"] == "failed"]
    if failed:
        lines.append("## Failed runs")
        lines.append("")
        for r in failed:
            err = (r["error"] or "").strip().splitlines()
            lines.append(f"- run {r['id']} ({r['config_hash']}): {err[-1] if err else '?'}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _overhead_line(done: list[dict[str, Any]]) -> str:
    data = step = eval_ = log = 0.0
    steps = 0
    for r in done:
        t = json.loads(r["timings_json"] or "{}")
        data += t.get("data_s", 0.0)
        step += t.get("step_s", 0.0)
        eval_ += t.get("eval_s", 0.0)
        log += t.get("log_s", 0.0)
        steps += int(t.get("steps", 0))
    if steps == 0 or step == 0:
        return "- harness overhead: not recorded"
    return (f"- harness time per optimizer step: training step {1e3 * step / steps:.2f} ms, "
            f"data {1e3 * data / steps:.3f} ms ({100 * data / step:.1f}% of the step), logging + "
            f"checkpoints {1e3 * log / steps:.3f} ms ({100 * log / step:.1f}%); "
            f"evaluation {eval_:.0f} s in total")


def export_csv(store: Store, out: Path) -> tuple[Path, Path]:
    """runs.csv (flattened config + summary) and epochs.csv next to the report."""
    runs = store.runs()
    memberships: dict[int, list[str]] = defaultdict(list)
    for study in store.studies():
        for rid in store.study_run_ids(study["name"]):
            memberships[rid].append(study["name"])
    cfg_keys = sorted({k for r in runs for k in flat_config(r["config"])})
    base = ["id", "config_hash", "status", "studies", "median_val_error", "final_val_error",
            "best_val_error", "final_train_error", "images_per_s", "train_seconds", "num_params",
            "device", "torch_version", "code_version", "started_at", "finished_at", "error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(base + [f"config.{k}" for k in cfg_keys])
    for r in runs:
        flat = flat_config(r["config"])
        row = [r.get(k) for k in base]
        row[3] = ";".join(memberships.get(r["id"], []))
        w.writerow(row + [json.dumps(flat.get(k)) if isinstance(flat.get(k), list | dict)
                          else flat.get(k) for k in cfg_keys])
    runs_path = out / "runs.csv"
    runs_path.write_text(buf.getvalue(), encoding="utf-8")
    epochs = store.epochs()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = list(epochs[0]) if epochs else ["run_id", "epoch"]
    w.writerow(cols)
    for e in epochs:
        w.writerow([e[c] for c in cols])
    epochs_path = out / "epochs.csv"
    epochs_path.write_text(buf.getvalue(), encoding="utf-8")
    return runs_path, epochs_path


def default_config_dict() -> dict[str, Any]:
    """TrainConfig defaults (for callers that show what a study changed)."""
    return TrainConfig().to_dict()
