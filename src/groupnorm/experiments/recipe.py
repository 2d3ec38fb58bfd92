"""What a config means: its norm, data, model, optimizer and schedule (the paper's protocol).

Protocol (Wu & He 2018, Sec. 5.1), as implemented here:
- LR = lr * n / ref_batch for n images per worker (linear scaling), momentum 0.9, weight decay on
  every parameter including gamma and beta (``wd_norm``), LR / 10 at fixed fractions of training
  (30/60/90 %), the same number of epochs for every batch size.
- Virtual workers: one optimizer step takes W * n images while every batch-statistics norm
  computes its statistics per chunk of n (``groupnorm.set_virtual_batch``) -- BN on W GPUs with n
  images each, on one process. GN, LN and IN never look across samples, so W does not change them.
- An optional pretraining phase at a large batch, then training at n (the fine-tuning study).

The norm setting is resolved once, into a :class:`NormSpec` that the model is built from and that
the report names. :func:`check` builds a config's norm and model dry (on the meta device, no
memory, no data) and checks its dataset name and options and its device: the sweep calls it for
every grid point before anything is queued.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .runtime import check_device

# ---------------------------------------------------------------------------------------------
# the norm

_NORM_LABELS = {"bn": "BN", "gn": "GN", "ln": "LN", "in": "IN", "brn": "BR", "syncbn": "SyncBN",
                "none": "none"}


def norm_label(norm: Any) -> str:
    """Display name of a norm setting (bn -> BN, gn+ws -> GN+WS); unknown names as they are."""
    from groupnorm import split_ws

    kind, ws = split_ws(str(norm))
    if kind not in _NORM_LABELS:
        return str(norm)
    return _NORM_LABELS[kind] + ("+WS" if ws else "")


@dataclass(frozen=True)
class NormSpec:
    """A run's normalization, resolved once from the config's `norm` and `norm_options`."""

    kind: str  # a groupnorm.NORM_KINDS name: bn, gn, ln, in, brn, syncbn, none
    ws: bool  # Weight-Standardized convolutions (the "+ws" suffix)
    options: tuple[tuple[str, Any], ...]  # the norm_options this kind takes, sorted

    @classmethod
    def resolve(cls, norm: str, options: dict[str, Any]) -> NormSpec:
        """Check the norm name and its options; keep the options this kind takes.

        One preset may set ``norm_options.num_groups`` for every run of a BN-vs-GN grid: an
        option that another kind of the family takes is dropped for this one (the config and its
        hash keep it). An option that no kind takes is a typo, and an error.
        """
        from groupnorm import NORM_KINDS, get_norm_layer, split_ws

        kind, ws = split_ws(norm)
        try:  # a kind name, an alias (groupnorm) or a registered kind
            mine = get_norm_layer(kind, strict=False, **options).keywords
        except ValueError:
            raise ConfigError(f"norm={norm!r}: unknown norm; choose one of "
                              f"{', '.join(NORM_KINDS)}, optionally with '+ws' (e.g. norm=gn)"
                              + _did_you_mean(kind, NORM_KINDS)) from None
        taken = set(mine).union(*(get_norm_layer(k, strict=False, **options).keywords
                                  for k in NORM_KINDS))
        unknown = sorted(set(options) - taken)
        if unknown:
            raise ConfigError(
                f"norm_options={options!r}: no norm takes {unknown}; the options are "
                f"{', '.join(sorted(_all_norm_options()))}" + _did_you_mean(unknown[0],
                                                                              _all_norm_options()))
        return cls(kind, ws, tuple(sorted(mine.items())))

    @property
    def name(self) -> str:
        """The setting as models take it: "gn", "gn+ws"."""
        return self.kind + ("+ws" if self.ws else "")

    @property
    def label(self) -> str:
        """The report's name for it: "GN", "GN+WS"."""
        return norm_label(self.name)

    @property
    def batch_stats(self) -> bool:
        """Whether the norm looks across the samples of a batch (so W x n matters)."""
        return self.kind in ("bn", "brn", "syncbn")


def _all_norm_options() -> set[str]:
    """Every keyword option some kind of the family takes (for the error message)."""
    import inspect

    from groupnorm import NORM_KINDS, get_norm_layer

    out: set[str] = set()
    for kind in NORM_KINDS:
        builder = get_norm_layer(kind).func
        out |= {p.name for p in inspect.signature(builder).parameters.values()
                if p.kind is p.KEYWORD_ONLY}
    return out - {"device", "dtype"}


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# data and model


@dataclass
class Data:
    """A run's datasets: fixed subsets drawn with data_seed (the same for every run), and the
    identity of the files they were read from."""

    train: Any  # groupnorm.data.ImageDataset
    val: Any  # the reported number's val set
    curve: Any  # the fixed val subset of the epochs before the last report_last; None: val
    # [{"path", "size", "sha256"}] of every file read, sorted; [] for generated data; None when
    # the dataset does not say (a reader without a `files` record)
    files: list[dict[str, Any]] | None


def load_data(cfg: TrainConfig) -> Data:
    """(train, val, curve) datasets of a config, and the files they came from."""
    from groupnorm import data

    train = data.load_dataset(cfg.dataset, "train", **cfg.dataset_options)
    loaded = [train]
    if cfg.val_split == "train":
        assert cfg.val_size is not None  # TrainConfig checks it
        train, val = data.train_val_split(train, cfg.val_size, seed=cfg.data_seed)
    else:
        val = data.load_dataset(cfg.dataset, "test", **cfg.dataset_options)
        loaded.append(val)
        if cfg.val_size and cfg.val_size < len(val.labels):
            val = data.subset(val, cfg.val_size, seed=cfg.data_seed)
    if cfg.train_size and cfg.train_size < len(train.labels):
        train = data.subset(train, cfg.train_size, seed=cfg.data_seed)
    curve = None
    if cfg.val_curve_size and cfg.val_curve_size < len(val.labels):
        curve = data.subset(val, cfg.val_curve_size, seed=cfg.data_seed)
    return Data(train, val, curve, data_files(*loaded))


def data_files(*datasets: Any) -> list[dict[str, Any]] | None:
    """The identity (path, size, SHA-256) of the files loaded datasets were read from, sorted
    and without repeats: [] for generated data, None if a dataset does not say. Read from each
    dataset's ``files``: (path, size, sha256) records (before any subset is cut from it)."""
    if any(getattr(ds, "files", None) is None for ds in datasets):
        return None
    records = {tuple(f)[:3] for ds in datasets for f in ds.files}
    return [dict(zip(("path", "size", "sha256"), r, strict=True)) for r in sorted(records)]


def build_model(cfg: TrainConfig, norm: NormSpec, in_channels: int, num_classes: int
                ) -> nn.Module:
    """The configured model for the data's channels and classes, with the resolved norm, in
    channels-last format when the config says so (channels_last_3d for a video model)."""
    from groupnorm import models

    model = models.create_model(cfg.model, num_classes, in_channels=in_channels,
                                norm=norm.name, zero_init_residual=cfg.zero_init_residual,
                                **cfg.model_options, **dict(norm.options))
    if cfg.channels_last:
        check_channels_last(cfg, model)
        video = any(isinstance(m, nn.Conv3d) for m in model.modules())
        model = model.to(memory_format=torch.channels_last_3d if video
                         else torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------------
# optimizer and schedule


@dataclass(frozen=True)
class Phase:
    """A stretch of training with one batch size and one optimizer/schedule (pretrain, train)."""

    name: str  # pretrain | train
    first_epoch: int  # 1-based global epoch at which the phase starts
    epochs: int  # number of epochs in the phase
    batch_size: int  # n (images per worker)
    lr: float  # LR after batch-size scaling

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1


def phases(cfg: TrainConfig) -> list[Phase]:
    """The run's phases: optional pretraining at a large batch, then training at cfg.batch_size."""
    out = []
    if cfg.pretrain_epochs > 0:
        out.append(Phase("pretrain", 1, cfg.pretrain_epochs, cfg.pretrain_batch_size,
                         cfg.step_lr("pretrain")))
    out.append(Phase("train", cfg.pretrain_epochs + 1, cfg.epochs, cfg.batch_size,
                     cfg.step_lr("train")))
    return out


def lr_multiplier(cfg: TrainConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """LR factor at optimizer step `step` (0-based) of a phase: warm-up times the schedule.

    Step decay happens at epoch boundaries, at round(fraction * epochs) (paper: 30, 60, 90 of 100).
    """
    total = max(1, steps_per_epoch * epochs)
    epoch = step // max(1, steps_per_epoch)
    if cfg.schedule == "step":
        bounds = [round(m * epochs) for m in cfg.milestones]
        factor = cfg.lr_decay ** sum(epoch >= b for b in bounds if b > 0)
    elif cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    else:
        factor = 1.0
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        factor *= cfg.warmup_factor + (1.0 - cfg.warmup_factor) * step / warm
    return factor


def param_groups(model: nn.Module, weight_decay: float, wd_norm: bool) -> list[dict[str, Any]]:
    """Parameter groups: with wd_norm False, 1-d parameters (gamma, beta, biases) get no decay."""
    if wd_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer over the model's parameters."""
    groups = param_groups(model, cfg.weight_decay, cfg.wd_norm)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, phase: Phase,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The phase's LR schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(cfg, s, steps_per_epoch, phase.epochs))


# ---------------------------------------------------------------------------------------------
# the dry check


def check(cfg: TrainConfig) -> NormSpec:
    """Check what a config names before any run is queued; raise ConfigError with the fix.

    The norm and its options, the model name and options (the model is built on the meta
    device, so a group count that does not divide a layer's channels shows here), the dataset
    name and options, and the device. Data-dependent limits (a training set smaller than one
    step) are checked when the run loads its data.
    """
    from groupnorm import data, models

    norm = NormSpec.resolve(cfg.norm, cfg.norm_options)
    names = models.list_models()
    if cfg.model not in names:
        raise ConfigError(f"model={cfg.model!r}: unknown model; choose one of {', '.join(names)}"
                          + _did_you_mean(cfg.model, names))
    datasets = data.list_datasets()
    if cfg.dataset not in datasets:
        raise ConfigError(f"dataset={cfg.dataset!r}: unknown dataset; choose one of "
                          f"{', '.join(datasets)}" + _did_you_mean(cfg.dataset, datasets))
    accepted = _dataset_options(cfg.dataset)
    unknown = sorted(set(cfg.dataset_options) - (accepted or set(cfg.dataset_options)))
    if unknown:
        raise ConfigError(f"dataset_options={cfg.dataset_options!r}: dataset {cfg.dataset!r} "
                          f"takes {sorted(accepted or ()) or 'no options'}, not {unknown}")
    check_device(cfg.device)
    try:
        with torch.device("meta"):
            build_model(cfg, norm, in_channels=3, num_classes=10)
    except (ValueError, TypeError) as exc:
        opts = f" {dict(norm.options)}" if norm.options else ""
        raise ConfigError(f"model={cfg.model!r} {cfg.model_options or ''} with norm="
                          f"{norm.name!r}{opts}: {exc}") from None
    return norm


def check_channels_last(cfg: TrainConfig, model: nn.Module) -> None:
    """Refuse a channels-last CPU run through a convolution that torch's CPU kernel breaks.

    torch 2.13.0+cpu (oneDNN): the backward of a strided 1x1 Conv2d on channels-last input
    with 2 to 7 input channels corrupts the heap ("double free or corruption", a segfault or a
    bus error, 2026-11-30); 8 or more channels compute the float64 reference's gradients. The
    CIFAR ResNets' projection shortcuts are such convolutions when width < 8.
    """
    if not cfg.channels_last or not cfg.device.startswith("cpu"):
        return
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                and m.in_channels < 8):
            raise ConfigError(
                f"channels_last=true with model={cfg.model!r} {cfg.model_options or ''}: its "
                f"layer {name} is a strided 1x1 convolution over {m.in_channels} channels, whose "
                "channels-last backward corrupts memory in torch's CPU kernel (fewer than 8 "
                "input channels); use a width of at least 8 or channels_last=false")


def _dataset_options(name: str) -> set[str] | None:
    """The options load_dataset takes for `name` (None: this check cannot tell)."""
    from groupnorm import data

    public = getattr(data, "dataset_options", None)
    if public is not None:
        return set(public(name))
    # until groupnorm.data says so publicly, its catalog entry does
    spec = getattr(getattr(data, "catalog", None), "_CATALOG", {}).get(name)
    return None if spec is None else set(spec.options)
