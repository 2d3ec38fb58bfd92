"""The results store: one SQLite file (WAL) holding every run, its config and its epoch rows.

Invariants the sweep relies on (see sweep.py for the protocol):
- one row per config hash in `runs` (UNIQUE), one row per (run, epoch) in `epochs` (UNIQUE);
- every multi-row change happens inside one `BEGIN IMMEDIATE` transaction, so a SIGKILL leaves
  either all or none of it;
- status moves queued -> running -> done | failed; a `running` row whose owner process is gone
  is an interrupted run and is picked up again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    name        TEXT PRIMARY KEY,        -- e.g. batch_size
    kind        TEXT NOT NULL,           -- what the report does with it (config.Study.kind)
    description TEXT NOT NULL DEFAULT '',
    preset      TEXT NOT NULL DEFAULT '',
    position    INTEGER NOT NULL DEFAULT 0  -- order of the study in its preset
);
CREATE TABLE IF NOT EXISTS runs (
    id                INTEGER PRIMARY KEY,
    config_hash       TEXT NOT NULL UNIQUE,   -- TrainConfig.config_hash()
    config_json       TEXT NOT NULL,          -- the resolved config, as enqueued
    status            TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    error             TEXT,                   -- traceback tail of the last failure
    owner             TEXT,                   -- host:pid of the process running it
    attempts          INTEGER NOT NULL DEFAULT 0,
    code_version      TEXT,
    torch_version     TEXT,
    device            TEXT,
    created_at        TEXT NOT NULL,
    started_at        TEXT,
    finished_at       TEXT,
    num_params        INTEGER,
    median_val_error  REAL,                   -- median val error (%) of the last report_last epochs
    final_val_error   REAL,
    best_val_error    REAL,
    final_train_error REAL,
    images_per_s      REAL,                   -- mean training throughput
    train_seconds     REAL,                   -- wall time of the finishing attempt
    timings_json      TEXT                    -- harness breakdown: data / step / eval / log seconds
);
CREATE TABLE IF NOT EXISTS study_runs (
    study  TEXT NOT NULL REFERENCES studies(name),
    run_id INTEGER NOT NULL REFERENCES runs(id),
    UNIQUE (study, run_id)
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    epoch         INTEGER NOT NULL,           -- 1-based, across phases
    phase         TEXT NOT NULL,              -- pretrain | train
    lr            REAL,                       -- LR at the epoch's last step
    train_loss    REAL, train_error REAL,     -- running averages over the epoch (train mode)
    val_loss      REAL, val_error REAL,       -- eval mode, on the held-out split
    images_per_s  REAL,
    epoch_seconds REAL,
    data_seconds  REAL,                       -- time waiting on the loader
    step_seconds  REAL,                       -- forward + backward + optimizer
    eval_seconds  REAL,
    UNIQUE (run_id, epoch)
);
"""

RUN_SUMMARY_FIELDS = (
    "num_params",
    "median_val_error",
    "final_val_error",
    "best_val_error",
    "final_train_error",
    "images_per_s",
    "train_seconds",
)
EPOCH_FIELDS = (
    "phase",
    "lr",
    "train_loss",
    "train_error",
    "val_loss",
    "val_error",
    "images_per_s",
    "epoch_seconds",
    "data_seconds",
    "step_seconds",
    "eval_seconds",
)


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string with seconds."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def owner_id() -> str:
    """host:pid of this process, recorded on the runs it is running."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process named by an owner id still runs (unknowable on another host: True)."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def code_version() -> str:
    """`git describe` of the source tree when it is a checkout, else the package version.

    Read once per process (the store asks at import), so a run records the code its process
    loaded, not what the working tree holds by the time it is claimed.
    """
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "groupnorm " + version("groupnorm")
    except PackageNotFoundError:
        return "unknown"


def device_description(device: str) -> str:
    """What a run ran on, for its row: the device plus the CPU model and the vector ISA torch
    uses (CPU results are bit-identical only on the same kind of CPU), or the GPU's name."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        name = torch.cuda.get_device_name(dev)
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        return f"{device} ({name}, sm {cap}, CUDA {torch.version.cuda})"
    from groupnorm._sysinfo import cpu_model

    isa = torch.backends.cpu.get_cpu_capability()
    return f"{device} ({cpu_model() or 'unknown CPU'}, {isa})"


class Store:
    """A results database: runs, their epochs, and which studies they belong to."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits behind our back
        self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.executescript(SCHEMA)  # CREATE ... IF NOT EXISTS: idempotent, each atomic
        code_version()  # fix this process's code version now (it is cached)

    @property
    def checkpoint_dir(self) -> Path:
        """Where interrupted runs keep their last epoch checkpoint (next to the database)."""
        return self.path.parent / (self.path.stem + "-checkpoints")

    def checkpoint_path(self, config_hash: str) -> Path:
        """The checkpoint file of one run."""
        return self.checkpoint_dir / f"{config_hash}.pt"

    def close(self) -> None:
        """Fold the WAL back into the main file and close (leaves a single self-contained file)."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # --- meta -------------------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        """A JSON value from the meta table."""
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def append_meta(self, key: str, item: Any) -> None:
        """Append an item to the JSON list under ``key`` (one transaction)."""
        with self.transaction() as c:
            row = c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            items = [] if row is None else json.loads(row[0])
            items.append(item)
            c.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                      "SET value=excluded.value", (key, json.dumps(items, sort_keys=True)))

    # --- enqueueing -------------------------------------------------------------------------

    def add_study(self, name: str, kind: str, description: str = "", preset: str = "",
                  position: int = 0) -> None:
        """Create or update a study's row."""
        with self.transaction() as c:
            c.execute(
                "INSERT INTO studies(name, kind, description, preset, position) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET kind=excluded.kind, "
                "description=excluded.description, preset=excluded.preset, "
                "position=excluded.position",
                (name, kind, description, preset, position),
            )

    def enqueue(self, items: list[tuple[str, str, dict[str, Any]]]) -> list[int]:
        """Add (study, config_hash, config dict) triples in one transaction; returns run ids.

        A config already in the database (same hash) is not added again: it joins the study.
        """
        ids = []
        now = utc_now()
        with self.transaction() as c:
            for study, config_hash, config in items:
                c.execute(
                    "INSERT OR IGNORE INTO runs(config_hash, config_json, status, created_at) "
                    "VALUES (?, ?, 'queued', ?)",
                    (config_hash, json.dumps(config, sort_keys=True), now),
                )
                run_id = c.execute(
                    "SELECT id FROM runs WHERE config_hash = ?", (config_hash,)
                ).fetchone()[0]
                c.execute(
                    "INSERT OR IGNORE INTO study_runs(study, run_id) VALUES (?, ?)",
                    (study, run_id),
                )
                ids.append(run_id)
        return ids

    def retry_failed(self, run_ids: list[int] | None = None) -> int:
        """Put failed runs (all, or those in run_ids) back in the queue; returns how many."""
        with self.transaction() as c:
            if run_ids is None:
                cur = c.execute("UPDATE runs SET status='queued' WHERE status='failed'")
            else:
                marks = ",".join("?" * len(run_ids))
                cur = c.execute(
                    f"UPDATE runs SET status='queued' WHERE status='failed' AND id IN ({marks})",
                    run_ids,
                )
            return cur.rowcount

    # --- claiming and running ---------------------------------------------------------------

    def claim(self, run_id: int, device: str, torch_version: str) -> bool:
        """Mark a queued (or orphaned running) run as running by this process; False if taken."""
        with self.transaction() as c:
            row = c.execute("SELECT status, owner FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None or row["status"] in ("done", "failed"):
                return False
            if row["status"] == "running" and owner_alive(row["owner"]) and (
                row["owner"] != owner_id()
            ):
                return False
            c.execute(
                "UPDATE runs SET status='running', owner=?, attempts=attempts+1, started_at=?, "
                "error=NULL, code_version=?, torch_version=?, device=? WHERE id=?",
                (owner_id(), utc_now(), code_version(), torch_version, device, run_id),
            )
            return True

    def truncate_epochs(self, run_id: int, keep_through: int) -> int:
        """Drop epoch rows after `keep_through` (those not covered by the checkpoint)."""
        with self.transaction() as c:
            return c.execute(
                "DELETE FROM epochs WHERE run_id=? AND epoch>?", (run_id, keep_through)
            ).rowcount

    def add_epoch(self, run_id: int, epoch: int, metrics: dict[str, Any]) -> None:
        """Record one finished epoch (a duplicate (run, epoch) is an error, by the UNIQUE key)."""
        cols = ["run_id", "epoch", *EPOCH_FIELDS]
        vals = [run_id, epoch, *(metrics.get(k) for k in EPOCH_FIELDS)]
        with self.transaction() as c:
            c.execute(
                f"INSERT INTO epochs({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                vals,
            )

    def finish(self, run_id: int, summary: dict[str, Any], timings: dict[str, float]) -> None:
        """Mark a run done with its summary metrics."""
        sets = ", ".join(f"{k}=?" for k in RUN_SUMMARY_FIELDS)
        with self.transaction() as c:
            c.execute(
                f"UPDATE runs SET status='done', owner=NULL, finished_at=?, timings_json=?, "
                f"{sets} WHERE id=?",
                (
                    utc_now(),
                    json.dumps(timings, sort_keys=True),
                    *(summary.get(k) for k in RUN_SUMMARY_FIELDS),
                    run_id,
                ),
            )

    def fail(self, run_id: int, error: str) -> None:
        """Mark a run failed with its error text (its epoch rows are kept for diagnosis)."""
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status='failed', owner=NULL, finished_at=?, error=? WHERE id=?",
                (utc_now(), error, run_id),
            )

    def release(self, run_id: int) -> None:
        """Give a running run back to the queue (on Ctrl-C); its checkpoint stays."""
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status='queued', owner=NULL WHERE id=? AND status='running'",
                (run_id,),
            )

    # --- reading ------------------------------------------------------------------------------

    def runs(self, status: str | None = None, study: str | None = None) -> list[dict[str, Any]]:
        """Run rows as dicts (config parsed into 'config'), ordered by id."""
        sql = "SELECT r.* FROM runs r"
        args: list[Any] = []
        where = []
        if study is not None:
            sql += " JOIN study_runs s ON s.run_id = r.id"
            where.append("s.study = ?")
            args.append(study)
        if status is not None:
            where.append("r.status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.id"
        out = []
        for row in self.conn.execute(sql, args).fetchall():
            d = dict(row)
            d["config"] = json.loads(d["config_json"])
            out.append(d)
        return out

    def run(self, run_id: int) -> dict[str, Any]:
        """One run row as a dict."""
        row = self.conn.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run with id {run_id} in {self.path}")
        d = dict(row)
        d["config"] = json.loads(d["config_json"])
        return d

    def epochs(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Epoch rows (of one run, or all), ordered by run and epoch."""
        if run_id is None:
            rows = self.conn.execute("SELECT * FROM epochs ORDER BY run_id, epoch").fetchall()
        else:
            rows = self.conn.execute(
                "SELECT * FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)
            ).fetchall()
        return [dict(r) for r in rows]

    def studies(self) -> list[dict[str, Any]]:
        """Study rows, in preset order."""
        rows = self.conn.execute("SELECT * FROM studies ORDER BY position, name").fetchall()
        return [dict(r) for r in rows]

    def study_run_ids(self, study: str) -> list[int]:
        """Run ids of one study."""
        rows = self.conn.execute(
            "SELECT run_id FROM study_runs WHERE study=? ORDER BY run_id", (study,)
        ).fetchall()
        return [r[0] for r in rows]

    def counts(self, run_ids: list[int] | None = None) -> dict[str, int]:
        """Number of runs per status."""
        rows = self.conn.execute("SELECT id, status FROM runs").fetchall()
        out = {"queued": 0, "running": 0, "done": 0, "failed": 0}
        keep = None if run_ids is None else set(run_ids)
        for r in rows:
            if keep is None or r["id"] in keep:
                out[r["status"]] += 1
        return out
