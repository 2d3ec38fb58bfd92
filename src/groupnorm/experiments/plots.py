"""The report's figures (matplotlib, Agg): error vs batch size, group ablation, error curves.

Which figures a study gets depends on what varies in it; the published numbers beside ours come
from the study's kind (kinds.py). Each figure is meant to be read without the code:

- titles say in words what is shown and on what (dataset, model, W, epochs), never a study id;
- ours and the paper's are separate panels, each with its own labelled y axis (the paper's
  errors are ImageNet/Kinetics errors, on another scale than ours), sharing the x axis, and the
  paper's curve is drawn at the paper's own settings (n = 2..32, G = 1..64), not only at ours;
- error bars (± sample std over seeds) only where a cell has 2 or more seeds, and the y label
  says over how many;
- curves: one legend says which color is which run and that solid = val, dashed = train; a
  dotted vertical line marks where a fine-tuning run switches from pretraining to its small n;
- a study that spans datasets gets one panel of ours per dataset.

``*_figure`` functions build and return a matplotlib Figure (the tests read its titles, labels,
legends and lines); :func:`study_figures` saves and closes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .cells import Cell, by_dataset, col_name, dataset_words, mean_std, sort_key
from .config import flatten
from .kinds import StudyKind
from .recipe import norm_label
from .store import Store

_PNG_META = {"Software": None}  # no matplotlib version in the file: same data, same bytes
_PANEL_W, _PANEL_H, _MIN_W = 4.6, 3.7, 6.4
# how the varying fields read in a legend
_FIELD_WORDS = {"batch_size": "n", "norm_options.num_groups": "G",
                "norm_options.group_size": "channels/group"}
_GROUP_AXIS = {"norm_options.num_groups": ("number of groups G (G = 1 is LN)", "groups G"),
               "norm_options.group_size": ("channels per group (1 is IN)", "channels per group")}
TRAIN_VAL_NOTE = "solid: val error · dashed: train error"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def study_figures(name: str, kind: StudyKind, varying: list[str], cells: list[Cell],
                  store: Store, out: Path) -> list[tuple[str, str]]:
    """Draw a study's figures into `out` (files named after the study); returns (file name,
    caption) pairs."""
    plt = _plt()
    setup = setup_words([r for c in cells for r in c.runs], varying, kind.unit)
    figs = []
    if "batch_size" in varying:
        fig = batch_figure(kind, varying, cells, setup)
        figs.append((_save(plt, fig, out / f"{name}_error_vs_batch.png"),
                     f"{kind.title}: val error vs {kind.unit} per worker n, ours beside the "
                     "published numbers (Figure 1 style)"))
    for key in _GROUP_AXIS:
        if key in varying:
            fig = group_figure(kind, key, varying, cells, setup)
            fname = f"{name}_{col_name(key).replace('/', '_per_')}.png"
            figs.append((_save(plt, fig, out / fname),
                         f"{kind.title}: val error vs {_GROUP_AXIS[key][1]}, ours beside the "
                         "paper's (Table 3 style)"))
    fig = curves_figure(kind, varying, cells, store, setup)
    figs.append((_save(plt, fig, out / f"{name}_curves.png"),
                 f"{kind.title}: error per epoch, {TRAIN_VAL_NOTE} (Figure 4 style)"))
    return figs


def _figure(plt: Any, panels: int, **kw: Any) -> tuple[Any, Any]:
    """A row of `panels` panels, wide enough for a two-line title however few panels."""
    width = max(_MIN_W, _PANEL_W * panels)
    return plt.subplots(1, panels, figsize=(width, _PANEL_H + 0.6), squeeze=False, **kw)


def _suptitle(fig: Any, title: str, setup: str) -> None:
    """The figure's title in words, and under it what every run shares, wrapped to fit."""
    chars = int(fig.get_figwidth() * 13)  # ~13 characters per inch at 10 pt
    lines = [title]
    line = ""
    for part in setup.split(" · "):  # break between the parts, not inside one
        if line and len(line) + 3 + len(part) > chars:
            lines.append(line)
            line = part
        else:
            line = f"{line} · {part}" if line else part
    if line:
        lines.append(line)
    fig.suptitle("\n".join(lines), fontsize=10)


def _save(plt: Any, fig: Any, path: Path) -> str:
    fig.savefig(path, dpi=110, metadata=_PNG_META)
    plt.close(fig)
    return path.name


def setup_words(runs: list[dict[str, Any]], varying: list[str], unit: str = "images") -> str:
    """What every run of a figure shares, in words: dataset, train size, model, W, epochs."""
    flats = [flatten(r["config"]) for r in runs]

    def one(key: str) -> Any:
        vals = {json.dumps(f.get(key), sort_keys=True) for f in flats}
        return json.loads(vals.pop()) if len(vals) == 1 else None

    parts = []
    ds = one("dataset") if "dataset" not in varying else None
    if ds is not None:
        size = one("train_size")
        parts.append(dataset_words(ds) + (f", {size} training {unit}" if size else ""))
    model = one("model")
    if model is not None:
        width = one("model_options.width")
        parts.append(f"{model}" + (f" width {width}" if width is not None else ""))
    w, n = one("workers"), one("batch_size")
    epochs, pre = one("epochs"), one("pretrain_epochs")
    if n is not None and pre:
        n = f"{one('pretrain_batch_size')} → {n}"  # the pretraining batch, then the final one
    if w is not None and "workers" not in varying:
        workers = f"W = {w} worker{'s' if w != 1 else ''}"
        parts.append(f"{workers} × n = {n} {unit} per step" if n is not None and
                     "batch_size" not in varying else f"{workers} per step")
    if epochs is not None and "epochs" not in varying:
        parts.append(f"{pre} + {epochs} epochs" if pre else f"{epochs} epochs")
    return " · ".join(parts)


def _seeds_words(cells: list[Cell]) -> str:
    ks = sorted({len(c.runs) for c in cells})
    if ks == [1]:
        return "1 seed, no error bars"
    if ks[0] == 1:
        return f"mean of 1-{ks[-1]} seeds; bars: ± std where ≥ 2"
    span = str(ks[0]) if len(ks) == 1 else f"{ks[0]}-{ks[-1]}"
    return f"mean ± std over {span} seeds"


def _points(cells: list[Cell], key: str) -> tuple[list[float], list[float], list[float] | None]:
    """(x, mean error, std or None) of cells along `key`; no bar for a 1-seed cell."""
    xs = [float(c.values[key]) for c in cells]
    ms = [mean_std(c.errors()) for c in cells]
    multi = [len(c.errors()) >= 2 for c in cells]
    err = [s if m else 0.0 for (_, s), m in zip(ms, multi, strict=True)]
    return xs, [m for m, _ in ms], (err if any(multi) else None)


def _norm_colors(norms: list[Any]) -> dict[str, Any]:
    """One color per norm label, the same in every panel (ours and the paper's)."""
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {norm_label(n): cmap(i % 10) for i, n in enumerate(norms)}


def _log2_axis(ax: Any, xs: list[float], label: str) -> None:
    """A log2 x axis with ticks at the values drawn, written as plain numbers (2, 4, 8)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = sorted(set(xs))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def _panel_title(dataset: Any) -> str:
    return "Ours" + (f": {dataset_words(dataset)}" if dataset is not None else "")


def _rest_words(values: dict[str, Any], skip: tuple[str, ...]) -> str:
    return " ".join(f"{_FIELD_WORDS.get(k, col_name(k))}={v}" for k, v in values.items()
                    if k not in skip)


def batch_figure(kind: StudyKind, varying: list[str], cells: list[Cell], setup: str) -> Any:
    """Error vs images per worker n: ours (one panel per dataset, one line per norm) and the
    published curve at its own n values, on its own labelled axis."""
    plt = _plt()
    norms = sorted({c.values.get("norm") for c in cells}, key=sort_key)
    colors = _norm_colors(norms)
    series = kind.paper_series("batch_size", norms)
    parts = by_dataset(varying, cells)
    n_panels = len(parts) + (1 if series else 0)
    fig, axes = _figure(plt, n_panels, sharex=True)
    xs_all: list[float] = []
    for ax, (dataset, _rest, cs) in zip(axes[0], parts, strict=False):
        for norm in norms:
            sel = sorted((c for c in cs if c.values.get("norm") == norm),
                         key=lambda c: c.values["batch_size"])
            # other varying fields (besides norm and n) become separate lines
            lines: dict[str, list[Cell]] = {}
            for c in sel:
                lines.setdefault(_rest_words(c.values, ("norm", "batch_size")), []).append(c)
            for rest, line in lines.items():
                xs, ms, err = _points(line, "batch_size")
                xs_all += xs
                ax.errorbar(xs, ms, yerr=err, marker="o", capsize=3,
                            color=colors[norm_label(norm)] if len(lines) == 1 else None,
                            label=f"{norm_label(norm)} {rest}".strip())
        ax.set_ylabel(f"val error (%), {_seeds_words(cs)}")
        ax.set_title(_panel_title(dataset))
        ax.legend(fontsize=8)
    if series:
        ax2 = axes[0][-1]
        for label, pts in series.items():
            color = colors.get(label.split(" ")[0])
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", linestyle="--",
                     color=color, label=label)
            xs_all += [p[0] for p in pts]
        ax2.set_ylabel(kind.published_axis)
        ax2.set_title(kind.published_title, fontsize=10)
        ax2.legend(fontsize=8)
    for i, ax in enumerate(axes[0]):
        theirs = bool(series) and i == n_panels - 1
        _log2_axis(ax, xs_all, f"{kind.unit} per GPU n (8 GPUs)" if theirs else
                   f"{kind.unit} per worker n (the batch BN normalizes over)")
    _suptitle(fig, f"{kind.title}: val error vs {kind.unit} per worker n", setup)
    fig.tight_layout()
    return fig


def group_figure(kind: StudyKind, key: str, varying: list[str], cells: list[Cell],
                 setup: str) -> Any:
    """GN's error vs number of groups (or channels per group): ours, and the paper's Table 3 at
    its own settings (1..64), each on its own labelled axis."""
    plt = _plt()
    series = kind.paper_series(key, [])
    parts = by_dataset(varying, cells)
    n_panels = len(parts) + (1 if series else 0)
    fig, axes = _figure(plt, n_panels, sharex=True)
    xs_all: list[float] = []
    for ax, (dataset, _rest, cs) in zip(axes[0], parts, strict=False):
        sel = sorted((c for c in cs if c.values.get(key) is not None),
                     key=lambda c: c.values[key])
        lines: dict[str, list[Cell]] = {}
        for c in sel:
            lines.setdefault(_rest_words(c.values, (key,)), []).append(c)
        for rest, line in lines.items():
            xs, ms, err = _points(line, key)
            xs_all += xs
            ax.errorbar(xs, ms, yerr=err, marker="o", capsize=3, label=rest or "GN, ours")
        ax.set_ylabel(f"val error (%), {_seeds_words(sel)}")
        ax.set_title(_panel_title(dataset))
        ax.legend(fontsize=8)
    if series:
        ax2 = axes[0][-1]
        for label, pts in series.items():
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color="gray",
                     label=f"{label}, paper")
            xs_all += [p[0] for p in pts]
        ax2.set_ylabel(kind.published_axis)
        ax2.set_title(kind.published_title, fontsize=10)
        ax2.legend(fontsize=8)
    for ax in axes[0]:
        _log2_axis(ax, xs_all, _GROUP_AXIS[key][0])
    _suptitle(fig, f"{kind.title}: val error vs {_GROUP_AXIS[key][1]}", setup)
    fig.tight_layout()
    return fig


def _switch(curves: list[list[dict[str, Any]]]) -> int | None:
    """The first epoch of the final phase when a pretraining phase came before it, else None."""
    for ep in curves:
        phases = [e["phase"] for e in ep]
        if "pretrain" in phases and "train" in phases:
            return int(ep[phases.index("train")]["epoch"])
    return None


def curves_figure(kind: StudyKind, varying: list[str], cells: list[Cell], store: Store,
                  setup: str) -> Any:
    """Train and val error per epoch, mean over seeds; one panel per norm when norms and n
    vary, per dataset when datasets do; the switch to fine-tuning marked."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    per_norm = "norm" in varying and "batch_size" in varying
    panels: dict[str, list[Cell]] = {}
    for c in cells:
        words = []
        if "dataset" in varying:
            words.append(dataset_words(c.values["dataset"]))
        if per_norm:
            words.append(norm_label(c.values["norm"]))
        panels.setdefault(" · ".join(words), []).append(c)
    fig, axes = _figure(plt, len(panels), sharey=True)
    many = max(len(cs) for cs in panels.values()) > 10
    cmap = plt.get_cmap("viridis" if many else "tab10")
    skip = ("dataset",) + (("norm",) if per_norm else ())
    for ax, (panel, cs) in zip(axes[0], panels.items(), strict=True):
        handles = []
        switches = set()
        for i, c in enumerate(cs):
            curves = [store.epochs(r["id"]) for r in c.runs]
            length = min(len(e) for e in curves)
            if length == 0:
                continue
            x = np.arange(1, length + 1)
            tr = np.mean([[e["train_error"] for e in ep[:length]] for ep in curves], axis=0)
            va = np.mean([[e["val_error"] for e in ep[:length]] for ep in curves], axis=0)
            color = cmap(i / max(len(cs) - 1, 1)) if many else cmap(i % 10)
            label = " ".join(
                (norm_label(v) if k == "norm" else f"{_FIELD_WORDS.get(k, col_name(k))} = {v}")
                for k, v in c.values.items() if k not in skip) or "all runs"
            (line,) = ax.plot(x, va, color=color, label=label)
            ax.plot(x, tr, color=color, linestyle="--", alpha=0.7)
            handles.append(line)
            s = _switch(curves)
            if s is not None:
                pre = c.runs[0]["config"].get("pretrain_batch_size")
                switches.add((s, pre, c.runs[0]["config"].get("batch_size")))
        for s, pre, n in sorted(switches, key=lambda t: tuple(map(sort_key, t))):
            ax.axvline(s - 0.5, color="black", linestyle=":", linewidth=1.2)
            handles.append(Line2D([], [], color="black", linestyle=":",
                                  label=f"fine-tuning starts (n = {pre} → {n})"))
        handles += [Line2D([], [], color="gray", linestyle="-", label="val error"),
                    Line2D([], [], color="gray", linestyle="--", label="train error")]
        ax.legend(handles=handles, fontsize=7)
        ax.set_xlabel("epoch (pretraining, then fine-tuning)" if switches else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel:
            ax.set_title(panel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 error (%), mean over seeds")
    _suptitle(fig, f"{kind.title}: error per epoch", setup)
    fig.tight_layout()
    return fig
