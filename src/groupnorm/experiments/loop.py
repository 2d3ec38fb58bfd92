"""The training loop: one run, epoch by epoch, reported to a Recorder, resumable.

What is trained (data, model, optimizer, schedule) comes from recipe.py; the machine (device,
torchrun, threads, RNG, checkpoint files) from runtime.py; where the numbers go is the
:class:`~groupnorm.experiments.recorder.Recorder` the caller passes.

Resuming: after every epoch the recorder gets the epoch's row, *then* a checkpoint (model,
optimizer, scheduler, RNG states, the rows so far) is written atomically. A run that finds a
checkpoint resumes from it only if the checkpoint is intact (content hash), belongs to this
config and to this recorder (a results database or run folder, by id), was written for the same
data files, and its rows are exactly the first rows the recorder holds; else the checkpoint is
discarded with a warning naming the file and the run starts again. Given the same device and
thread count, a resumed run ends with the numbers of an uninterrupted one: every source of
randomness (init, loader order, augmentation) is seeded from (seed, epoch) or restored.

Under ``torchrun`` the run is data-parallel (DDP; gloo on CPU, nccl on CUDA): each rank's batch
is W * n, BN statistics stay per rank (not synced, as in the paper), only rank 0 records, and
rank 0's resume decision is every rank's.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from .config import ConfigError, TrainConfig
from .recipe import NormSpec, build_model, load_data, make_optimizer, make_scheduler, phases
from .recorder import MemoryRecorder, Recorder, RunInfo, RunResult, same_rows


class CheckpointDiscarded(UserWarning):
    """A checkpoint was found but not resumed (the warning says which file and why)."""


def train(cfg: TrainConfig, recorder: Recorder | None = None, *,
          checkpoint: str | Path | None = None, keep_checkpoint: bool = False,
          log: Callable[[str], None] | None = print) -> RunResult:
    """Train one configuration, reporting to `recorder`; resume from `checkpoint` if it holds one.

    Args:
        cfg: the run's configuration.
        recorder: where epochs and the summary go (default: a MemoryRecorder). Under torchrun
            only rank 0's is used.
        checkpoint: the run's checkpoint file (None: no checkpointing). Deleted when the run is
            done unless keep_checkpoint.
        log: line logger (None: silent).
    """
    t_start = time.perf_counter()
    d = runtime.init_distributed(cfg.device)
    device = runtime.resolve_device(cfg.device, d)
    runtime.configure_torch(cfg.num_threads, cfg.deterministic, device)
    say = log if (log is not None and d.is_main) else (lambda _msg: None)
    rec: Recorder = recorder if recorder is not None else MemoryRecorder()

    import groupnorm
    from groupnorm import data as gdata

    norm = NormSpec.resolve(cfg.norm, cfg.norm_options)
    if norm.kind == "syncbn" and not d.enabled:
        say("note: norm=syncbn in a single process is BN (there are no other ranks to sync "
            "with); run it under torchrun to sync the statistics across processes")
    data = load_data(cfg)
    runtime.seed_everything(cfg.seed)
    model = build_model(cfg, norm, int(data.train.images.shape[1]), data.train.num_classes)
    model = model.to(device)  # keeps the memory format build_model gave it
    num_params = sum(p.numel() for p in model.parameters())
    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    val_loaders = [gdata.Loader(ds, cfg.eval_batch_size, shuffle=False, device=str(device),
                                channels_last=cfg.channels_last) for ds in (data.val, data.curve)
                   if ds is not None]

    path = Path(checkpoint) if checkpoint is not None else None
    key = runtime.CheckpointKey(cfg.config_hash(),
                                runtime.from_main(d, rec.record_id if d.is_main else None))
    done, ckpt = _resume(path, key, data.files, rec, device, d)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        runtime.set_rng_state(ckpt["rng"])
        say(f"resuming from epoch {done} ({path})")
    if d.is_main:
        rec.start(RunInfo(data_files=data.files, num_params=num_params))

    plan = phases(cfg)
    epochs = _Epochs(cfg, net, model, val_loaders, device, d, total=plan[-1].last_epoch)
    rows: list[dict[str, Any]] = list(ckpt["rows"]) if ckpt else []
    for phase in plan:
        if done >= phase.last_epoch:
            continue
        n = phase.batch_size
        # virtual workers: W chunks of n per step (None when W == 1: plain batch statistics)
        groupnorm.set_virtual_batch(model, n if cfg.workers > 1 else None)
        loader = gdata.Loader(data.train, cfg.workers * n, shuffle=True, augment=cfg.augment,
                              drop_last=True, seed=cfg.seed, device=str(device), rank=d.rank,
                              world_size=d.world_size, channels_last=cfg.channels_last)
        if len(loader) == 0:
            raise ConfigError(
                f"the training set ({len(data.train.labels)} images over {d.world_size} ranks) "
                f"is smaller than one step of workers*batch_size = {cfg.workers}*{n}; lower "
                "them or raise train_size")
        optimizer = make_optimizer(cfg, model, phase.lr)
        scheduler = make_scheduler(cfg, optimizer, phase, len(loader))
        if ckpt is not None and ckpt["phase"] == phase.name and done > phase.first_epoch - 1:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        for epoch in range(max(phase.first_epoch, done + 1), phase.last_epoch + 1):
            row = epochs.run(epoch, phase.name, loader, optimizer, scheduler)
            rows.append(row)
            t_log = time.perf_counter()
            if d.is_main:
                rec.add_epoch(epoch, row)
                say(f"epoch {epoch}/{epochs.total} [{phase.name} n={n} W={cfg.workers}] "
                    f"train {row['train_loss']:.4f}/{row['train_error']:.2f}% "
                    f"val {row['val_loss']:.4f}/{row['val_error']:.2f}% "
                    f"lr {row['lr']:.4g} {row['images_per_s']:.0f} img/s")
                if path is not None:
                    runtime.save_checkpoint(path, key, epoch, {
                        "phase": phase.name, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": runtime.rng_state(), "rows": rows, "data_files": data.files})
            runtime.barrier(d)
            epochs.timings["log_s"] += time.perf_counter() - t_log
            done = epoch
        ckpt = None  # the next phase starts with a fresh optimizer
    timings = {**epochs.timings, "total_s": time.perf_counter() - t_start}
    summary = {**summarize(rows, cfg.report_last, curve_subset=data.curve is not None),
               "num_params": num_params, "train_seconds": timings["total_s"]}
    result = RunResult(epochs=rows, summary=summary, timings=timings)
    if d.is_main:
        rec.finish(result)
        if path is not None and not keep_checkpoint:
            path.unlink(missing_ok=True)
    return result


def _resume(path: Path | None, key: runtime.CheckpointKey,
            data_files: list[dict[str, Any]] | None,
            rec: Recorder, device: torch.device, d: runtime.Dist
            ) -> tuple[int, dict[str, Any] | None]:
    """(epochs done, checkpoint payload or None): rank 0 decides, from the checkpoint and the
    recorder's rows; the recorder then holds exactly the rows the run continues from."""
    epoch, ckpt, why = 0, None, ""
    if path is not None and path.exists():
        try:
            epoch, ckpt = runtime.load_checkpoint(path, key, map_location=device)
            if ckpt.get("data_files") != data_files:
                raise runtime.CheckpointMismatch(
                    f"it was written for other data files ({_names(ckpt.get('data_files'))}; "
                    f"now {_names(data_files)})")
        except runtime.CheckpointMismatch as exc:
            epoch, ckpt, why = 0, None, str(exc)
    if d.is_main:
        rows = rec.recorded_rows()
        if ckpt is not None and not (
                [r.get("epoch") for r in rows[:epoch]] == list(range(1, epoch + 1))
                and same_rows(rows[:epoch], ckpt["rows"])):
            why = (f"its epoch {epoch} does not match the {len(rows)} epoch row(s) recorded "
                   "for the run")
            epoch, ckpt = 0, None
        if why:
            warnings.warn(f"checkpoint {path} was not resumed: {why}; the run starts again "
                          "from epoch 1", CheckpointDiscarded, stacklevel=3)
            assert path is not None
            path.unlink(missing_ok=True)
        rec.truncate(epoch)
    agreed = runtime.from_main(d, epoch)
    if agreed != epoch:
        raise RuntimeError(f"rank {d.rank} cannot resume {path} from epoch {agreed} as rank 0 "
                           f"does ({why or 'its checkpoint differs'})")
    return epoch, ckpt


def _names(files: Any) -> str:
    return ", ".join(f"{Path(f['path']).name} {f['size']} B" for f in files or ()) or "none"


class _Epochs:
    """Runs epochs of one run: its model, device, evaluation loaders and time accounts."""

    def __init__(self, cfg: TrainConfig, net: nn.Module, model: nn.Module, val_loaders: list[Any],
                 device: torch.device, d: runtime.Dist, total: int) -> None:
        self.cfg, self.net, self.model, self.device, self.d = cfg, net, model, device, d
        self.total = total
        # the reported number reads the last report_last epochs: those see the whole val set;
        # the epochs before, the curve subset when there is one (val_loaders[1])
        self.val_loader, self.curve_loader = val_loaders[0], val_loaders[-1]
        self.full_from = total - cfg.report_last + 1
        self.timings = {"data_s": 0.0, "step_s": 0.0, "eval_s": 0.0, "log_s": 0.0, "steps": 0}

    def run(self, epoch: int, phase: str, loader: Any, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> dict[str, Any]:
        """One epoch of training plus evaluation; returns the epoch's metrics row."""
        device, d = self.device, self.d
        self.net.train()
        loader.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        data_s = step_s = 0.0
        lr = optimizer.param_groups[0]["lr"]
        bar = runtime.Progress(len(loader), f"epoch {epoch}/{self.total}",
                               self.cfg.progress and d.is_main)
        t0 = time.perf_counter()
        t_data = t0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            t_step = time.perf_counter()
            data_s += t_step - t_data
            out = self.net(x)
            loss = F.cross_entropy(out, y, label_smoothing=self.cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # the LR this step used (before the schedule)
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
            totals = torch.stack([loss_sum, wrong.double(),
                                  torch.tensor(float(seen), device=device, dtype=torch.float64)])
            torch.distributed.all_reduce(totals)
            loss_sum, wrong_f, seen_f = totals
            wrong, seen = wrong_f, int(seen_f)
        t_eval = time.perf_counter()
        if d.is_main:
            eval_loader = self.val_loader if epoch >= self.full_from else self.curve_loader
            val_loss, val_error = evaluate(self.model, eval_loader, device)
        else:
            val_loss, val_error = float("nan"), float("nan")
        eval_s = time.perf_counter() - t_eval
        for k, v in (("data_s", data_s), ("step_s", step_s), ("eval_s", eval_s),
                     ("steps", len(loader))):
            self.timings[k] += v
        return {
            "phase": phase,
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


def summarize(epoch_rows: list[dict[str, Any]], report_last: int, *,
              curve_subset: bool = False) -> dict[str, Any]:
    """Summary metrics from the epoch rows of the final phase (median of the last k, paper).

    With `curve_subset` the epochs before the last `report_last` were evaluated on a val subset,
    so the best val error is taken over the last `report_last` only (the whole val set).
    """
    final_phase = [r for r in epoch_rows if r["phase"] == epoch_rows[-1]["phase"]]
    last = [r["val_error"] for r in final_phase[-report_last:]]
    return {
        "median_val_error": statistics.median(last),
        "final_val_error": epoch_rows[-1]["val_error"],
        "best_val_error": min(last if curve_subset else [r["val_error"] for r in final_phase]),
        "final_train_error": epoch_rows[-1]["train_error"],
        "images_per_s": statistics.fmean(r["images_per_s"] for r in epoch_rows),
    }
