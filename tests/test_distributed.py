"""`torchrun --nproc_per_node=2 -m groupnorm train` on CPU (gloo): DDP, sharding, rank-0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import groupnorm
from groupnorm.experiments.config import make_config
from groupnorm.experiments.loop import train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# 256 synthetic 16 px images, a 4-channel SimpleNet, 2 epochs, no augmentation
FIELDS = {"dataset_options.n": 256, "dataset_options.image_size": 16,
          "dataset_options.channels": 1, "dataset_options.num_classes": 4, "val_size": 64,
          "model_options.width": 4, "model_options.hidden": 16, "report_last": 1,
          "augment": False}


def _torchrun(out: Path, norm: str, nproc: int = 2) -> tuple[str, str]:
    src = str(Path(groupnorm.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    sets = [a for k, v in FIELDS.items() for a in ("--set", f"{k}={str(v).lower()}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "-m", "groupnorm", "train", "--dataset", "synthetic", *sets,
           "--threads", "1", "--norm", norm, "--workers", "1", "--batch-size", "8",
           "--epochs", "2", "--out", str(out)]
    # own session, so that a hang can be ended with every worker torchrun started
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun did not finish in 120 s:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout, stderr


def test_two_process_torchrun_train(tmp_path):
    out = tmp_path / "ddp"
    stdout, _ = _torchrun(out, "gn")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    rows = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # written once, by rank 0 only
    assert stdout.count("median val error") == 1
    # the sampler shards: each rank takes 256 / 2 images per epoch, 8 per step -> 16 steps
    assert summary["timings"]["steps"] == 2 * 16
    assert all(r["val_error"] == r["val_error"] for r in rows)  # not NaN: rank 0 evaluated
    # 2 ranks x 8 images with averaged gradients = one process with W = 2 virtual workers of 8
    # (GN looks at one sample at a time, so how the 16 images are split does not matter)
    cfg = make_config({"dataset": "synthetic", "num_threads": 1, "norm": "gn", "workers": 2,
                       "batch_size": 8, "epochs": 2, "progress": False,
                       "dataset_options": {"n": 256, "image_size": 16, "channels": 1,
                                           "num_classes": 4},
                       "model_options": {"width": 4, "hidden": 16},
                       **{k: v for k, v in FIELDS.items() if "." not in k}})
    single = train(cfg, log=None)
    for got, want in zip(rows, single.epochs, strict=True):
        for key in ("train_loss", "val_loss", "val_error"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), (key, got, want)


def test_sweep_refuses_torchrun(tmp_path, monkeypatch):
    from groupnorm.experiments import ConfigError, load_preset, run_sweep

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="under torchrun use `groupnorm train`"):
        run_sweep(load_preset("quick"), tmp_path / "x.db", log=lambda m: None)
    assert not (tmp_path / "x.db").exists()
