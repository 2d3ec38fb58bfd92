"""Where a sweep stands: runs per status and study, what is running, and how long the rest takes.

`groupnorm status DB` prints this for a database that a sweep may be writing (it is opened
read-only). The estimate of what is left comes from the database alone: the epoch times already
recorded (every attempt's, done and running runs alike) of runs of the same kind — model and its
options, dataset, training-set size, workers, threads, layout and the phase's images per worker —
and, where none of that kind has run yet, of the same kind with any normalization; runs with
neither are counted apart, not guessed. Epoch times include the evaluation, so the estimate
assumes the remaining runs share the machine as the timed ones did (e.g. the same ``--jobs``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import Store

_KIND_FIELDS = ("model", "model_options", "dataset", "train_size", "workers", "num_threads",
                "channels_last")


def _kind(cfg: dict[str, Any], batch_size: int, norm: str | None) -> str:
    """The timing key of one phase of a run (norm None: any normalization)."""
    key = {k: cfg.get(k) for k in _KIND_FIELDS}
    key.update(batch_size=batch_size, norm=norm)
    return json.dumps(key, sort_keys=True, default=str)


def _phases(cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(phase name, epochs, images per worker) of a run, in order."""
    out = []
    if cfg.get("pretrain_epochs"):
        out.append(("pretrain", int(cfg["pretrain_epochs"]),
                    int(cfg.get("pretrain_batch_size") or cfg["batch_size"])))
    out.append(("train", int(cfg["epochs"]), int(cfg["batch_size"])))
    return out


@dataclass
class Estimate:
    """Seconds of epochs still to run (as recorded epochs took), and what could not be timed."""

    seconds: float
    runs_timed: int
    runs_untimed: int
    epochs_left: int


def estimate_left(runs: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> Estimate:
    """Seconds of training + evaluation left for the runs not done (queued or running).

    An epoch left is timed at the mean recorded epoch time of its kind (see the module
    docstring); failed runs are not counted (they do not run again unless retried).
    """
    by_id = {r["id"]: r for r in runs}
    recorded: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    exact: dict[str, list[float]] = defaultdict(list)
    any_norm: dict[str, list[float]] = defaultdict(list)
    for e in epochs:
        run = by_id.get(e["run_id"])
        if run is None or e.get("epoch_seconds") is None:
            continue
        cfg = run["config"]
        recorded[run["id"]][e["phase"]] += 1
        n = dict((p, b) for p, _, b in _phases(cfg)).get(e["phase"], cfg["batch_size"])
        exact[_kind(cfg, n, cfg.get("norm"))].append(float(e["epoch_seconds"]))
        any_norm[_kind(cfg, n, None)].append(float(e["epoch_seconds"]))
    seconds, timed, untimed, left_total = 0.0, 0, 0, 0
    for run in runs:
        if run["status"] not in ("queued", "running"):
            continue
        cfg = run["config"]
        run_s, ok = 0.0, True
        for phase, n_epochs, n in _phases(cfg):
            left = max(0, n_epochs - recorded[run["id"]].get(phase, 0))
            left_total += left
            if left == 0:
                continue
            times = exact.get(_kind(cfg, n, cfg.get("norm"))) or any_norm.get(_kind(cfg, n, None))
            if not times:
                ok = False
                continue
            run_s += left * sum(times) / len(times)
        if ok:
            seconds += run_s
            timed += 1
        else:
            untimed += 1
    return Estimate(seconds, timed, untimed, left_total)


def _fmt_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_text(db: str | Path, jobs: int = 1) -> str:
    """The status report of a results database: counts, studies, running runs, time left."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    with Store(db, readonly=True) as s:
        runs = s.runs()
        epochs = s.epochs()
        studies = s.studies()
        members = {st["name"]: set(s.study_run_ids(st["name"])) for st in studies}
    status = {r["id"]: r["status"] for r in runs}
    counts: dict[str, int] = defaultdict(int)
    for st in status.values():
        counts[st] += 1
    lines = [f"{db}: {len(runs)} runs — " + ", ".join(
        f"{counts.get(k, 0)} {k}" for k in ("done", "running", "queued", "failed"))]
    if studies:
        width = max(len(st["name"]) for st in studies)
        lines.append("")
        lines.append(f"{'study':<{width}}  done / runs")
        for st in studies:
            ids = members[st["name"]]
            done = sum(status.get(i) == "done" for i in ids)
            lines.append(f"{st['name']:<{width}}  {done:>4} / {len(ids)}")
    seen: dict[int, int] = defaultdict(int)
    for e in epochs:
        seen[e["run_id"]] += 1
    running = [r for r in runs if r["status"] == "running"]
    if running:
        lines.append("")
        lines.append("running:")
        for r in running:
            cfg = r["config"]
            total = sum(k for _, k, _ in _phases(cfg))
            lines.append(f"  #{r['id']} {cfg.get('norm')} n={cfg.get('batch_size')} "
                         f"seed {cfg.get('seed')}: epoch {seen[r['id']]} of {total}"
                         + (f", heartbeat {r['heartbeat_at']}" if r.get("heartbeat_at") else ""))
    est = estimate_left(runs, epochs)
    if est.runs_timed or est.runs_untimed:
        lines.append("")
        text = (f"left: {est.epochs_left} epochs in {est.runs_timed + est.runs_untimed} runs; "
                f"the {est.runs_timed} timed ones take {_fmt_duration(est.seconds)} of epochs, "
                f"about {_fmt_duration(est.seconds / jobs)} with {jobs} at a time, at the epoch "
                "times recorded for runs of their kind")
        if est.runs_untimed:
            text += (f"; {est.runs_untimed} more have no run of their kind (model, data, "
                     "images per worker) timed yet")
        lines.append(text)
    return "\n".join(lines)
