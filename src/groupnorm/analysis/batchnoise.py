"""Batch-statistics noise: how far the mean and variance that BN computes from n images stray
from the population's, per BN layer, beside each dataset's BN small-batch penalty.

Why it matters: in training BN normalizes each batch with that batch's per-channel mean and
variance; at test time it uses the population's (the running averages). What a small per-worker
batch n costs BN is the distance between the two: noise in every training step, and a network
trained on one normalization and tested on another. How large that distance is depends on the
data as much as on n. When the images of a dataset give a channel nearly the same statistics
(centered items on one background), two images already stand for the population and BN at
n = 2 behaves as at n = 32; when they differ (natural images: colours, lighting, scale), the
batch statistics of two images stray far. The paper's claim C1 (BN's error rises as n shrinks)
can only show where they stray.

The measure, for a model and P population images:

1. One forward pass in training mode over all P images as ONE batch, every BN layer on
   whole-batch statistics: each BN layer normalizes with the population's exact mean and
   variance, so the activations reaching layer k are those of the network with every earlier
   layer normalized as at test time (as "precise BN" recomputes them). A forward pre-hook
   records, per image i and channel c of each BN layer's input x (P, C, *S), the means over the
   S positions of x and of x² (float64): m1[i, c], m2[i, c].
2. The population: μ_c = mean_i m1[i, c], σ²_c = mean_i m2[i, c] − μ_c² (biased, as BN's).
3. Batches: random permutations of the P images cut into ⌊P/n⌋ disjoint batches of n, as many
   permutations as give at least `draws` batches. A batch's mean is the mean of its images' m1,
   its biased variance the mean of their m2 minus the squared mean: exactly BN's statistics
   over (n, *S).
4. Mean error of channel c: the RMS over batches of (μ_B − μ_c) / σ_c, in units of the
   population's std, which is how far x̂ = (x − μ)/σ is shifted; variance error: the RMS of
   (σ²_B − σ²_c) / σ²_c. A layer's value is the average over its channels (a channel with
   σ_c = 0 carries no information and is left out, and counted).

Closed forms (the tests check them): for i.i.d. values a batch of n images of S positions holds
N = n·S independent values, so the RMS mean error is 1/√N times the finite-population factor
√((P − n)/(P − 1)) of drawing images without replacement, and for Gaussian values the RMS
relative error of the biased variance is √(2N − 1)/N. Give every image an offset of variance τ²
on top of within-image noise of variance s² and the mean error becomes
√((τ² + s²/S) / (n (τ² + s²))): the between-image part does not shrink with the image size S.
That part is what differs between datasets, and the CSV's ``iid_mean_error`` (1/√(n·S)) shows
how far each layer is from the i.i.d. case.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the paper's n values (Table 2, Figure 1)
SIZES = (2, 4, 8, 16, 32)

#: the trained model's protocol when `groupnorm batch-noise` trains one: the CIFAR quick net
#: (resnet20 of width 8, stages 8/16/32) on both datasets, BN at n = 32 with W = 4, a fixed
#: 10 000-image subset, step decay at 30/60/90 %
TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "resnet20", "model_options": {"width": 8}, "norm": "bn", "batch_size": 32,
    "workers": 4, "train_size": 10000, "val_size": 2000, "epochs": 6, "lr": 0.1,
    "report_last": 1, "num_threads": 1, "seed": 0,
}

CSV_FIELDS = ("dataset", "model_state", "layer", "name", "channels", "height", "width", "n",
              "batches", "mean_error", "var_error", "iid_mean_error", "channels_used")
# n = 0: the ordinary eval-mode error (running statistics)
EVAL_FIELDS = ("dataset", "n", "val_error", "images")


@dataclass
class LayerMoments:
    """Per-image, per-channel moments of one BN layer's input over a population of images."""

    name: str  # the layer's module path in the model ("layer1.0.bn1")
    shape: tuple[int, ...]  # the input's (C, *spatial) per image
    m1: torch.Tensor  # (P, C) float64: mean of x over the spatial positions, per image
    m2: torch.Tensor  # (P, C) float64: mean of x², per image

    @property
    def positions(self) -> int:
        """S: the spatial positions of one image (1 for an (N, C) input)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


def layer_moments(model: nn.Module, images: torch.Tensor) -> list[LayerMoments]:
    """Every batch-statistics norm layer's input moments, in forward order, over `images` (P
    images, one batch) with each BN layer normalizing by the population's exact statistics.

    The model is copied: its running statistics and mode are left as they were.
    """
    from groupnorm import set_virtual_batch, uses_batch_stats

    net = copy.deepcopy(model)
    set_virtual_batch(net, None)  # the whole population is one batch: its exact statistics
    net.train()
    found: list[LayerMoments] = []

    def record(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        dims = tuple(range(2, x.dim()))
        x64 = x.to(torch.float64)
        m1 = x64.mean(dim=dims) if dims else x64
        m2 = (x64 * x64).mean(dim=dims) if dims else x64 * x64
        found.append(LayerMoments(name, tuple(x.shape[1:]), m1, m2))

    hooks = [m.register_forward_pre_hook(lambda mod, args, _n=name: record(_n, mod, args))
             for name, m in net.named_modules() if uses_batch_stats(m)]
    if not hooks:
        raise ValueError(f"{type(model).__name__} has no batch-statistics norm layer (BN, "
                         "BR, SyncBN): there is no batch noise to measure; build it with "
                         "norm='bn'")
    try:
        with torch.no_grad():
            net(images)
    finally:
        for h in hooks:
            h.remove()
    return found


def batch_noise(m1: torch.Tensor, m2: torch.Tensor, sizes: Sequence[int] = SIZES, *,
                draws: int = 2000, seed: int = 0) -> dict[int, dict[str, float]]:
    """Mean and variance errors of n-image batch statistics against the population's.

    Args:
        m1, m2: (P, C) per-image means of x and x² over the positions (see LayerMoments).
        sizes: the batch sizes n (each at most P).
        draws: at least this many batches per n (whole permutations of the P images).
        seed: the permutations' seed.

    Returns:
        n -> {"mean_error", "var_error", "batches", "channels_used"}: the channel average of
        the RMS over batches of (μ_B − μ)/σ and of (σ²_B − σ²)/σ².
    """
    if m1.shape != m2.shape or m1.dim() != 2:
        raise ValueError(f"m1 and m2 must both be (P, C), got {tuple(m1.shape)} and "
                         f"{tuple(m2.shape)}")
    p = m1.shape[0]
    bad = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= p]
    if bad:
        raise ValueError(f"batch sizes {bad} are not integers in [1, {p}] (the population "
                         "size); use a larger population or smaller n")
    if draws < 1:
        raise ValueError(f"draws={draws}: must be >= 1")
    m1, m2 = m1.to(torch.float64), m2.to(torch.float64)
    mu = m1.mean(0)
    var = m2.mean(0) - mu * mu
    # a channel whose population variance is zero (or rounding noise of zero) has no scale
    keep = var > 1e-12 * float(var.abs().max().clamp_min(1e-300))
    if not bool(keep.any()):
        raise ValueError("every channel is constant over the population: nothing to measure")
    std = var.clamp_min(1e-300).sqrt()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in sizes:
        idx = batch_indices(p, n, draws, gen)  # (batches, n)
        mb = m1[idx].mean(1)  # (batches, C): BN's batch mean over (n, *S)
        vb = m2[idx].mean(1) - mb * mb  # BN's biased batch variance
        zm = ((mb - mu) / std).pow(2).mean(0).sqrt()
        zv = ((vb - var) / var.clamp_min(1e-300)).pow(2).mean(0).sqrt()
        out[n] = {"mean_error": float(zm[keep].mean()), "var_error": float(zv[keep].mean()),
                  "batches": int(idx.shape[0]), "channels_used": int(keep.sum())}
    return out


def batch_indices(population: int, n: int, draws: int,
                  generator: torch.Generator) -> torch.Tensor:
    """The batches the measure draws: (batches, n) image indices, rows of disjoint n-image
    batches cut from whole random permutations of the population (a permutation's last
    population mod n images are left out), as many permutations as give >= `draws` rows.

    Whole permutations rather than independent draws: every image weighs the same in every n.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= population:
        raise ValueError(f"n={n!r}: must be an integer in [1, {population}] (the population "
                         "size)")
    if draws < 1:
        raise ValueError(f"draws={draws}: must be >= 1")
    per = population // n
    reps = -(-draws // per)
    idx = torch.stack([torch.randperm(population, generator=generator)[: per * n]
                       for _ in range(reps)])
    return idx.view(-1, n)


def measure_model(model: nn.Module, images: torch.Tensor, sizes: Sequence[int] = SIZES, *,
                  draws: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (BN layer, n): the layer (1-based, in forward order), its name and input
    shape, the mean and variance errors, and the i.i.d. reference 1/√(n·S)."""
    rows = []
    for k, lm in enumerate(layer_moments(model, images), 1):
        spatial = lm.shape[1:] if len(lm.shape) > 1 else ()
        h = spatial[-2] if len(spatial) >= 2 else 1
        w = spatial[-1] if spatial else 1
        for n, r in batch_noise(lm.m1, lm.m2, sizes, draws=draws, seed=seed).items():
            rows.append({"layer": k, "name": lm.name, "channels": lm.shape[0], "height": h,
                         "width": w, "n": n, "batches": r["batches"],
                         "mean_error": r["mean_error"], "var_error": r["var_error"],
                         "iid_mean_error": 1.0 / math.sqrt(n * lm.positions),
                         "channels_used": r["channels_used"]})
    return rows


def error_with_batch_stats(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           sizes: Sequence[int] = SIZES, *, seed: int = 0,
                           chunk: int = 256) -> dict[int, float]:
    """What the noise does to the predictions: the error (%) of `model` on `images` when each
    BN layer normalizes with the statistics of random n-image batches (training-mode BN on
    batches of n) instead of its running statistics; key 0 is the ordinary eval-mode error.

    Each n sees the images in a seeded random order, cut into batches of n (a last batch of
    fewer images is left out). The model is copied; its statistics are not changed.
    """
    from groupnorm import set_virtual_batch

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    net = copy.deepcopy(model)
    out = {}
    with torch.no_grad():
        net.eval()
        out[0] = 100.0 * float((net(images).argmax(1) != labels).double().mean())
        gen = torch.Generator().manual_seed(seed)
        net.train()  # batch statistics; the running ones of this copy are never read
        for n in sizes:
            order = torch.randperm(len(images), generator=gen)
            order = order[: len(order) // n * n]
            set_virtual_batch(net, n)
            step = max(n, chunk // n * n)  # whole batches of n per forward call
            wrong = 0
            for i in range(0, len(order), step):
                idx = order[i:i + step]
                wrong += int((net(images[idx]).argmax(1) != labels[idx]).sum())
            out[n] = 100.0 * wrong / max(len(order), 1)
    return out


# ---------------------------------------------------------------------------------------------
# the models and the population


def population(cfg: Any, size: int, seed: int = 0) -> torch.Tensor:
    """`size` training images of a config's dataset (a fixed class-balanced subset drawn with
    `seed`), normalized as its training loader normalizes them, without augmentation."""
    from groupnorm import data as gdata
    from groupnorm.experiments.recipe import load_data

    train = load_data(cfg).train
    if size > len(train.labels):
        raise ValueError(f"population={size} exceeds the {len(train.labels)} training images of "
                         f"{cfg.dataset} (train_size={cfg.train_size}); lower it")
    sub = gdata.subset(train, size, seed=seed)
    (x, _y), = list(gdata.Loader(sub, size, shuffle=False, augment=False, drop_last=False))
    return x


def validation(cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's evaluation images (normalized as in training) and labels."""
    from groupnorm import data as gdata
    from groupnorm.experiments.recipe import load_data

    val = load_data(cfg).val
    (x, y), = list(gdata.Loader(val, len(val.labels), shuffle=False, augment=False,
                                drop_last=False))
    return x, y


def train_config(dataset: str, epochs: int, overrides: dict[str, Any] | None = None, *,
                 progress: bool = False) -> Any:
    """The TrainConfig of the BN model `groupnorm batch-noise` trains on `dataset`
    (TRAIN_DEFAULTS < overrides); `progress` shows the harness's epoch bars on a terminal."""
    from groupnorm.experiments.config import make_config

    return make_config({**TRAIN_DEFAULTS, "dataset": dataset, "epochs": epochs,
                        **(overrides or {}), "progress": progress})


def train_run(cfg: Any, folder: Path, log: Any = print) -> Path:
    """Train `cfg` through the harness into a run folder that keeps its final checkpoint (a
    finished folder of the same config is reused as it is; an unfinished one resumes)."""
    import torch as _torch

    from groupnorm.experiments import recipe, runtime
    from groupnorm.experiments.loop import train
    from groupnorm.experiments.recorder import RunFolder

    folder = Path(folder)
    run = _read_json(folder / "run.json")
    if (run.get("config_hash") == cfg.config_hash() and (folder / "summary.json").exists()
            and (folder / "checkpoint.pt").exists()):
        return folder
    recipe.check(cfg)
    rec = RunFolder(folder, cfg.to_dict(), cfg.config_hash(),
                    runtime.device_description(cfg.device), _torch.__version__)
    train(cfg, rec, checkpoint=folder / "checkpoint.pt", keep_checkpoint=True, log=log)
    return folder


def load_run(folder: str | Path) -> tuple[Any, nn.Module, nn.Module, dict[str, Any]]:
    """(config, trained model, the same model at its initialization, summary) of a run folder
    written by `groupnorm train --keep-checkpoint` (or by :func:`train_run`)."""
    from groupnorm.experiments import runtime
    from groupnorm.experiments.config import ConfigError, make_config
    from groupnorm.experiments.recipe import NormSpec, build_model

    folder = Path(folder)
    config, run = _read_json(folder / "config.json"), _read_json(folder / "run.json")
    ckpt_path = folder / "checkpoint.pt"
    if not config or not run or not ckpt_path.exists():
        raise ConfigError(f"{folder} is not a finished run folder with a kept checkpoint "
                          "(config.json, run.json, checkpoint.pt): write one with `groupnorm "
                          "train --keep-checkpoint --out DIR`, or let `groupnorm batch-noise "
                          "--dataset NAME` train one")
    cfg = make_config({**config, "progress": False})
    key = runtime.CheckpointKey(cfg.config_hash(), str(run.get("record_id")))
    try:
        _epoch, payload = runtime.load_checkpoint(ckpt_path, key, map_location="cpu")
    except runtime.CheckpointMismatch as exc:
        raise ConfigError(f"{ckpt_path} cannot be used: {exc}") from None
    norm = NormSpec.resolve(cfg.norm, cfg.norm_options)
    shape = _data_shape(cfg)
    runtime.seed_everything(cfg.seed)  # the init the run started from
    init = build_model(cfg, norm, shape[0], shape[1])
    trained = copy.deepcopy(init)
    trained.load_state_dict(payload["model"])
    return cfg, trained, init, _read_json(folder / "summary.json")


def _data_shape(cfg: Any) -> tuple[int, int]:
    from groupnorm.experiments.recipe import load_data

    train = load_data(cfg).train
    return int(train.images.shape[1]), int(train.num_classes)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# BN's penalty, from results databases


@dataclass(frozen=True)
class Penalty:
    """BN's error at the smallest n minus at the largest, paired by seed, from a database."""

    dataset: str
    lo: int  # the small n (2 when the study has it)
    hi: int  # the large n (32 when the study has it)
    mean: float  # points of val error
    std: float  # sample std of the per-seed differences (0 for one seed)
    seeds: int
    source: str  # "<database> study <name>"
    setup: str  # the study's model and epochs, in words


def bn_penalty(dbs: Sequence[str | Path], dataset: str) -> Penalty | None:
    """BN's small-batch penalty on `dataset` from the first database (in the order given) with
    a study that varies n for BN on that dataset and nothing else but the seed (and the norm);
    None when none has one."""
    from groupnorm.experiments.cells import by_dataset, find, study_cells
    from groupnorm.experiments.findings import diff
    from groupnorm.experiments.store import Store

    for db in dbs:
        with Store(db, readonly=True) as store:
            runs_all = store.runs(status="done")
            for study in store.studies():
                ids = set(store.study_run_ids(study["name"]))
                runs = [r for r in runs_all if r["id"] in ids]
                if not runs:
                    continue
                varying, cells = study_cells(runs)
                for ds, rest, cs in by_dataset(varying, cells):
                    sel = [r for c in cs for r in c.runs]
                    names = {r["config"].get("dataset") for r in sel}
                    if (ds if ds is not None else next(iter(names))) != dataset or \
                            len(names) != 1 or "batch_size" not in rest or \
                            set(rest) - {"batch_size", "norm"}:
                        continue
                    bn = [c for c in cs if c.runs[0]["config"].get("norm") == "bn"]
                    sizes = sorted({c.values["batch_size"] for c in bn})
                    if len(sizes) < 2:
                        continue
                    lo = 2 if 2 in sizes else sizes[0]
                    hi = 32 if 32 in sizes else sizes[-1]
                    d = diff(find(bn, batch_size=lo), find(bn, batch_size=hi))
                    if d is None:
                        continue
                    cfg = sel[0]["config"]
                    width = (cfg.get("model_options") or {}).get("width")
                    setup = (f"{cfg.get('model')}" + (f" width {width}" if width else "")
                             + f", {cfg.get('epochs')} epochs, W = {cfg.get('workers')}")
                    return Penalty(dataset, lo, hi, d[0], d[1], d[2],
                                   f"{db} study {study['name']}", setup)
    return None


# ---------------------------------------------------------------------------------------------
# outputs: CSV, figure, markdown


_COLORS = {"cifar10-jpeg": "tab:red", "cifar10": "tab:red", "fashion-mnist": "tab:blue"}


def _words(name: str) -> str:
    from groupnorm.data import dataset_title

    return dataset_title(name)


def layer_average(rows: list[dict[str, Any]], dataset: str, state: str, n: int,
                  field: str = "mean_error") -> float:
    """The average over layers of one error at one n (NaN when not measured)."""
    vals = [r[field] for r in rows
            if r["dataset"] == dataset and r["model_state"] == state and r["n"] == n]
    return sum(vals) / len(vals) if vals else math.nan


def figure(rows: list[dict[str, Any]], penalties: dict[str, Penalty | None], *,
           evals: list[dict[str, Any]] | None = None, subtitle: str = "") -> Any:
    """The one figure. Top: per-layer mean and variance errors at the smallest n (trained
    solid, init dashed) and the trained models' layer-averaged errors against n. Bottom: the
    trained models' val error when BN uses n-image batch statistics (what the noise does to the
    predictions), and each dataset's BN penalty from the databases beside the paper's."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import (
        FixedLocator,
        FormatStrFormatter,
        MaxNLocator,
        NullFormatter,
        NullLocator,
    )

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    sizes = sorted({r["n"] for r in rows})
    n0 = sizes[0]
    fig = plt.figure(figsize=(15, 9))
    grid = fig.add_gridspec(2, 6)
    a_mean, a_var, a_n = (fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(3))
    a_eval, a_pen = fig.add_subplot(grid[1, 0:3]), fig.add_subplot(grid[1, 3:6])
    for ds in datasets:
        color = _COLORS.get(ds)
        for state, style in (("trained", "-"), ("init", "--")):
            sel = sorted((r for r in rows if r["dataset"] == ds and r["model_state"] == state
                          and r["n"] == n0), key=lambda r: r["layer"])
            if not sel:
                continue
            label = f"{_words(ds)}, {'trained' if state == 'trained' else 'at init'}"
            x = [r["layer"] for r in sel]
            a_mean.plot(x, [r["mean_error"] for r in sel], style, marker="o", ms=3,
                        color=color, label=label)
            a_var.plot(x, [r["var_error"] for r in sel], style, marker="o", ms=3, color=color,
                       label=label)
        for field, marker, what in (("mean_error", "o", "mean"), ("var_error", "s", "variance")):
            ys = [layer_average(rows, ds, "trained", n, field) for n in sizes]
            a_n.plot(sizes, ys, "-", marker=marker, color=color,
                     label=f"{_words(ds)}: batch {what}")
    for ax, what in ((a_mean, "mean: RMS of (μ_B − μ)/σ"),
                     (a_var, "variance: RMS of (σ²_B − σ²)/σ²")):
        ax.set_xlabel("BN layer, from input to output")
        ax.set_ylabel(f"batch {what}")
        ax.set_title(f"Per layer, batches of n = {n0} images", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    def n_axis(ax: Any, xs: list[int]) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(n) for n in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("images per batch n")

    n_axis(a_n, sizes)
    a_n.set_yscale("log")
    # plain numbers on the log axis (0.05, 0.1, 0.2), not powers of ten
    a_n.yaxis.set_major_locator(FixedLocator([0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]))
    a_n.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    a_n.yaxis.set_minor_formatter(NullFormatter())
    a_n.set_ylabel("RMS error, average over layers (log scale)")
    a_n.set_title("Trained models: error against n", fontsize=10)
    a_n.grid(alpha=0.3, which="both")
    a_n.legend(fontsize=8)

    evals = evals or []
    for ds in datasets:
        sel = sorted((e for e in evals if e["dataset"] == ds and e["n"] > 0), key=lambda e: e["n"])
        base = [e["val_error"] for e in evals if e["dataset"] == ds and e["n"] == 0]
        if sel:
            a_eval.plot([e["n"] for e in sel], [e["val_error"] for e in sel], "-o",
                        color=_COLORS.get(ds), label=f"{_words(ds)}: BN with batch statistics")
        if base:
            a_eval.axhline(base[0], color=_COLORS.get(ds), linestyle=":",
                           label=f"{_words(ds)}: BN with running statistics (eval mode)")
    if evals:
        n_axis(a_eval, sizes)
        a_eval.legend(fontsize=8)
    a_eval.set_ylabel("val error (%) of the trained model")
    a_eval.set_title("What the noise does to the predictions: test batches normalized by "
                     "their own statistics", fontsize=10)
    a_eval.grid(alpha=0.3)

    names, vals, errs, notes = [], [], [], []
    for ds in datasets:
        p = penalties.get(ds)
        names.append(_words(ds) + (f"\n{p.setup}" if p else ""))
        vals.append(p.mean if p else 0.0)
        errs.append(p.std if p and p.seeds >= 2 else 0.0)
        notes.append("no database given" if p is None else _fmt_pen(p))
    bars = a_pen.bar(names, vals, yerr=errs, capsize=4,
                     color=[_COLORS.get(ds, "gray") for ds in datasets], alpha=0.8)
    for bar, note, err in zip(bars, notes, errs, strict=True):
        # the number beyond the end of its bar and error bar, on the side the bar points to
        h = bar.get_height()
        a_pen.annotate(note, (bar.get_x() + bar.get_width() / 2, h + (err if h >= 0 else -err)),
                       xytext=(0, 4 if h >= 0 else -4), textcoords="offset points",
                       ha="center", va="bottom" if h >= 0 else "top", fontsize=8,
                       # legible where it crosses the paper's dotted line
                       bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1})
    top = max([11.1, *(v + e for v, e in zip(vals, errs, strict=True))])
    bottom = min([0.0, *(v - e for v, e in zip(vals, errs, strict=True))])
    a_pen.set_ylim(bottom - 0.12 * (top - bottom), top + 0.12 * (top - bottom))
    a_pen.axhline(0, color="black", linewidth=0.8)
    a_pen.axhline(11.1, color="gray", linestyle=":",
                  label="paper: +11.1 (ImageNet, ResNet-50; another scale)")
    los = {p.lo for p in penalties.values() if p}
    his = {p.hi for p in penalties.values() if p}
    lo = los.pop() if len(los) == 1 else "small n"
    hi = his.pop() if len(his) == 1 else "large n"
    a_pen.set_ylabel(f"BN val error at n = {lo} − at n = {hi} (points)")
    a_pen.set_title("BN's small-batch penalty in training (from the results databases)",
                    fontsize=10)
    a_pen.legend(fontsize=8, loc="upper right")
    a_pen.grid(alpha=0.3, axis="y")
    # a question, not "why": whether the noise explains a dataset's penalty is what is measured
    fig.suptitle("Does the data decide BN's small-batch penalty? How far the statistics of n "
                 "images stray from the population's, per BN layer, and what it costs"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    fig.tight_layout()
    return fig


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV that csv_text wrote, with numbers as int or float again (to rebuild the
    summary from the committed files)."""
    def value(text: str) -> Any:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def summary_text(md: str) -> str:
    """The part of batch_noise.md that follows from the data alone (everything before "What
    ran", which names the command, the date and the code version)."""
    return md.split("\n## What ran")[0]


def csv_text(rows: list[dict[str, Any]], fields: Sequence[str] = CSV_FIELDS) -> str:
    """The rows as CSV (floats to 6 significant digits, so the same data gives the same file)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields})
    return buf.getvalue()


def markdown(rows: list[dict[str, Any]], penalties: dict[str, Penalty | None],
             meta: dict[str, Any], *, evals: list[dict[str, Any]] | None = None) -> str:
    """A short paragraph with the headline numbers, a table, and what ran."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    sizes = sorted({r["n"] for r in rows})
    lo, hi = sizes[0], sizes[-1]
    lines = ["# Does the data decide? Batch-statistics noise per BN layer, beside BN's penalty",
             ""]
    layers = {ds: sorted({r["layer"] for r in rows if r["dataset"] == ds}) for ds in datasets}

    def at(ds: str, state: str, n: int, layer: int, field: str = "mean_error") -> float:
        return next((r[field] for r in rows if r["dataset"] == ds and r["model_state"] == state
                     and r["n"] == n and r["layer"] == layer), math.nan)

    if len(datasets) >= 2:
        a, b = datasets[0], datasets[1]
        first, last = layers[a][0], layers[a][-1]
        ma, mb = layer_average(rows, a, "trained", lo), layer_average(rows, b, "trained", lo)
        va = layer_average(rows, a, "trained", lo, "var_error")
        vb = layer_average(rows, b, "trained", lo, "var_error")
        lines += [
            f"At n = {lo}, the batch mean of the trained models' BN layers strays by "
            f"**{ma:.2f} σ on {_words(a)} vs {mb:.2f} σ on {_words(b)}** (average over "
            f"layers; {ma / mb:.1f}×), and the batch variance by {100 * va:.0f} % vs "
            f"{100 * vb:.0f} % of the population's. At the first BN layer: "
            f"{at(a, 'trained', lo, first):.2f} σ vs {at(b, 'trained', lo, first):.2f} σ; at "
            f"the last ({last}): {at(a, 'trained', lo, last):.2f} σ vs "
            f"{at(b, 'trained', lo, last):.2f} σ. At n = {hi}: "
            f"{layer_average(rows, a, 'trained', hi):.2f} σ vs "
            f"{layer_average(rows, b, 'trained', hi):.2f} σ.", ""]
        ev = {(e["dataset"], e["n"]): e["val_error"] for e in evals or []}
        if (a, lo) in ev and (b, lo) in ev and (a, 0) in ev and (b, 0) in ev:
            lines += [f"Normalizing test batches of n = {lo} by their own statistics raises the "
                      f"trained model's val error from {ev[(a, 0)]:.1f} % to {ev[(a, lo)]:.1f} "
                      f"% on {_words(a)} ({ev[(a, lo)] - ev[(a, 0)]:+.1f} points) and from "
                      f"{ev[(b, 0)]:.1f} % to {ev[(b, lo)]:.1f} % on {_words(b)} "
                      f"({ev[(b, lo)] - ev[(b, 0)]:+.1f}); at n = {hi}: "
                      f"{ev.get((a, hi), math.nan) - ev[(a, 0)]:+.1f} vs "
                      f"{ev.get((b, hi), math.nan) - ev[(b, 0)]:+.1f} points.", ""]
        pa, pb = penalties.get(a), penalties.get(b)
        if pa and pb:
            lines += [f"BN's penalty (val error at n = {pa.lo} − at n = {pa.hi}): "
                      f"{_fmt_pen(pa)} on {_words(a)} vs {_fmt_pen(pb)} on {_words(b)} "
                      "(paper, ImageNet: +11.1).", ""]
    lines += ["| dataset | model | mean error n = " + f"{lo} | n = {hi} | variance error n = "
              f"{lo} | n = {hi} | BN penalty (points) |", "|---|---|---|---|---|---|---|"]
    for ds in datasets:
        for state in ("trained", "init"):
            p = penalties.get(ds)
            lines.append(
                f"| {_words(ds)} | {state} | {layer_average(rows, ds, state, lo):.3f} | "
                f"{layer_average(rows, ds, state, hi):.3f} | "
                f"{layer_average(rows, ds, state, lo, 'var_error'):.3f} | "
                f"{layer_average(rows, ds, state, hi, 'var_error'):.3f} | "
                + (_fmt_pen(p) if (p and state == "trained") else "—" if p is None else "")
                + " |")
    lines += ["", "Errors are RMS over batches, averaged over channels and then over the BN "
              "layers; the mean's in units of the population's std, the variance's relative "
              "to the population's variance (batch_noise.csv has every layer and n, and the "
              "i.i.d. reference 1/√(n·positions)); batch_noise_eval.csv has the trained "
              "models' val error with the statistics of n-image test batches (n = 0: with "
              "the running statistics).", "", "## What ran", ""]
    lines += [f"- command: `{meta.get('command', '?')}`",
              f"- code {meta.get('code_version', '?')}, torch {meta.get('torch_version', '?')}, "
              f"{meta.get('device', '?')}, {meta.get('date', '?')} (UTC)",
              f"- population: {meta.get('population')} training images per dataset (a fixed "
              f"class-balanced subset, seed {meta.get('seed')}), at least "
              f"{meta.get('draws')} batches per n"]
    for m in meta.get("models", []):
        lines.append(f"- {_words(m['dataset'])}: {m['setup']}; trained val error "
                     f"{m['val_error']:.2f} % ({m['folder']})")
    for ds in datasets:
        p = penalties.get(ds)
        lines.append(f"- BN penalty on {_words(ds)}: " + (
            f"{p.source} ({p.setup})" if p else "no database with a BN batch-size study on it "
            "was given"))
    return "\n".join(lines) + "\n"


def _model_record(cfg: Any, folder: str | Path, summary: dict[str, Any]) -> dict[str, Any]:
    width = cfg.model_options.get("width")
    return {"dataset": cfg.dataset, "folder": str(folder),
            "val_error": float(summary.get("final_val_error", math.nan)),
            "setup": (f"{cfg.model}" + (f" width {width}" if width else "")
                      + f" with {cfg.norm.upper()}, trained {cfg.epochs} epochs at n = "
                      f"{cfg.batch_size}, W = {cfg.workers}, on {cfg.train_size} images")}


def _fmt_pen(p: Penalty) -> str:
    spread = f" ± {p.std:.1f}" if p.seeds >= 2 else ""
    return f"{p.mean:+.1f}{spread} ({p.seeds} seed{'s' if p.seeds != 1 else ''})"


def check_request(sizes: Sequence[int], population_size: int, draws: int,
                  run_dirs: Sequence[str | Path] = (), dbs: Sequence[str | Path] = ()) -> None:
    """Refuse a bad request before anything is trained or measured: raise ConfigError naming
    the value and the fix."""
    from groupnorm.experiments.config import ConfigError

    if isinstance(population_size, bool) or not isinstance(population_size, int) or \
            population_size < 2:
        raise ConfigError(f"population={population_size!r}: must be an integer >= 2 (e.g. "
                          "--population 5000)")
    if not sizes:
        raise ConfigError("no batch sizes given: pass e.g. --sizes 2,4,8,16,32")
    bad = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise ConfigError(f"batch sizes {bad}: each n must be an integer >= 1 (e.g. --sizes "
                          "2,4,8,16,32)")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"batch sizes {list(sizes)} repeat a value; give each n once")
    big = [n for n in sizes if n > population_size]
    if big:
        raise ConfigError(f"batch sizes {big} exceed the population of {population_size} "
                          "images; raise --population or drop them")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"draws={draws!r}: must be an integer >= 1 (e.g. --draws 2000)")
    for folder in run_dirs:
        missing = [f for f in ("config.json", "run.json", "checkpoint.pt")
                   if not (Path(folder) / f).is_file()]
        if missing:
            raise ConfigError(f"run folder {folder} lacks {', '.join(missing)}: give a folder "
                              "written by `groupnorm train --keep-checkpoint --out DIR`")
    for db in dbs:
        if not Path(db).is_file():
            raise ConfigError(f"results database {db} does not exist; give a database written "
                              "by `groupnorm sweep` (e.g. results/batch-noise/runs.db)")


def run_batch_noise(run_dirs: Sequence[str | Path], out: str | Path, *,
                    dbs: Sequence[str | Path] = (), sizes: Sequence[int] = SIZES,
                    population_size: int = 5000, draws: int = 2000, seed: int = 0,
                    command: str = "", progress: bool = True,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """Measure each run folder's trained model and its init, look up each dataset's BN penalty
    in `dbs`, and write into `out`: batch_noise.csv (every layer and n), batch_noise_eval.csv
    (the trained models' val error with n-image batch statistics), batch_noise.png and
    batch_noise.md. A tqdm bar over the steps on a terminal (`progress`), else a log line each.

    Raises ConfigError for a bad request (checked before any measuring) and ValueError for two
    run folders of one dataset or a population larger than a run's training set.
    """
    from groupnorm.experiments import runtime

    sizes = list(sizes)
    check_request(sizes, population_size, draws, run_dirs, dbs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    models = []
    steps = ("population", "trained model", "model at init", "predictions")
    bar = runtime.Progress(len(run_dirs) * len(steps), "batch-noise", progress)
    t0 = time.perf_counter()

    def step(what: str) -> None:
        bar.update()
        if bar.bar is None:
            log(f"  batch-noise: {what} [{time.perf_counter() - t0:.0f}s]")

    try:
        for folder in run_dirs:
            cfg, trained, init, summary = load_run(folder)
            if any(m["dataset"] == cfg.dataset for m in models):
                raise ValueError(f"two run folders of dataset {cfg.dataset} were given; pass "
                                 "one per dataset")
            images = population(cfg, population_size, seed)
            step(f"{cfg.dataset}: population of {len(images)} images")
            for state, model in (("trained", trained), ("init", init)):
                for r in measure_model(model, images, sizes, draws=draws, seed=seed):
                    rows.append({"dataset": cfg.dataset, "model_state": state, **r})
                step(f"{cfg.dataset}: {state} model measured")
            vx, vy = validation(cfg)
            for n, err in error_with_batch_stats(trained, vx, vy, sizes, seed=seed).items():
                evals.append({"dataset": cfg.dataset, "n": n, "val_error": err,
                              "images": len(vy) // n * n if n else len(vy)})
            step(f"{cfg.dataset}: predictions with n-image batch statistics")
            models.append(_model_record(cfg, folder, summary))
    finally:
        bar.close()
    meta = {"command": command, "code_version": runtime.code_version(),
            "torch_version": torch.__version__, "device": runtime.device_description("cpu"),
            "date": runtime.utc_now(), "population": population_size, "draws": draws,
            "seed": seed, "models": models}
    (out / "batch_noise.csv").write_text(csv_text(rows), encoding="utf-8")
    (out / "batch_noise_eval.csv").write_text(csv_text(evals, EVAL_FIELDS), encoding="utf-8")
    (out / "batch_noise_meta.json").write_text(json.dumps(meta, indent=2) + "\n",
                                               encoding="utf-8")
    return render(out, dbs)


def render(out: str | Path, dbs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Draw batch_noise.png and write batch_noise.md from a folder's measurement
    (batch_noise.csv, batch_noise_eval.csv, batch_noise_meta.json) and each dataset's BN penalty
    in `dbs`: cheap, so a figure follows a database that gained runs without measuring again
    (`groupnorm batch-noise --replot DIR`)."""
    from groupnorm.experiments.config import ConfigError

    out = Path(out)
    paths = {"csv": out / "batch_noise.csv", "eval_csv": out / "batch_noise_eval.csv",
             "meta": out / "batch_noise_meta.json", "png": out / "batch_noise.png",
             "md": out / "batch_noise.md"}
    missing = [str(paths[k]) for k in ("csv", "eval_csv", "meta") if not paths[k].is_file()]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found: measure first with `groupnorm "
                          f"batch-noise --run FOLDER ... -o {out}`")
    check_request([2], 2, 1, (), dbs)  # the databases exist
    rows, evals = read_csv(paths["csv"]), read_csv(paths["eval_csv"])
    meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
    models = meta.get("models", [])
    penalties = {ds: bn_penalty(dbs, ds) for ds in dict.fromkeys(r["dataset"] for r in rows)}
    first = models[0]["setup"].split(" with ")[0] if models else ""
    same_net = len({m["setup"].split(" on ")[0] for m in models}) == 1
    subtitle = ((f"{first} with BN on every dataset" if same_net else "models differ per "
                 "dataset (see batch_noise.md)")
                + f"; trained (solid) and at init (dashed); population: "
                f"{meta.get('population')} training images")
    fig = figure(rows, penalties, evals=evals, subtitle=subtitle)
    fig.savefig(paths["png"], dpi=110, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    paths["md"].write_text(markdown(rows, penalties, meta, evals=evals), encoding="utf-8")
    return paths
