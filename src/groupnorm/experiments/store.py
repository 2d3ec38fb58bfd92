"""The results store: one SQLite file (WAL) holding every run, its config and its epoch rows.

Invariants the sweep relies on (see sweep.py for the protocol):
- one row per config hash in `runs` (UNIQUE), one row per (run, epoch) in `epochs` (UNIQUE);
- every multi-row change happens inside one `BEGIN IMMEDIATE` transaction, so a SIGKILL leaves
  either all or none of it;
- status moves queued -> running -> done | failed; a `running` row whose owner process is gone
  is an interrupted run and is picked up again;
- the database has an id (meta `db_id`) that its runs' checkpoints carry: a checkpoint of a
  deleted database is never resumed into a new one;
- the write-ahead log is folded into the main file after every finished run and at close, so
  `runs.db` alone holds every finished run even after a SIGKILL (`export` writes a single-file
  copy that holds everything, the log included).

Errors opening or writing the file are :class:`StoreError`\\ s that name it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import TrainConfig, identity_of
from .recorder import EPOCH_FIELDS, RunInfo, RunResult
from .runtime import code_version, owner_id, owner_state, utc_now

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    name        TEXT PRIMARY KEY,        -- e.g. batch_size
    kind        TEXT NOT NULL,           -- what the report does with it (presets.STUDY_KINDS)
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
    timings_json      TEXT,                   -- harness breakdown: data / step / eval / log seconds
    data_files        TEXT,                   -- JSON [{path, size, sha256}] of the files read
    heartbeat_at      TEXT                    -- last claim or epoch of the owner (for --reclaim)
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

# columns added since the first databases were written: (table, column, type)
_ADDED_COLUMNS = (("runs", "data_files", "TEXT"), ("runs", "heartbeat_at", "TEXT"))

RUN_SUMMARY_FIELDS = ("num_params", "median_val_error", "final_val_error", "best_val_error",
                      "final_train_error", "images_per_s", "train_seconds")


class StoreError(Exception):
    """The results database cannot be opened, read or written; the message names the file."""


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


class Store:
    """A results database: runs, their epochs, and which studies they belong to."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        try:
            if readonly:
                self.conn = self._open_for_reading()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing commits behind
                self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            if not readonly:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at ckpts
                self.conn.execute("PRAGMA foreign_keys=ON")
                self._migrate()
            self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(self._why(exc)) from None
        code_version()  # fix this process's code version now (it is cached)

    def _open_for_reading(self) -> sqlite3.Connection:
        """A connection that never writes: read-write mode (so that SQLite removes its -wal and
        -shm files again at close) without schema changes, or read-only where the folder
        cannot be written."""
        if not self.path.is_file():
            raise StoreError(f"no results database at {self.path}")
        for mode in ("rw", "ro"):
            try:
                conn = sqlite3.connect(f"file:{self.path}?mode={mode}", uri=True, timeout=60.0,
                                       isolation_level=None)
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.OperationalError:
                if mode == "ro":
                    raise
        raise AssertionError("unreachable")

    def _why(self, exc: BaseException) -> str:
        text = str(exc)
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
            return (f"{self.path} is not a results database (SQLite says: {text}); move it "
                    "away or pass another --db")
        if "disk is full" in text or "No space" in text:
            return f"no space left to write {self.path} ({text}); free some and rerun"
        if "readonly" in text or "read-only" in text or isinstance(exc, OSError) or (
                "unable to open" in text):
            return (f"cannot write the results database {self.path} ({text}); check that its "
                    "folder exists and is writable, or pass another --db")
        return f"results database {self.path}: {text}"

    def _migrate(self) -> None:
        with self.transaction() as c:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            for table, column, kind in _ADDED_COLUMNS:
                have = {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('db_id', ?)",
                      (json.dumps(uuid.uuid4().hex),))

    @property
    def db_id(self) -> str:
        """This database's id, which its runs' checkpoints carry."""
        return str(self.get_meta("db_id", ""))

    @property
    def checkpoint_dir(self) -> Path:
        """Where interrupted runs keep their last epoch checkpoint (next to the database)."""
        return self.path.parent / (self.path.stem + "-checkpoints")

    def checkpoint_path(self, config_hash: str) -> Path:
        """The checkpoint file of one run."""
        return self.checkpoint_dir / f"{config_hash}.pt"

    def close(self) -> None:
        """Fold the WAL back into the main file and close (leaves a single self-contained file)."""
        if not self.readonly:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; errors name the file."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(self._why(exc)) from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise StoreError(self._why(exc)) from None
            raise

    def export(self, dest: str | Path) -> Path:
        """Write a single-file copy of the database (the WAL's content included) to `dest`."""
        dest = Path(dest)
        if dest.exists():
            raise StoreError(f"{dest} exists; export-db does not overwrite, pick a new name")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.conn.execute("VACUUM INTO ?", (str(dest),))
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot write {dest}: {exc}") from None
        return dest

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
                      "SET value=excluded.value", (key, _dumps(items)))

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

    def enqueue(self, items: list[tuple[str, TrainConfig]]) -> list[int]:
        """Add (study, config) pairs in one transaction; returns their run ids.

        A config already in the database (same hash) is not added again: it joins the study. A
        row under the same hash whose config differs in identity (recorded by an earlier version
        that did not count a field, e.g. num_threads) is refused: its numbers are not this run's.
        """
        ids = []
        now = utc_now()
        with self.transaction() as c:
            for study, cfg in items:
                config_hash = cfg.config_hash()
                row = c.execute("SELECT id, config_json FROM runs WHERE config_hash = ?",
                                (config_hash,)).fetchone()
                if row is None:
                    cur = c.execute("INSERT INTO runs(config_hash, config_json, status, "
                                    "created_at) VALUES (?, ?, 'queued', ?)",
                                    (config_hash, _dumps(cfg.to_dict()), now))
                    run_id = cur.lastrowid
                else:
                    run_id = row["id"]
                    _check_same_identity(self.path, run_id, json.loads(row["config_json"]), cfg)
                c.execute("INSERT OR IGNORE INTO study_runs(study, run_id) VALUES (?, ?)",
                          (study, run_id))
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
                    run_ids)
            return cur.rowcount

    # --- claiming and running ---------------------------------------------------------------

    def claim(self, run_id: int, device: str, torch_version: str, *,
              reclaim: bool = False) -> bool:
        """Mark a queued or orphaned run as running by this process; False if someone has it.

        A running run is orphaned when its owner is a process of this host that is gone; with
        `reclaim`, also when its owner is on another host (whose processes cannot be checked
        from here: the caller asserts they are gone). A live owner on this host keeps its run.
        """
        with self.transaction() as c:
            row = c.execute("SELECT status, owner FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None or row["status"] in ("done", "failed"):
                return False
            if row["status"] == "running" and row["owner"] != owner_id():
                state = owner_state(row["owner"])
                if state == "alive" or (state == "unknown" and not reclaim):
                    return False
            now = utc_now()
            c.execute(
                "UPDATE runs SET status='running', owner=?, attempts=attempts+1, started_at=?, "
                "heartbeat_at=?, error=NULL, code_version=?, torch_version=?, device=? "
                "WHERE id=?",
                (owner_id(), now, now, code_version(), torch_version, device, run_id))
            return True

    def recorder(self, run_id: int) -> StoreRecorder:
        """The Recorder that the training loop reports run `run_id` to."""
        return StoreRecorder(self, run_id)

    def truncate_epochs(self, run_id: int, keep_through: int) -> int:
        """Drop epoch rows after `keep_through` (those not covered by the checkpoint)."""
        with self.transaction() as c:
            return c.execute(
                "DELETE FROM epochs WHERE run_id=? AND epoch>?", (run_id, keep_through)).rowcount

    def start_run(self, run_id: int, info: RunInfo) -> None:
        """Record what a run read and how large its model is."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET data_files=?, num_params=? WHERE id=?",
                      (_dumps(info.data_files), info.num_params, run_id))

    def add_epoch(self, run_id: int, epoch: int, metrics: dict[str, Any]) -> None:
        """Record one finished epoch (a duplicate (run, epoch) is an error, by the UNIQUE key)."""
        cols = ["run_id", "epoch", *EPOCH_FIELDS]
        vals = [run_id, epoch, *(metrics.get(k) for k in EPOCH_FIELDS)]
        with self.transaction() as c:
            c.execute(
                f"INSERT INTO epochs({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                vals)
            c.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (utc_now(), run_id))

    def finish(self, run_id: int, summary: dict[str, Any], timings: dict[str, float]) -> None:
        """Mark a run done with its summary metrics, and fold the WAL into the main file."""
        sets = ", ".join(f"{k}=?" for k in RUN_SUMMARY_FIELDS)
        with self.transaction() as c:
            c.execute(
                f"UPDATE runs SET status='done', owner=NULL, finished_at=?, timings_json=?, "
                f"{sets} WHERE id=?",
                (utc_now(), _dumps(timings), *(summary.get(k) for k in RUN_SUMMARY_FIELDS),
                 run_id))
        # PASSIVE: never waits on other connections; whatever it cannot fold now, the next does
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def fail(self, run_id: int, error: str) -> None:
        """Mark a run failed with its error text (its epoch rows are kept for diagnosis)."""
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status='failed', owner=NULL, finished_at=?, error=? WHERE id=?",
                (utc_now(), error, run_id))

    def release(self, run_id: int, error: str | None = None) -> None:
        """Give a running run back to the queue (Ctrl-C, a setup error); its checkpoint stays."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='queued', owner=NULL, error=? WHERE id=? AND "
                      "status='running'", (error, run_id))

    # --- reading ------------------------------------------------------------------------------

    def runs(self, status: str | None = None, study: str | None = None) -> list[dict[str, Any]]:
        """Run rows as dicts (config parsed into 'config', data_files parsed), ordered by id."""
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
        return [_run_dict(row) for row in self.conn.execute(sql, args).fetchall()]

    def run(self, run_id: int) -> dict[str, Any]:
        """One run row as a dict."""
        row = self.conn.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run with id {run_id} in {self.path}")
        return _run_dict(row)

    def epochs(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Epoch rows (of one run, or all), ordered by run and epoch."""
        if run_id is None:
            rows = self.conn.execute("SELECT * FROM epochs ORDER BY run_id, epoch").fetchall()
        else:
            rows = self.conn.execute(
                "SELECT * FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)).fetchall()
        return [dict(r) for r in rows]

    def studies(self) -> list[dict[str, Any]]:
        """Study rows, in preset order."""
        rows = self.conn.execute("SELECT * FROM studies ORDER BY position, name").fetchall()
        return [dict(r) for r in rows]

    def study_run_ids(self, study: str) -> list[int]:
        """Run ids of one study."""
        rows = self.conn.execute(
            "SELECT run_id FROM study_runs WHERE study=? ORDER BY run_id", (study,)).fetchall()
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


def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["config"] = json.loads(d["config_json"])
    d["data_files"] = json.loads(d["data_files"]) if d.get("data_files") else None
    return d


def _check_same_identity(path: Path, run_id: int, stored: dict[str, Any],
                         cfg: TrainConfig) -> None:
    old, new = identity_of(stored), cfg.identity()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        what = ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
        raise StoreError(
            f"{path}: run {run_id} has this run's config hash but was recorded with {what} (by "
            "an earlier version that did not count those fields); its numbers are not this "
            "run's: use another --db, or set those fields to the recorded values")


class StoreRecorder:
    """One run of a results database, as the training loop's Recorder."""

    def __init__(self, store: Store, run_id: int) -> None:
        self.store, self.run_id = store, run_id

    @property
    def record_id(self) -> str:
        return self.store.db_id

    def recorded_rows(self) -> list[dict[str, Any]]:
        return self.store.epochs(self.run_id)

    def truncate(self, keep_through: int) -> None:
        self.store.truncate_epochs(self.run_id, keep_through)

    def start(self, info: RunInfo) -> None:
        self.store.start_run(self.run_id, info)

    def add_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        self.store.add_epoch(self.run_id, epoch, row)

    def finish(self, result: RunResult) -> None:
        self.store.finish(self.run_id, result.summary, result.timings)
