"""The report's figures (matplotlib, Agg): error vs batch size, group ablation, error curves.

Which figures a study gets depends on what varies in it; the published numbers beside ours come
from the study's kind (kinds.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .cells import Cell, col_name, mean_std
from .kinds import StudyKind
from .recipe import norm_label
from .store import Store

_PNG_META = {"Software": None}  # no matplotlib version in the file: same data, same bytes


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def study_figures(name: str, kind: StudyKind, varying: list[str], cells: list[Cell],
                  store: Store, out: Path) -> list[tuple[str, str]]:
    """Draw a study's figures into `out`; returns (file name, caption) pairs."""
    figs = []
    if "batch_size" in varying:
        figs.append((batch_figure(name, kind, cells, out / f"{name}_error_vs_batch.png"),
                     f"{name}: val error vs batch size (Figure 1 style)"))
    for key in ("norm_options.num_groups", "norm_options.group_size"):
        if key in varying:
            fname = f"{name}_{col_name(key).replace('/', '_per_')}.png"
            figs.append((group_figure(name, kind, key, cells, out / fname),
                         f"{name}: val error vs {col_name(key)} (Table 3 style)"))
    figs.append((curves_figure(name, varying, cells, store, out / f"{name}_curves.png"),
                 f"{name}: train (dashed) and val (solid) error per epoch (Figure 4 style)"))
    return figs


def batch_figure(name: str, kind: StudyKind, cells: list[Cell], path: Path) -> str:
    """Error vs batch size, one line per norm; the published numbers beside when there are."""
    plt = _plt()
    norms = sorted({c.values.get("norm") for c in cells}, key=str)
    has_paper = any(kind.paper(c.values) is not None for c in cells)
    fig, axes = plt.subplots(1, 2 if has_paper else 1, figsize=(9 if has_paper else 5, 3.6),
                             squeeze=False)
    ax = axes[0][0]
    for norm in norms:
        sel = sorted((c for c in cells if c.values.get("norm") == norm),
                     key=lambda c: c.values["batch_size"])
        # other varying fields (besides norm and n) become separate lines
        groups: dict[str, list[Cell]] = {}
        for c in sel:
            rest = " ".join(f"{col_name(k)}={v}" for k, v in c.values.items()
                            if k not in ("norm", "batch_size"))
            groups.setdefault(rest, []).append(c)
        for rest, cs in groups.items():
            xs = [c.values["batch_size"] for c in cs]
            ms = [mean_std(c.errors()) for c in cs]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                        label=f"{norm_label(norm)} {rest}".strip())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images per worker n")
    ax.set_ylabel("val error (%)")
    ax.set_title(f"ours: {name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if has_paper:
        ax2 = axes[0][1]
        for norm in norms:
            pts = sorted({(c.values["batch_size"], kind.paper(c.values)) for c in cells
                          if c.values.get("norm") == norm and kind.paper(c.values) is not None})
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", linestyle="--",
                         label=norm_label(norm))
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("images per GPU n")
        ax2.set_title(kind.published_title)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=_PNG_META)
    plt.close(fig)
    return path.name


def group_figure(name: str, kind: StudyKind, key: str, cells: list[Cell], path: Path) -> str:
    """Error vs number of groups (or channels per group), ours and the paper's."""
    plt = _plt()
    sel = sorted((c for c in cells if c.values.get(key) is not None), key=lambda c: c.values[key])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [c.values[key] for c in sel]
    ms = [mean_std(c.errors()) for c in sel]
    ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                label="ours")
    pts = [(c.values[key], kind.paper(c.values)) for c in sel]
    pts = [p for p in pts if p[1] is not None]
    if pts:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color="gray", label="paper")
        ax2.set_ylabel("paper val error (%)", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(col_name(key))
    ax.set_ylabel("val error (%)")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=_PNG_META)
    plt.close(fig)
    return path.name


def curves_figure(name: str, varying: list[str], cells: list[Cell], store: Store,
                  path: Path) -> str:
    """Train and val error per epoch, mean over seeds; one panel per norm when norms vary."""
    plt = _plt()
    panels: dict[str, list[Cell]] = {}
    for c in cells:
        key = norm_label(c.values["norm"]) if "norm" in varying and "batch_size" in varying else ""
        panels.setdefault(key, []).append(c)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False,
                             sharey=True)
    cmap = plt.get_cmap("viridis" if len(cells) > 10 else "tab10")
    for ax, (panel, cs) in zip(axes[0], panels.items(), strict=True):
        for i, c in enumerate(cs):
            curves = [store.epochs(r["id"]) for r in c.runs]
            length = min(len(e) for e in curves)
            if length == 0:
                continue
            x = np.arange(1, length + 1)
            tr = np.mean([[e["train_error"] for e in ep[:length]] for ep in curves], axis=0)
            va = np.mean([[e["val_error"] for e in ep[:length]] for ep in curves], axis=0)
            color = cmap(i / max(len(cs) - 1, 1)) if len(cells) > 10 else cmap(i % 10)
            label = " ".join(f"{col_name(k)}={norm_label(v) if k == 'norm' else v}"
                             for k, v in c.values.items() if not (panel and k == "norm"))
            ax.plot(x, va, color=color, label=label or "val")
            ax.plot(x, tr, color=color, linestyle="--", alpha=0.7)
        ax.set_xlabel("epoch")
        ax.set_title(f"{name} {panel}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("error (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=_PNG_META)
    plt.close(fig)
    return path.name
