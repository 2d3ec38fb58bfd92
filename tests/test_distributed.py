"""`torchrun --nproc_per_node=2 -m groupnorm train ...` on CPU (gloo): DDP, rank-0 writes."""

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

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def test_two_process_torchrun_train(tmp_path):
    src = str(Path(groupnorm.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", "-m", "groupnorm", "train",
           "--dataset", "synthetic", "--set", "dataset_options.n=256",
           "--set", "dataset_options.image_size=16", "--set", "dataset_options.channels=1",
           "--set", "dataset_options.num_classes=4", "--set", "val_size=64",
           "--set", "model_options.width=4", "--set", "model_options.hidden=16",
           "--set", "report_last=1", "--threads", "1", "--norm", "bn", "--workers", "1",
           "--batch-size", "8", "--epochs", "2", "--out", str(out)]
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
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    rows = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # written once, by rank 0 only
    # each rank takes 256 / 2 images per epoch, 8 per step: 16 steps of 8 per rank
    assert all(r["val_error"] == r["val_error"] for r in rows)  # not NaN: rank 0 evaluated
    assert stdout.count("median val error") == 1
