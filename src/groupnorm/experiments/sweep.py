"""Grid sweeps into the results store, safe to SIGKILL and rerun at any moment.

Protocol (each numbered step is one transaction or one atomic file replace):
1. enqueue: every (study, config) of the grid is inserted once (UNIQUE config hash; a config
   shared by two studies is one run that belongs to both);
2. claim: a queued run, or a `running` one whose owner process is gone, becomes running(us);
3. resume: if the run has a checkpoint, epoch rows after the checkpoint's epoch are deleted
   (they were written just before a kill that came before the checkpoint) -- else all its rows;
4. per epoch: insert the epoch row, THEN replace the checkpoint; so the checkpoint's epoch is
   never ahead of the rows, and rows ahead of it are redone identically after a kill;
5. finish: status done + summary in one UPDATE; the checkpoint is then deleted (a leftover one
   of a done run is removed at the next start).
A run that raises is marked failed with its traceback and the sweep goes on; `retry_failed`
queues failed runs again. With `jobs` > 1 the runs go to worker processes that claim them the
same way; a worker whose sweep process has died (SIGKILL) stops within a second, leaving its run
to be resumed by the next sweep. Each invocation's wall time is kept in the database (meta
"sweeps") for the report.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import Preset, Study, TrainConfig
from .store import Store, device_description, owner_alive, owner_id, utc_now
from .train import crash_point, train


def run_label(cfg: TrainConfig, keys: list[str]) -> str:
    """Short `key=value` label of a run over the fields that vary in its study."""
    flat = cfg.to_dict()
    parts = []
    for key in keys:
        if "." in key:
            root, sub = key.split(".", 1)
            value = flat[root].get(sub)
            key = sub
        else:
            value = flat[key]
        parts.append(f"{key}={value}")
    return " ".join(parts) if parts else cfg.config_hash()


def varying_keys(study: Study, overrides: dict[str, list[Any]]) -> list[str]:
    """Fields that take several values in a study's grid (after command-line overrides)."""
    keys = [k for k, v in study.grid.items() if len(v) > 1 and k not in overrides]
    keys += [k for k, v in overrides.items() if len(v) > 1]
    return keys


def run_sweep(
    preset: Preset,
    db: str | Path,
    *,
    overrides: dict[str, list[Any]] | None = None,
    studies: list[str] | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run every queued run of a preset's grid into `db`; returns counts per status.

    Runs already done in the database are skipped, interrupted ones resume from their last
    epoch checkpoint, failed ones are skipped unless retry_failed. `jobs` > 1 runs that many
    worker processes (one run each at a time; give each run num_threads=1 on a small CPU).
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "a sweep runs in one process (it spreads runs over --jobs worker processes); under "
            "torchrun use `groupnorm train` for one data-parallel run instead")
    overrides = overrides or {}
    pairs = preset.expand(overrides, studies)
    store = Store(db)
    t_sweep, started = time.perf_counter(), utc_now()
    try:
        position = {s.name: i for i, s in enumerate(preset.studies)}
        for study in {s.name: s for s, _ in pairs}.values():
            store.add_study(study.name, study.kind, study.description, preset.name,
                            position[study.name])
        ids = store.enqueue([(s.name, c.config_hash(), c.to_dict()) for s, c in pairs])
        if retry_failed:
            n = store.retry_failed(sorted(set(ids)))
            if n:
                log(f"queued {n} failed run(s) again")
        # the first (study, config) of each run id decides its label and its runtime fields
        todo: dict[int, tuple[Study, TrainConfig]] = {}
        for run_id, (study, cfg) in zip(ids, pairs, strict=True):
            todo.setdefault(run_id, (study, cfg))
        _clean_checkpoints(store)
        counts = store.counts(list(todo))
        log(f"sweep {preset.name}: {len(todo)} runs in {store.path} ({_fmt_counts(counts)})")
        pending = [i for i in todo if store.run(i)["status"] in ("queued", "running")]
        if jobs > 1 and len(pending) > 1:
            items = [(i, todo[i][0].name, run_label(todo[i][1], varying_keys(todo[i][0],
                                                                             overrides)),
                      todo[i][1]) for i in pending]
            _run_parallel(store.path, items, jobs, log, progress)
            return _finish(store, preset.name, list(todo), t_sweep, started, jobs, log)
        bar = None
        if progress and sys.stdout.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="sweep", dynamic_ncols=True)
        for k, run_id in enumerate(pending, 1):
            study, cfg = todo[run_id]
            label = run_label(cfg, varying_keys(study, overrides))
            if not store.claim(run_id, device_description(cfg.device), torch.__version__):
                log(f"[{k}/{len(pending)}] run {run_id} ({label}): taken by another process")
                continue
            t0 = time.perf_counter()
            status = execute_run(store, run_id, cfg, progress=progress and bar is not None,
                                 log=None if bar is not None else log)
            row = store.run(run_id)
            if status == "done":
                msg = (f"done: median val error {row['median_val_error']:.2f}% "
                       f"(final {row['final_val_error']:.2f}%)")
            else:
                msg = "FAILED: " + (row["error"] or "").strip().splitlines()[-1]
            took = time.perf_counter() - t0
            line = f"[{k}/{len(pending)}] {study.name} {label}: {msg} [{took:.0f}s]"
            if bar is not None:
                bar.write(line)
                bar.update(1)
            else:
                log(line)
        if bar is not None:
            bar.close()
        return _finish(store, preset.name, list(todo), t_sweep, started, jobs, log)
    finally:
        store.close()


def _finish(store: Store, name: str, run_ids: list[int], t0: float, started: str, jobs: int,
            log: Callable[[str], None]) -> dict[str, int]:
    """Record this invocation's wall time, say what is left, return the counts per status."""
    counts = store.counts(run_ids)
    wall = time.perf_counter() - t0
    store.append_meta("sweeps", {"started_at": started, "finished_at": utc_now(),
                                 "wall_s": round(wall, 1), "jobs": jobs, "counts": counts})
    log(f"sweep {name}: {_fmt_counts(counts)} ({wall / 60:.1f} min)")
    held = [r["id"] for r in store.runs(status="running") if r["id"] in set(run_ids)]
    if held:
        log(f"note: run(s) {held} are still held by other live processes (another sweep of "
            "this database?); rerun this command after they finish or stop them")
    return counts


def _run_parallel(db: Path, items: list[tuple[int, str, str, TrainConfig]], jobs: int,
                  log: Callable[[str], None], progress: bool) -> None:
    """Run pending runs in `jobs` spawned processes; the store's claim gives out each run once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    log(f"running {len(items)} runs in {jobs} processes")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_worker, str(db), items, len(items), os.getpid(), progress)
                   for _ in range(jobs)]
        for f in futures:
            f.result()


def _exit_with_parent(parent: int) -> None:
    """Stop this worker process (as a kill would) once the sweep process that started it is
    gone: a SIGKILLed sweep leaves no workers training on behind its back."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker(db: str, items: list[tuple[int, str, str, TrainConfig]], total: int,
            parent: int | None = None, progress: bool = True) -> int:
    """One sweep worker process: claim and run whatever is still free, in order."""
    if parent is not None:
        _exit_with_parent(parent)
    store = Store(db)
    ran = 0
    try:
        for k, (run_id, study, label, cfg) in enumerate(items, 1):
            if not store.claim(run_id, device_description(cfg.device), torch.__version__):
                continue
            t0 = time.perf_counter()
            # several runs share the terminal: a labelled line per epoch instead of bars
            status = execute_run(store, run_id, cfg, progress=False,
                                 log=(lambda m: print(m, flush=True)) if progress else None,
                                 name=f"{study} {label}")
            row = store.run(run_id)
            if status == "done":
                msg = f"done: median val error {row['median_val_error']:.2f}%"
            else:
                msg = "FAILED: " + (row["error"] or "").strip().splitlines()[-1]
            print(f"[{k}/{total}] {study} {label}: {msg} [{time.perf_counter() - t0:.0f}s]",
                  flush=True)
            ran += 1
    finally:
        store.close()
    return ran


def execute_run(store: Store, run_id: int, cfg: TrainConfig, *, progress: bool = False,
                log: Callable[[str], None] | None = None, name: str = "") -> str:
    """Train one claimed run, recording epochs and the outcome; returns 'done' or 'failed'."""
    ckpt = store.checkpoint_path(cfg.config_hash())
    prefix = f"  run {run_id}{' (' + name + ')' if name else ''}: "
    try:
        result = train(
            replace(cfg, progress=progress),
            checkpoint_path=ckpt,
            on_resume=lambda epoch: store.truncate_epochs(run_id, epoch),
            on_epoch=lambda epoch, row: store.add_epoch(run_id, epoch, row),
            log=(lambda m: log(prefix + m)) if log is not None else None,
        )
    except KeyboardInterrupt:
        store.release(run_id)
        raise
    except Exception:
        store.fail(run_id, traceback.format_exc()[-4000:])
        return "failed"
    store.finish(run_id, result.summary, result.timings)
    crash_point("finish")
    ckpt.unlink(missing_ok=True)
    return "done"


def _clean_checkpoints(store: Store) -> None:
    """Remove checkpoints of runs that are done (left by a kill between finish and unlink)."""
    if not store.checkpoint_dir.exists():
        return
    done = {r["config_hash"] for r in store.runs(status="done")}
    for path in store.checkpoint_dir.glob("*.pt"):
        if path.stem in done:
            path.unlink(missing_ok=True)
    for path in store.checkpoint_dir.glob(".*.tmp"):  # a write cut by a kill
        pid = path.name.rsplit(".", 2)[-2]
        if not owner_alive(f"{owner_id().rpartition(':')[0]}:{pid}"):
            path.unlink(missing_ok=True)


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v)
