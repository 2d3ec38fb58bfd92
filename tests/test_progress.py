"""`groupnorm status`: counts, running runs and the time left, from a database alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from groupnorm.cli import main
from groupnorm.experiments import Store
from groupnorm.experiments.config import make_config
from groupnorm.experiments.progress import estimate_left, status_text
from groupnorm.experiments.recorder import RunInfo

BASE = {"model": "resnet20", "model_options": {"width": 8}, "workers": 4, "epochs": 4,
        "train_size": 1000, "report_last": 2, "progress": False, "seed": 0}


def _epoch(seconds: float, phase: str = "train") -> dict:
    return {"phase": phase, "lr": 0.1, "train_loss": 1.0, "train_error": 50.0, "val_loss": 1.0,
            "val_error": 50.0, "images_per_s": 100.0, "epoch_seconds": seconds}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """#1 BN n=2 done (4 epochs: 10, 10, 10, 30 s); #2 BN n=2 running, 1 epoch of 4 recorded
    (20 s); #3 GN n=2 queued (no GN timed: BN's n=2 epochs stand in); #4 BN n=32 queued (no run
    at n=32 timed); #5 GN n=2 with 2 pretrain epochs at n=32 (untimed phase) and 4 at n=2."""
    path = tmp_path / "runs.db"
    with Store(path) as s:
        s.add_study("c1", "batch", "", "test", 0)
        s.add_study("ft", "finetune", "", "test", 1)
        cfgs = [make_config({**BASE, "norm": "bn", "batch_size": 2}),
                make_config({**BASE, "norm": "bn", "batch_size": 2, "seed": 1}),
                make_config({**BASE, "norm": "gn", "batch_size": 2}),
                make_config({**BASE, "norm": "bn", "batch_size": 32})]
        ids = s.enqueue([("c1", c) for c in cfgs])
        (ft,) = s.enqueue([("ft", make_config({**BASE, "norm": "gn", "batch_size": 2,
                                                "pretrain_epochs": 2,
                                                "pretrain_batch_size": 32}))])
        s.claim(ids[0], "cpu (test)", "2.x")
        s.start_run(ids[0], RunInfo(None, 100))
        for e, sec in enumerate((10.0, 10.0, 10.0, 30.0), 1):
            s.add_epoch(ids[0], e, _epoch(sec))
        s.finish(ids[0], {"median_val_error": 50.0, "train_seconds": 1.0}, {"steps": 1})
        s.claim(ids[1], "cpu (test)", "2.x")
        s.add_epoch(ids[1], 1, _epoch(20.0))
    assert ids + [ft] == [1, 2, 3, 4, 5]
    return path


def test_time_left_from_recorded_epochs_of_the_same_kind(db):
    with Store(db, readonly=True) as s:
        est = estimate_left(s.runs(), s.epochs())
    # BN n=2 epochs recorded: 10, 10, 10, 30 (run 1) and 20 (run 2): mean 16 s.
    # run 2: 3 epochs left -> 48 s; run 3 (GN, none timed): BN's n=2 mean, 4 x 16 = 64 s;
    # run 4 (n=32): untimed; run 5: its pretrain phase at n=32 is untimed -> the run is untimed.
    assert est.seconds == pytest.approx(48 + 64)
    assert (est.runs_timed, est.runs_untimed) == (2, 2)
    assert est.epochs_left == 3 + 4 + 4 + (2 + 4)


def test_status_text_names_counts_studies_running_runs_and_time_left(db):
    text = status_text(db, jobs=2)
    assert "5 runs — 1 done, 1 running, 3 queued, 0 failed" in text
    assert "c1     1 / 4" in text and "ft     0 / 1" in text
    assert "#2 bn n=2 seed 1: epoch 1 of 4" in text
    assert "the 2 timed ones take 2 min of epochs, about 1 min with 2 at a time" in text
    assert "2 more have no run of their kind" in text
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        status_text(db, jobs=0)


def test_status_command(db, capsys):
    assert main(["status", str(db), "--jobs", "2"]) == 0
    assert "1 running" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["status", str(db.parent / "missing.db")])
    assert exc.value.code != 0
    assert "no results database at" in capsys.readouterr().err
