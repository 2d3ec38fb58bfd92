"""Where the training loop reports a run: the Recorder protocol and its simple implementations.

The training loop (loop.py) hands a recorder what it learns, in this order: the epoch rows already
recorded are asked for (to resume), rows past the checkpoint are dropped, the run's facts (its
data files, parameter count) are recorded, then one row per epoch -- each *before* that epoch's
checkpoint is written, so a checkpoint is never ahead of the rows -- and finally the summary.

Implementations: :class:`MemoryRecorder` (a list: tests, benchmarks), :class:`RunFolder` (the
files of ``groupnorm train``: config.json, run.json, epochs.jsonl, summary.json) and
``store.StoreRecorder`` (one run of a results database).
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .runtime import code_version, replace_file, utc_now

#: The metrics of one epoch row, in the order the results database stores them.
EPOCH_FIELDS = ("phase", "lr", "train_loss", "train_error", "val_loss", "val_error",
                "images_per_s", "epoch_seconds", "data_seconds", "step_seconds", "eval_seconds")
#: The fields that a resumed run must find unchanged (the timings differ from run to run).
RESUME_FIELDS = ("phase", "lr", "train_loss", "train_error", "val_loss", "val_error")


@dataclass
class RunInfo:
    """Facts about a run that are known once its data and model are built."""

    data_files: list[dict[str, Any]] | None  # [{"path", "size", "sha256"}]; None: not known
    num_params: int


@dataclass
class RunResult:
    """What a finished run hands back: per-epoch metrics, the summary and the time breakdown."""

    epochs: list[dict[str, Any]]
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


class Recorder(Protocol):
    """Where the loop reports one run."""

    @property
    def record_id(self) -> str:
        """Id of the record (database or folder); a checkpoint belongs to exactly one."""

    def recorded_rows(self) -> list[dict[str, Any]]:
        """Epoch rows already recorded for this run, by epoch (each with an "epoch" key)."""

    def truncate(self, keep_through: int) -> None:
        """Drop rows after epoch `keep_through` (0: all)."""

    def start(self, info: RunInfo) -> None:
        """Record the run's data files and size."""

    def add_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Record one finished epoch."""

    def finish(self, result: RunResult) -> None:
        """Record the run's summary: it is done."""


def same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Whether two lists of epoch rows hold the same numbers (NaN equals NaN)."""
    def key(row: dict[str, Any]) -> list[Any]:
        return [("nan" if isinstance(v, float) and math.isnan(v) else v)
                for v in (row.get(k) for k in RESUME_FIELDS)]

    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b, strict=True))


class MemoryRecorder:
    """A recorder that keeps everything in memory (one process, no resume across processes)."""

    def __init__(self) -> None:
        self.record_id = uuid.uuid4().hex
        self.rows: list[dict[str, Any]] = []
        self.info: RunInfo | None = None
        self.result: RunResult | None = None

    def recorded_rows(self) -> list[dict[str, Any]]:
        return list(self.rows)

    def truncate(self, keep_through: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] <= keep_through]

    def start(self, info: RunInfo) -> None:
        self.info = info

    def add_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        self.rows.append({"epoch": epoch, **row})

    def finish(self, result: RunResult) -> None:
        self.result = result


class RunFolder:
    """The files of one `groupnorm train` run: config.json (the config), run.json (record id,
    data files, device, code version), epochs.jsonl (a line per epoch) and summary.json."""

    def __init__(self, out: str | Path, config: dict[str, Any], config_hash: str,
                 device: str, torch_version: str, extra: dict[str, Any] | None = None) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.extra = extra or {}
        self.epochs_path = self.out / "epochs.jsonl"
        run_path = self.out / "run.json"
        old = _read_json(run_path)
        if old.get("config_hash") != config_hash or "record_id" not in old:
            # a new record: epoch lines of another config (or of an unknown one) are not ours
            old = {"record_id": uuid.uuid4().hex, "config_hash": config_hash}
            self.epochs_path.unlink(missing_ok=True)
        self.run = {**old, "device": device, "torch_version": torch_version,
                    "code_version": code_version(), "started_at": utc_now()}
        _write_json(self.out / "config.json", config)
        _write_json(run_path, self.run)

    @property
    def record_id(self) -> str:
        return str(self.run["record_id"])

    def recorded_rows(self) -> list[dict[str, Any]]:
        rows = []
        if self.epochs_path.exists():
            for line in self.epochs_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: not recorded
                    break
        return rows

    def truncate(self, keep_through: int) -> None:
        rows = [r for r in self.recorded_rows() if r["epoch"] <= keep_through]
        replace_file(self.epochs_path,
                     "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

    def start(self, info: RunInfo) -> None:
        self.run.update(data_files=info.data_files, num_params=info.num_params)
        _write_json(self.out / "run.json", self.run)

    def add_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        with open(self.epochs_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, **row}, sort_keys=True) + "\n")

    def finish(self, result: RunResult) -> None:
        summary = {**result.summary, "timings": result.timings, **self.extra}
        _write_json(self.out / "summary.json", summary)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    replace_file(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode())
