"""Crash safety: SIGKILL a real sweep subprocess at random points, rerun it, compare.

The killed-and-rerun sweep must end with every run recorded exactly once, complete, with the
same per-epoch numbers as an uninterrupted sweep of the same preset (CPU, 1 thread) -- also when
what the crash left behind was damaged (a checkpoint with flipped bytes, rows lost, the database
deleted but not its checkpoints), when a worker process dies, and when only runs.db is copied.
Precise crash points come from tests/crash_at.py, which wraps the store from outside.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import groupnorm
from groupnorm.experiments import load_preset, run_sweep

PRESET = """
description = "tiny sweep for the crash-safety test"
[defaults]
model = "simplenet"
model_options = { width = 4, hidden = 32 }
norm_options = { num_groups = 2 }
dataset = "synthetic"
dataset_options = { n = 384, image_size = 16, channels = 1, num_classes = 4 }
val_size = 64
epochs = 3
workers = 2
batch_size = 4
report_last = 2
num_threads = 1
[[study]]
name = "batch"
kind = "batch"
[study.grid]
norm = ["bn", "gn"]
"""
METRICS = "epoch, phase, lr, train_loss, train_error, val_loss, val_error"


def _env() -> dict[str, str]:
    src = str(Path(groupnorm.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


CRASH_AT = Path(__file__).resolve().parent / "crash_at.py"


def _sweep_cmd(preset: Path, db: Path, crash: str | None = None) -> list[str]:
    """The sweep command line; with `crash` (POINT:K) it dies there as a SIGKILL would."""
    head = ([sys.executable, str(CRASH_AT), crash] if crash
            else [sys.executable, "-m", "groupnorm"])
    return [*head, "sweep", str(preset), "--db", str(db), "--no-progress"]


def _count(db: Path, sql: str) -> int:
    """A COUNT(*) on a database that a killed or running sweep may not have created yet."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute(sql).fetchone()[0]
    except sqlite3.Error:
        return 0


def _epoch_rows(db: Path) -> int:
    return _count(db, "SELECT COUNT(*) FROM epochs")


def _done_runs(db: Path) -> int:
    return _count(db, "SELECT COUNT(*) FROM runs WHERE status = 'done'")


def _snapshot(db: Path) -> dict:
    with sqlite3.connect(db) as c:
        runs = c.execute("SELECT config_hash, status, median_val_error, final_val_error "
                         "FROM runs ORDER BY config_hash").fetchall()
        epochs = c.execute(f"SELECT r.config_hash, {METRICS} FROM epochs e JOIN runs r "
                           "ON r.id = e.run_id ORDER BY r.config_hash, e.epoch").fetchall()
    return {"runs": runs, "epochs": epochs}


def test_sigkill_and_rerun_records_every_run_exactly_once(tmp_path):
    preset = tmp_path / "tiny.toml"
    preset.write_text(PRESET)
    ref_db, db = tmp_path / "ref.db", tmp_path / "killed.db"
    # the reference runs in this process: same code, same single thread, same numbers
    run_sweep(load_preset(preset), ref_db, log=lambda m: None)
    ref = _snapshot(ref_db)
    assert [r[1] for r in ref["runs"]] == ["done"] * 2
    assert len(ref["epochs"]) == 2 * 3

    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    kills, interrupted = [], []
    # kill twice, each time once some epochs are recorded plus a random delay; the second kill
    # may land after the last run was recorded (the process is still shutting down), so what
    # makes the test non-vacuous is that at least one kill left unfinished work behind
    for target in (rng.randint(1, 2), rng.randint(3, 5)):
        proc = subprocess.Popen(_sweep_cmd(preset, db), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while _epoch_rows(db) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills.append(_epoch_rows(db))
            interrupted.append(_done_runs(db) < len(ref["runs"]))
        proc.wait(timeout=30)
    assert any(interrupted), (f"no kill interrupted the sweep (seed {seed}, killed at epoch "
                              f"rows {kills})")
    done = subprocess.run(_sweep_cmd(preset, db), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    got = _snapshot(db)
    assert got["runs"] == ref["runs"], f"kill seed {seed}, killed at epoch rows {kills}"
    assert got["epochs"] == ref["epochs"], f"kill seed {seed}, killed at epoch rows {kills}"
    assert not list((tmp_path / "killed-checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_many_random_kills(tmp_path):
    """Ten kills at random moments (including during start-up and checkpoint writes)."""
    preset = tmp_path / "tiny.toml"
    preset.write_text(PRESET)
    ref_db, db = tmp_path / "ref.db", tmp_path / "killed.db"
    run_sweep(load_preset(preset), ref_db, log=lambda m: None)
    rng = random.Random(1234)
    for _ in range(10):
        proc = subprocess.Popen(_sweep_cmd(preset, db), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_sweep_cmd(preset, db), env=_env(), check=True, capture_output=True)
    assert _snapshot(db) == _snapshot(ref_db)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny preset swept without interruption: the numbers every crashed sweep must end on."""
    tmp = tmp_path_factory.mktemp("ref")
    preset = tmp / "tiny.toml"
    preset.write_text(PRESET)
    run_sweep(load_preset(preset), tmp / "ref.db", log=lambda m: None)
    return preset, _snapshot(tmp / "ref.db")


# (crash point, occurrence): after the 2nd epoch row before its checkpoint; halfway through
# writing the 2nd checkpoint file; after the 1st run is marked done, before its checkpoint goes.
CRASHES = ["epoch_row:2", "checkpoint_write:2", "finish:1"]


@pytest.mark.parametrize("crash", CRASHES)
def test_crash_in_each_window_then_rerun(tmp_path, reference, crash):
    """Crash (as SIGKILL would: no cleanup) exactly inside each window of the bookkeeping.

    A random kill rarely lands there; these are the windows that a checkpoint written in place
    (not temp + rename) or a resume that keeps epoch rows past the checkpoint would get wrong.
    """
    preset, ref = reference
    db = tmp_path / "crashed.db"
    proc = subprocess.run(_sweep_cmd(preset, db, crash), env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 137, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert _done_runs(db) < len(ref["runs"])
    ckpts = tmp_path / "crashed-checkpoints"
    if crash.startswith("checkpoint_write"):
        assert list(ckpts.glob(".*.tmp")), "the crash left a half-written temp file"
        assert list(ckpts.glob("*.pt")), "and the previous checkpoint in place"
    done = subprocess.run(_sweep_cmd(preset, db), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _snapshot(db) == ref
    assert not list(ckpts.glob("*.pt")) and not list(ckpts.glob(".*.tmp"))


def test_checkpoint_is_replaced_atomically(tmp_path):
    """A failed write leaves the previous checkpoint loadable (temp file + os.replace)."""
    from groupnorm.experiments.runtime import CheckpointKey, load_checkpoint, save_checkpoint

    path, key = tmp_path / "ck.pt", CheckpointKey("c0ffee", "db1")
    save_checkpoint(path, key, 1, {"rows": [1]})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, key, 2, {"rows": [1, 2], "bad": Boom()})
    assert load_checkpoint(path, key) == (1, {"rows": [1]})
    assert not list(tmp_path.glob(".*.tmp"))


def test_killed_parallel_sweep_leaves_no_workers_and_resumes(tmp_path, reference):
    """SIGKILL a --jobs 2 sweep: its worker processes stop too, and a rerun completes it."""
    preset, ref = reference
    db = tmp_path / "par.db"
    cmd = [*_sweep_cmd(preset, db), "--jobs", "2"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=False)
    deadline = time.monotonic() + 120
    while _epoch_rows(db) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    children = _children(proc.pid)
    assert children, "no worker processes found"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if _alive(c)], "workers outlived their sweep"
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _snapshot(db) == ref


def _children(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has exited


# ---------------------------------------------------------------------------------------------
# what a crash leaves behind, damaged


def _crash(preset: Path, db: Path, point: str) -> None:
    proc = subprocess.run(_sweep_cmd(preset, db, point), env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 137, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])


def _rerun(preset: Path, db: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(_sweep_cmd(preset, db), env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Flip `n` bytes inside the largest tensor of a checkpoint (torch's zip format: the file
    still loads, the weights are different)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    blob = bytearray(path.read_bytes())
    # the local header: 30 bytes + name + extra field, then the stored (uncompressed) data
    at = info.header_offset
    start = at + 30 + int.from_bytes(blob[at + 26:at + 28], "little")
    start += int.from_bytes(blob[at + 28:at + 30], "little")
    mid = start + info.file_size // 2
    blob[mid:mid + n] = bytes(b ^ 0x55 for b in blob[mid:mid + n])
    path.write_bytes(bytes(blob))


def test_a_checkpoint_with_flipped_bytes_is_not_resumed(tmp_path, reference):
    """Was: resumed, and the run recorded done with other numbers."""
    preset, ref = reference
    db = tmp_path / "crashed.db"
    _crash(preset, db, "epoch_row:2")  # checkpoint of epoch 1, row of epoch 2
    (ckpt,) = (tmp_path / "crashed-checkpoints").glob("*.pt")
    _flip_tensor_bytes(ckpt)
    done = _rerun(preset, db)
    assert _snapshot(db) == ref
    assert f"checkpoint {ckpt} was not resumed" in done.stderr
    assert "the file is damaged" in done.stderr


def test_a_checkpoint_ahead_of_the_stored_rows_is_not_resumed(tmp_path, reference):
    """Was: resumed after epoch 2 with only epoch 1's row stored (a row missing, and a summary
    over rows the database does not hold)."""
    preset, ref = reference
    db = tmp_path / "crashed.db"
    _crash(preset, db, "epoch_row:3")  # checkpoint of epoch 2, rows 1..3
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM epochs WHERE epoch >= 2")
    done = _rerun(preset, db)
    assert _snapshot(db) == ref
    assert "its epoch 2 does not match the 1 epoch row(s) recorded" in done.stderr


def test_a_new_database_beside_old_checkpoints_starts_its_runs_afresh(tmp_path, reference):
    """Deleting the database but not <db>-checkpoints/: was resumed into the new database,
    which then held only the epochs after the checkpoint."""
    preset, ref = reference
    db = tmp_path / "crashed.db"
    _crash(preset, db, "epoch_row:2")
    for p in tmp_path.glob("crashed.db*"):
        p.unlink()
    assert list((tmp_path / "crashed-checkpoints").glob("*.pt"))
    done = _rerun(preset, db)
    assert _snapshot(db) == ref
    assert "belongs to another results database" in done.stderr


def test_finished_runs_are_in_runs_db_alone_after_a_kill(tmp_path, reference):
    """After a SIGKILL the WAL held every result, so a copy of runs.db alone had none; now each
    finished run is folded into runs.db, and export-db copies everything into one file."""
    import shutil

    preset, ref = reference
    db = tmp_path / "crashed.db"
    _crash(preset, db, "epoch_row:4")  # run 1 done (3 epochs), run 2 has one epoch row
    alone = tmp_path / "copy" / "runs.db"
    alone.parent.mkdir()
    shutil.copy(db, alone)  # without crashed.db-wal
    assert _done_runs(alone) == 1
    export = tmp_path / "export.db"
    out = subprocess.run([sys.executable, "-m", "groupnorm", "export-db", str(db), str(export)],
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not Path(f"{export}-wal").exists()
    assert _epoch_rows(export) == 4 and _done_runs(export) == 1


def test_a_dead_worker_fails_only_its_run(tmp_path):
    """SIGKILL one worker of a --jobs 2 sweep (as the OOM killer would): its run is marked
    failed, every other run is done, the sweep exits 1 with no traceback (was: a
    BrokenProcessPool traceback, and the other runs left unfinished)."""
    preset = tmp_path / "four.toml"
    preset.write_text(PRESET.replace('norm = ["bn", "gn"]', 'norm = ["bn", "gn"]\nseed = [0, 1]'))
    db = tmp_path / "par.db"
    proc = subprocess.Popen([*_sweep_cmd(preset, db), "--jobs", "2"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.monotonic() + 180
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        if _epoch_rows(db) >= 1:
            with sqlite3.connect(db, timeout=5) as c:
                victim = c.execute("SELECT id, owner FROM runs WHERE status='running' "
                                   "ORDER BY id LIMIT 1").fetchone()
        time.sleep(0.05)
    assert victim is not None, "no run was seen running"
    os.kill(int(victim[1].rpartition(":")[2]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "BrokenProcessPool" not in stderr
    with sqlite3.connect(db) as c:
        status = dict(c.execute("SELECT id, status FROM runs").fetchall())
        error = c.execute("SELECT error FROM runs WHERE id=?", (victim[0],)).fetchone()[0]
    assert status.pop(victim[0]) == "failed" and "died" in error
    assert set(status.values()) == {"done"} and len(status) == 3
