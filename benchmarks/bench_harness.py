"""Per-step cost of the experiment harness vs the bare training step, measured in the same run.

``bare``: the training step alone -- forward, cross-entropy, backward, SGD update -- over batches
that were cut by the loader beforehand (so no data time), with the same model, virtual workers
and batch size as the harness. ``harness``: one epoch of :func:`groupnorm.experiments.loop.train`
(loader, bookkeeping, LR schedule, the epoch row, the checkpoint), its training time per step
(the per-epoch evaluation is reported apart: it is not per step). The two alternate
(harness, bare, bare, harness, ...) so that drifts of a shared machine hit both.

Times are CPU time of this process (``time.process_time``) by default, which a busy machine
disturbs less than wall time; ``--clock wall`` switches. One thread.

Usage::

    python benchmarks/bench_harness.py [--preset quick] [--norm bn] [--batch-size 2]
                                       [--workers 4] [--reps 6] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import groupnorm  # noqa: E402
from groupnorm import data as gdata  # noqa: E402
from groupnorm.experiments import loop  # noqa: E402
from groupnorm.experiments.config import make_config  # noqa: E402
from groupnorm.experiments.presets import load_preset  # noqa: E402
from groupnorm.experiments.recipe import NormSpec, build_model, load_data, make_optimizer  # noqa: E402
from groupnorm.experiments.runtime import seed_everything  # noqa: E402
from groupnorm.experiments.store import Store  # noqa: E402


def bare_step_seconds(cfg, train_set, clock) -> float:
    """Seconds per optimizer step of the training step alone, over one epoch's batches."""
    seed_everything(cfg.seed)
    model = build_model(cfg, NormSpec.resolve(cfg.norm, cfg.norm_options),
                        int(train_set.images.shape[1]), train_set.num_classes)
    groupnorm.set_virtual_batch(model, cfg.batch_size if cfg.workers > 1 else None)
    opt = make_optimizer(cfg, model, cfg.step_lr("train"))
    loader = gdata.Loader(train_set, cfg.workers * cfg.batch_size, shuffle=True, drop_last=True,
                          seed=cfg.seed, augment=cfg.augment)
    loader.set_epoch(1)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    model.train()
    t0 = clock()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (clock() - t0) / len(batches)


def harness_step_seconds(cfg, tmp: Path) -> tuple[float, float, dict]:
    """(seconds per step of one harness epoch without evaluation, evaluation seconds, timings),
    recording into a results database and a checkpoint as a sweep does."""
    store = Store(tmp / "runs.db")
    store.add_study("bench", "grid")
    (run_id,) = store.enqueue([("bench", cfg)])
    store.claim(run_id, cfg.device, torch.__version__)
    ckpt = tmp / "ckpt.pt"
    res = loop.train(cfg, store.recorder(run_id), checkpoint=ckpt, keep_checkpoint=True,
                     log=None)
    store.truncate_epochs(run_id, 0)
    store.conn.execute("UPDATE runs SET status='queued'")  # the next rep runs it again
    store.close()
    ckpt.unlink(missing_ok=True)
    row, t = res.epochs[0], res.timings
    return (row["epoch_seconds"] - row["eval_seconds"] + t["log_s"]) / t["steps"], \
        row["eval_seconds"], t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", help="preset whose data and model are used")
    p.add_argument("--norm", default="bn")
    p.add_argument("--batch-size", type=int, default=2, help="n, images per worker")
    p.add_argument("--workers", type=int, default=4, help="W, virtual workers")
    p.add_argument("--reps", type=int, default=6, help="epochs of each kind (alternating)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--csv", type=Path, default=None, help="append the summary row here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # the harness's own timers use the same clock, so both sides count the same thing
    loop.time = types.SimpleNamespace(perf_counter=clock)
    base = load_preset(args.preset).defaults
    cfg = make_config({**base, "norm": args.norm, "batch_size": args.batch_size,
                       "workers": args.workers, "epochs": 1, "num_threads": 1,
                       "progress": False, "schedule": "constant"})
    train_set = load_data(cfg).train
    bare_step_seconds(cfg, train_set, clock)  # warm-up
    bare, harness, evals = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.reps):
            order = ("h", "b") if i % 2 == 0 else ("b", "h")
            for kind in order:
                if kind == "b":
                    bare.append(bare_step_seconds(cfg, train_set, clock))
                else:
                    h, e, timings = harness_step_seconds(cfg, Path(tmp))
                    harness.append(h)
                    evals.append(e)
    mb, mh = statistics.median(bare), statistics.median(harness)
    paired = statistics.median(h - b for h, b in zip(harness, bare, strict=True))
    steps = timings["steps"]
    env = (f"torch {torch.__version__}, {platform.machine()}, 1 thread, clock {args.clock}, "
           f"{args.preset} preset: {cfg.model} {args.norm} n={args.batch_size} W={args.workers}, "
           f"{steps} steps/epoch")
    print(f"# {env}")
    print(f"bare step     ms/step: {[round(1e3 * x, 3) for x in bare]}")
    print(f"harness epoch ms/step: {[round(1e3 * x, 3) for x in harness]}")
    print(f"median: bare {1e3 * mb:.3f} ms, harness {1e3 * mh:.3f} ms per step; overhead "
          f"{1e3 * (mh - mb):+.3f} ms ({100 * (mh - mb) / mb:+.1f}%), paired median "
          f"{1e3 * paired:+.3f} ms ({100 * paired / mb:+.1f}%)")
    print(f"harness breakdown (last epoch, per step): data {1e3 * timings['data_s'] / steps:.3f}"
          f" ms, logging + checkpoint {1e3 * timings['log_s'] / steps:.3f} ms; evaluation "
          f"{statistics.median(evals):.2f} s per epoch (not per step)")
    if args.csv:
        new = not args.csv.exists()
        with open(args.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["env", "bare_ms", "harness_ms", "overhead_pct", "paired_pct",
                            "eval_s"])
            w.writerow([env, round(1e3 * mb, 3), round(1e3 * mh, 3),
                        round(100 * (mh - mb) / mb, 2), round(100 * paired / mb, 2),
                        round(statistics.median(evals), 3)])


if __name__ == "__main__":
    main()
