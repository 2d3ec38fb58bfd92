"""Grid sweeps into the results store, safe to SIGKILL and rerun at any moment.

Protocol (each numbered step is one transaction or one atomic file replace):
0. check: every grid point is a valid config, and its norm, model (built dry), dataset name and
   options and device are checked (recipe.check); the database and its checkpoint folder are
   writable. A problem here stops the sweep with one line before anything is queued.
1. enqueue: every (study, config) of the grid is inserted once (UNIQUE config hash; a config
   shared by two studies is one run that belongs to both);
2. claim: a queued run, or a `running` one whose owner process is gone, becomes running(us);
3. resume: the training loop resumes from the run's checkpoint only if it is intact and
   matches the database and the rows already recorded; it drops rows past the checkpoint
   (written just before a kill that came before the checkpoint) -- else all of the run's rows;
4. per epoch: insert the epoch row, THEN replace the checkpoint; so the checkpoint's epoch is
   never ahead of the rows, and rows ahead of it are redone identically after a kill;
5. finish: status done + summary in one UPDATE; the checkpoint is then deleted (a leftover one
   of a done run is removed at the next start).

Outcomes: a run that raises is marked failed with its traceback and the sweep goes on (failed
runs are skipped by later sweeps unless `retry_failed`). A setup error met by a run -- a config
the dry check could not judge (a training set smaller than one step), missing or corrupt data,
a database or checkpoint folder that cannot be written -- is not a fact about the run: the run
goes back to the queue and the sweep stops with that error. With `jobs` > 1 the runs go to
worker processes that claim them the same way; a worker that dies (OOM killer, SIGKILL) fails
only the run it held, and a new worker takes its place. A worker whose sweep process has died
stops within a second, leaving its run to be resumed by the next sweep.

Stale owners: a `running` run whose owner is a process of this host that is gone is taken over
by the next sweep. An owner on another host cannot be checked from here; `reclaim=True`
(``--reclaim``) takes those runs over too -- use it only when that host's sweep is known to be
dead (the sweep lists each such owner with its last heartbeat: the last claim or epoch row).
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import recipe, runtime
from .config import ConfigError, TrainConfig
from .loop import train
from .presets import Point, Preset
from .store import Store, StoreError

Log = Callable[[str], None]


class SweepStopped(Exception):
    """A run met a setup error (missing data, a config the dry check could not judge, a file
    that cannot be written): the run is back in the queue and the sweep stopped. The message
    names the run and the error."""


def _setup_errors() -> tuple[type[BaseException], ...]:
    """Errors that say the setup is wrong, not the run: the run is released, the sweep stops."""
    from groupnorm.data import CorruptDatasetError

    return ConfigError, StoreError, OSError, CorruptDatasetError


@dataclass(frozen=True)
class Task:
    """A run to claim: its id, study, label and config (the first grid point that named it)."""

    run_id: int
    study: str
    label: str
    config: TrainConfig


def run_sweep(preset: Preset, db: str | Path, *, overrides: dict[str, list[Any]] | None = None,
              studies: list[str] | None = None, retry_failed: bool = False,
              progress: bool = True, jobs: int = 1, reclaim: bool = False,
              log: Log = print) -> dict[str, int]:
    """Run every queued run of a preset's grid into `db`; returns counts per status.

    Runs already done in the database are skipped, interrupted ones resume from their last
    epoch checkpoint, failed ones are skipped unless retry_failed. `jobs` > 1 runs that many
    worker processes (one run each at a time; give each run num_threads=1 on a small CPU).
    Raises ConfigError or StoreError (nothing queued) for a bad grid, database or device, and
    SweepStopped for a setup error met by a run (that run queued again).
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r}: must be an integer >= 1 (e.g. --jobs 2)")
    if runtime.dist_info().enabled:
        raise ConfigError(
            "a sweep runs in one process (it spreads runs over --jobs worker processes); under "
            "torchrun use `groupnorm train` for one data-parallel run instead")
    overrides = overrides or {}
    points = preset.expand(overrides, studies)
    check_points(points)
    store = Store(db)
    try:
        _check_writable(store.checkpoint_dir)
        t_sweep, started = time.perf_counter(), runtime.utc_now()
        position = {s.name: i for i, s in enumerate(preset.studies)}
        for study in {p.study.name: p.study for p in points}.values():
            store.add_study(study.name, study.kind, study.description, preset.name,
                            position[study.name])
        ids = store.enqueue([(p.study.name, p.config) for p in points])
        if retry_failed:
            n = store.retry_failed(sorted(set(ids)))
            if n:
                log(f"queued {n} failed run(s) again")
        tasks: dict[int, Task] = {}
        for run_id, p in zip(ids, points, strict=True):
            tasks.setdefault(run_id, Task(run_id, p.study.name, p.label, p.config))
        _clean_checkpoints(store)
        log(f"sweep {preset.name}: {len(tasks)} runs in {store.path} "
            f"({_fmt_counts(store.counts(list(tasks)))})")
        pending = [t for i, t in tasks.items() if store.run(i)["status"] in ("queued", "running")]
        if jobs > 1 and len(pending) > 1:
            stopped = _run_parallel(store, pending, jobs, reclaim, progress, log)
        else:
            stopped = _run_here(store, pending, reclaim, progress, log)
        counts = _finish(store, preset.name, list(tasks), t_sweep, started, jobs, log)
        if stopped:
            raise SweepStopped(f"{stopped} -- the run is queued again; fix this and rerun")
        return counts
    finally:
        store.close()


def check_points(points: list[Point]) -> None:
    """The dry check (recipe.check) of every grid point, once per distinct model/data/device."""
    seen: set[str] = set()
    for p in points:
        c = p.config
        key = json.dumps([c.model, c.model_options, c.norm, c.norm_options, c.zero_init_residual,
                          c.dataset, c.dataset_options, c.device], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            recipe.check(c)
        except ConfigError as exc:
            where = f" ({p.label})" if p.label != c.config_hash() else ""
            raise ConfigError(f"study {p.study.name!r}{where}: {exc}") from None


def _check_writable(folder: Path) -> None:
    probe = folder / f".probe.{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"cannot write checkpoints into {folder} ({exc}); make it writable or "
                         "pass a --db in a writable folder") from None


def execute_run(store: Store, task: Task, *, progress: bool = False, log: Log | None = None,
                name: str = "") -> tuple[str, str]:
    """Train one claimed run, recording epochs and the outcome: ('done' | 'failed' |
    'stopped', one line). 'stopped' is a setup error: the run is back in the queue."""
    cfg = replace(task.config, progress=progress)
    prefix = f"  run {task.run_id}{' (' + name + ')' if name else ''}: "
    try:
        train(cfg, store.recorder(task.run_id),
              checkpoint=store.checkpoint_path(cfg.config_hash()),
              log=(lambda m: log(prefix + m)) if log is not None else None)
    except KeyboardInterrupt:
        store.release(task.run_id)
        raise
    except _setup_errors() as exc:
        msg = f"run {task.run_id} ({task.study} {task.label}): {exc}"
        try:
            store.release(task.run_id, error=msg)
        except StoreError:
            pass  # the database itself is the problem: the next sweep reclaims the run
        return "stopped", msg
    except Exception:
        store.fail(task.run_id, traceback.format_exc()[-4000:])
        return "failed", "FAILED: " + _last_line(store.run(task.run_id)["error"])
    row = store.run(task.run_id)
    return "done", (f"done: median val error {row['median_val_error']:.2f}% "
                    f"(final {row['final_val_error']:.2f}%)")


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "?"


def _claim_and_run(store: Store, tasks: list[Task], reclaim: bool, *, progress: bool,
                   log: Log | None, line: Log, stop: Any = None, named: bool = False
                   ) -> str | None:
    """The claim -> run loop of one process (the sweep's, or a worker's: then `stop` is the
    sweep's stop event and `named` labels each log line with its run); returns the setup error
    that stopped it, or None."""
    for k, task in enumerate(tasks, 1):
        if stop is not None and stop.is_set():
            return None
        head = f"[{k}/{len(tasks)}] {task.study} {task.label}"
        if not store.claim(task.run_id, runtime.device_description(task.config.device),
                           torch.__version__, reclaim=reclaim):
            continue
        t0 = time.perf_counter()
        status, msg = execute_run(store, task, progress=progress, log=log,
                                  name=f"{task.study} {task.label}" if named else "")
        if status == "stopped":
            return msg
        line(f"{head}: {msg} [{time.perf_counter() - t0:.0f}s]")
    return None


def _run_here(store: Store, tasks: list[Task], reclaim: bool, progress: bool,
              log: Log) -> str | None:
    """Run the tasks in this process (a tqdm bar over the runs on a terminal)."""
    bar = None
    if progress and runtime.stdout_is_terminal():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="sweep", dynamic_ncols=True)

    def line(text: str) -> None:
        if bar is not None:
            bar.write(text)
            bar.update(1)
        else:
            log(text)

    try:
        return _claim_and_run(store, tasks, reclaim, progress=bar is not None,
                              log=None if bar is not None else log, line=line)
    finally:
        if bar is not None:
            bar.close()


def _run_parallel(store: Store, tasks: list[Task], jobs: int, reclaim: bool, progress: bool,
                  log: Log) -> str | None:
    """Run the tasks in `jobs` spawned worker processes; the store's claim gives out each run
    once. A worker that dies fails the run it held and is replaced."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    stop, messages = ctx.Event(), ctx.Queue()
    workers: dict[Any, Any] = {}

    def start() -> None:
        p = ctx.Process(target=_worker, args=(str(store.path), tasks, runtime.pid(), progress,
                                              reclaim, stop, messages))
        p.start()
        workers[p.sentinel] = p

    log(f"running {len(tasks)} runs in {jobs} processes")
    for _ in range(min(jobs, len(tasks))):
        start()
    stopped: str | None = None
    try:
        while workers:
            for sentinel in wait(list(workers)):
                p = workers.pop(sentinel)
                p.join()
                if p.exitcode == 0:
                    continue
                held = [r for r in store.runs(status="running")
                        if r["owner"] == runtime.owner_id(p.pid)]
                for r in held:
                    store.fail(r["id"], f"worker process {p.pid} died (exit code {p.exitcode}) "
                                        "while running this run")
                log(f"worker process {p.pid} died (exit code {p.exitcode}); run(s) "
                    f"{[r['id'] for r in held]} marked failed")
                queued = any(store.run(t.run_id)["status"] == "queued" for t in tasks)
                if not held:  # it died before running anything: a new one would too
                    stopped = stopped or (f"worker process {p.pid} exited with code "
                                          f"{p.exitcode} before running a run")
                elif queued and not stop.is_set():
                    start()
            while not messages.empty():
                stopped = stopped or messages.get()
    except KeyboardInterrupt:
        stop.set()
        for p in workers.values():
            p.join(timeout=30)
        raise
    while not messages.empty():
        stopped = stopped or messages.get()
    return stopped


def _worker(db: str, tasks: list[Task], parent: int, progress: bool, reclaim: bool,
            stop: Any, messages: Any) -> None:
    """One sweep worker process: claim and run whatever is still free, in order."""
    runtime.exit_with_parent(parent)
    store = Store(db)
    try:
        # several runs share the terminal: a labelled line per epoch instead of bars
        stopped = _claim_and_run(
            store, tasks, reclaim, progress=False, stop=stop, named=True,
            log=(lambda m: print(m, flush=True)) if progress else None,
            line=lambda m: print(m, flush=True))
        if stopped:
            stop.set()
            messages.put(stopped)
    finally:
        store.close()


def _finish(store: Store, name: str, run_ids: list[int], t0: float, started: str, jobs: int,
            log: Log) -> dict[str, int]:
    """Record this invocation's wall time, say what is left, return the counts per status."""
    counts = store.counts(run_ids)
    wall = time.perf_counter() - t0
    store.append_meta("sweeps", {"started_at": started, "finished_at": runtime.utc_now(),
                                 "wall_s": round(wall, 1), "jobs": jobs, "counts": counts})
    log(f"sweep {name}: {_fmt_counts(counts)} ({wall / 60:.1f} min)")
    held = [r for r in store.runs(status="running") if r["id"] in set(run_ids)]
    if held:
        owners = "; ".join(f"run {r['id']} by {r['owner']} (last heartbeat {r['heartbeat_at']})"
                           for r in held)
        log(f"note: held by other processes: {owners}. Rerun after they finish; if they are "
            "gone (another host's sweep that died), rerun with --reclaim")
    if counts["failed"]:
        log(f"{counts['failed']} run(s) failed (see their error in the database or the "
            "report); rerun with --retry-failed to run them again")
    return counts


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
        if pid.isdigit() and runtime.owner_state(runtime.owner_id(int(pid))) == "dead":
            path.unlink(missing_ok=True)


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v)
