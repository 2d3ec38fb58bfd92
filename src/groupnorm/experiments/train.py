"""One training run with the paper's protocol: SGD, linear LR scaling, step decay, virtual workers.

Protocol (Wu & He 2018, Sec. 5.1), as implemented here:
- LR = lr * n / ref_batch for n images per worker (linear scaling), momentum 0.9, weight decay on
  every parameter including gamma and beta (``wd_norm``), LR / 10 at fixed fractions of training
  (30/60/90 %), the same number of epochs for every batch size.
- Virtual workers: one optimizer step takes W * n images while every batch-statistics norm
  computes its statistics per chunk of n (``groupnorm.set_virtual_batch``) -- BN on W GPUs with n
  images each, on one process. GN, LN and IN never look across samples, so W does not change them.
- Reported number: median val error of the last ``report_last`` epochs, plus the final one.
- Under ``torchrun`` the run is data-parallel (DDP; gloo on CPU, nccl on CUDA): each rank's batch
  is W * n, BN statistics stay per rank (not synced, as in the paper), only rank 0 records.

Resumability: after every epoch the caller's ``on_epoch`` hook records the epoch, then a checkpoint
(model, optimizer, scheduler, RNG states) is written atomically. Given the same device, a resumed
run ends with the same numbers as an uninterrupted one, because every source of randomness (init,
loader order, augmentation) is seeded from (seed, epoch) or restored from the checkpoint.
"""

from __future__ import annotations

import io
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig

EpochHook = Callable[[int, dict[str, Any]], None]


@dataclass
class Phase:
    """A stretch of training with one batch size and one optimizer/schedule (pretrain, train)."""

    name: str  # pretrain | train
    first_epoch: int  # 1-based global epoch at which the phase starts
    epochs: int  # number of epochs in the phase
    batch_size: int  # n (images per worker)
    lr: float  # LR after batch-size scaling


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


# ---------------------------------------------------------------------------------------------
# data and model


def load_data(cfg: TrainConfig) -> tuple[Any, Any]:
    """(train, val) ImageDatasets: fixed subsets drawn with data_seed, the same for every run."""
    from groupnorm import data

    train = data.load_dataset(cfg.dataset, "train", **cfg.dataset_options)
    if cfg.val_split == "train":
        if not cfg.val_size:
            raise ValueError("val_split='train' needs val_size (the number of held-out images)")
        train, val = data.train_val_split(train, cfg.val_size, seed=cfg.data_seed)
    else:
        val = data.load_dataset(cfg.dataset, "test", **cfg.dataset_options)
        if cfg.val_size and cfg.val_size < len(val.labels):
            val = data.subset(val, cfg.val_size, seed=cfg.data_seed)
    if cfg.train_size and cfg.train_size < len(train.labels):
        train = data.subset(train, cfg.train_size, seed=cfg.data_seed)
    return train, val


def build_model(cfg: TrainConfig, train_set: Any) -> nn.Module:
    """The configured model for the dataset's channels and classes."""
    from groupnorm import models

    return models.create_model(
        cfg.model,
        train_set.num_classes,
        in_channels=int(train_set.images.shape[1]),
        norm=cfg.norm,
        zero_init_residual=cfg.zero_init_residual,
        **cfg.model_options,
        **applicable_norm_options(cfg.norm, cfg.norm_options),
    )


def applicable_norm_options(norm: str, options: dict[str, Any]) -> dict[str, Any]:
    """The norm options that `norm` takes: a study's GN options (num_groups) do not reach BN.

    One preset can then set norm_options.num_groups for every run of a BN-vs-GN grid; the config
    (and its hash) keeps them, the model only gets what its norm accepts.
    """
    from groupnorm import get_norm_layer, split_ws

    if not options:
        return {}
    kind, _ = split_ws(norm)
    return dict(get_norm_layer(kind, strict=False, **options).keywords)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a run draws from, for the checkpoint."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_CRASH_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook: die as a SIGKILL would at a named point of the run's bookkeeping.

    With ``GROUPNORM_CRASH_AT=<name>[:<k>]`` the process exits (status 137, no cleanup) the k-th
    time (default 1) it reaches point ``name``: ``epoch_row`` (after an epoch's row is
    recorded, before its checkpoint), ``checkpoint_write`` (halfway through writing the
    checkpoint file) and ``finish`` (after the run is marked done, before its checkpoint is
    deleted). The crash-safety tests use it to hit the windows a random kill rarely finds.
    """
    spec = os.environ.get("GROUPNORM_CRASH_AT")
    if not spec or spec.partition(":")[0] != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] == int(spec.partition(":")[2] or 1):
        os._exit(137)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically: temp file in the same folder, fsync, os.replace.

    A kill at any moment leaves either the previous checkpoint or the new one, never a partial
    file under ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        crash_point("checkpoint_write")
        f.write(data[len(data) // 2:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# distributed


@dataclass
class Dist:
    """This process's place in a torchrun job (world_size 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local)


def resolve_device(device: str, d: Dist) -> torch.device:
    """The torch device; under torchrun, plain "cuda" means this rank's local GPU."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but CUDA is not available; use --device cpu")
        if device == "cuda" and d.enabled:
            device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(torch.device(device))
    return torch.device(device)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class RunResult:
    """What a finished run hands back: per-epoch metrics, the summary and the time breakdown."""

    epochs: list[dict[str, Any]]
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device) -> tuple[float, float]:
    """(mean loss, error %) of the model in eval mode over a loader."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        wrong += (out.argmax(1) != y).sum()
        count += y.numel()
    return float(loss_sum) / max(count, 1), 100.0 * float(wrong) / max(count, 1)


def summarize(epoch_rows: list[dict[str, Any]], report_last: int) -> dict[str, Any]:
    """Summary metrics from the epoch rows of the final phase (median of the last k, paper)."""
    final_phase = [r for r in epoch_rows if r["phase"] == epoch_rows[-1]["phase"]]
    last = [r["val_error"] for r in final_phase[-report_last:]]
    return {
        "median_val_error": statistics.median(last),
        "final_val_error": epoch_rows[-1]["val_error"],
        "best_val_error": min(r["val_error"] for r in final_phase),
        "final_train_error": epoch_rows[-1]["train_error"],
        "images_per_s": statistics.fmean(r["images_per_s"] for r in epoch_rows),
    }


class _Progress:
    """A tqdm bar over an epoch's steps on a terminal; elsewhere nothing (the run logs a plain
    line per epoch instead)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    cfg: TrainConfig,
    *,
    checkpoint_path: str | Path | None = None,
    on_epoch: EpochHook | None = None,
    on_resume: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> RunResult:
    """Train one configuration; record each epoch through `on_epoch`, resume from a checkpoint.

    Args:
        cfg: the run's configuration.
        checkpoint_path: where to keep the last-epoch checkpoint; if it exists, training
            continues after its epoch (and `on_resume(epoch)` is called first so the caller can
            drop records of later epochs). None: no checkpointing.
        on_epoch: called as on_epoch(epoch, metrics) after every epoch, before the checkpoint
            is written (rank 0 only under torchrun).
        log: line logger (None: silent).
    """
    t_start = time.perf_counter()
    d = init_distributed(cfg.device)
    device = resolve_device(cfg.device, d)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
    say = log if (log is not None and d.is_main) else (lambda _msg: None)

    from groupnorm import data as gdata
    from groupnorm import set_virtual_batch, split_ws

    if split_ws(cfg.norm)[0] == "syncbn" and not d.enabled:
        say("note: norm=syncbn in a single process is BN (there are no other ranks to sync "
            "with); run it under torchrun to sync the statistics across processes")
    train_set, val_set = load_data(cfg)
    seed_everything(cfg.seed)
    model = build_model(cfg, train_set).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    val_loader = gdata.Loader(val_set, cfg.eval_batch_size, shuffle=False, augment=False,
                              drop_last=False, seed=0, device=str(device))

    plan = phases(cfg)
    total_epochs = plan[-1].first_epoch + plan[-1].epochs - 1
    done_epochs = 0
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    ckpt: dict[str, Any] | None = None
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt.get("config_hash") != cfg.config_hash():
            raise RuntimeError(
                f"checkpoint {ckpt_path} belongs to config {ckpt.get('config_hash')}, not "
                f"{cfg.config_hash()}; delete it to start this run afresh"
            )
        model.load_state_dict(ckpt["model"])
        set_rng_state(ckpt["rng"])
        done_epochs = int(ckpt["epoch"])
        say(f"resuming from epoch {done_epochs} ({ckpt_path})")
    if on_resume is not None and d.is_main:
        on_resume(done_epochs)

    rows: list[dict[str, Any]] = list(ckpt["rows"]) if ckpt else []
    timings = {"data_s": 0.0, "step_s": 0.0, "eval_s": 0.0, "log_s": 0.0, "steps": 0}
    for phase in plan:
        last_epoch = phase.first_epoch + phase.epochs - 1
        if done_epochs >= last_epoch or phase.epochs == 0:
            continue
        n = phase.batch_size
        # virtual workers: W chunks of n per step (None when W == 1: plain batch statistics)
        set_virtual_batch(model, n if cfg.workers > 1 else None)
        loader = gdata.Loader(train_set, cfg.workers * n, shuffle=True, augment=cfg.augment,
                              drop_last=True, seed=cfg.seed, device=str(device), rank=d.rank,
                              world_size=d.world_size)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(train_set.labels)} images over {d.world_size} ranks) is "
                f"smaller than one step of workers*batch_size = {cfg.workers}*{n}; lower them "
                "or raise train_size"
            )
        optimizer = make_optimizer(cfg, model, phase.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s, spe=steps_per_epoch, ep=phase.epochs: lr_multiplier(cfg, s, spe, ep),
        )
        if ckpt is not None and ckpt["phase"] == phase.name and done_epochs > phase.first_epoch - 1:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        start = max(phase.first_epoch, done_epochs + 1)
        for epoch in range(start, last_epoch + 1):
            row = _train_epoch(net, model, loader, val_loader, optimizer, scheduler, epoch,
                               phase, total_epochs, device, d, cfg, timings)
            rows.append(row)
            t_log = time.perf_counter()
            if d.is_main:
                if on_epoch is not None:
                    on_epoch(epoch, row)
                crash_point("epoch_row")
                say(
                    f"epoch {epoch}/{total_epochs} [{phase.name} n={n} W={cfg.workers}] "
                    f"train {row['train_loss']:.4f}/{row['train_error']:.2f}% "
                    f"val {row['val_loss']:.4f}/{row['val_error']:.2f}% "
                    f"lr {row['lr']:.4g} {row['images_per_s']:.0f} img/s"
                )
                if ckpt_path is not None:
                    save_checkpoint(ckpt_path, {
                        "config_hash": cfg.config_hash(),
                        "epoch": epoch,
                        "phase": phase.name,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(),
                        "rows": rows,
                    })
            if d.enabled:
                torch.distributed.barrier()
            timings["log_s"] += time.perf_counter() - t_log
            done_epochs = epoch
        ckpt = None  # the next phase starts with a fresh optimizer
    timings["total_s"] = time.perf_counter() - t_start
    summary = summarize(rows, cfg.report_last)
    summary["num_params"] = num_params
    summary["train_seconds"] = timings["total_s"]
    return RunResult(epochs=rows, summary=summary, timings=timings)


def _train_epoch(net: nn.Module, model: nn.Module, loader: Any, val_loader: Any,
                 optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, phase: Phase,
                 total_epochs: int, device: torch.device, d: Dist, cfg: TrainConfig,
                 timings: dict[str, float]) -> dict[str, Any]:
    """One epoch of training plus evaluation; returns the epoch's metrics row."""
    net.train()
    loader.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    data_s = step_s = 0.0
    lr = optimizer.param_groups[0]["lr"]
    bar = _Progress(len(loader), f"epoch {epoch}/{total_epochs}", cfg.progress and d.is_main)
    t0 = time.perf_counter()
    t_data = t0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t_step = time.perf_counter()
        data_s += t_step - t_data
        out = net(x)
        loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the LR this step used (before the schedule moves)
        scheduler.step()
        loss_sum += loss.detach().double() * y.numel()
        wrong += (out.detach().argmax(1) != y).sum()
        seen += y.numel()
        t_data = time.perf_counter()
        step_s += t_data - t_step
        bar.update(1)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.perf_counter() - t0
    if d.enabled:
        totals = torch.stack([loss_sum, wrong.double(), torch.tensor(float(seen), device=device,
                                                                     dtype=torch.float64)])
        torch.distributed.all_reduce(totals)
        loss_sum, wrong_f, seen_f = totals
        wrong, seen = wrong_f, int(seen_f)
    t_eval = time.perf_counter()
    if d.is_main:
        val_loss, val_error = evaluate(model, val_loader, device)
    else:
        val_loss, val_error = float("nan"), float("nan")
    eval_s = time.perf_counter() - t_eval
    timings["data_s"] += data_s
    timings["step_s"] += step_s
    timings["eval_s"] += eval_s
    timings["steps"] += len(loader)
    return {
        "phase": phase.name,
        "lr": lr,
        "train_loss": float(loss_sum) / max(seen, 1),
        "train_error": 100.0 * float(wrong) / max(seen, 1),
        "val_loss": val_loss,
        "val_error": val_error,
        "images_per_s": seen / max(train_time, 1e-9),
        "epoch_seconds": train_time + eval_s,
        "data_seconds": data_s,
        "step_seconds": step_s,
        "eval_seconds": eval_s,
    }
