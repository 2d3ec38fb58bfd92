"""The `groupnorm` command line: --help for every command, train/sweep/report end to end."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import groupnorm
from groupnorm.cli import build_parser, main

COMMANDS = ["train", "sweep", "report", "reproduce", "demo"]
TINY = ["--dataset", "synthetic", "--set", "dataset_options.n=128",
        "--set", "dataset_options.image_size=16", "--set", "dataset_options.channels=1",
        "--set", "dataset_options.num_classes=4", "--set", "val_size=32",
        "--set", "model_options.width=4", "--set", "model_options.hidden=16",
        "--set", "norm_options.num_groups=2", "--set", "report_last=1", "--threads", "1",
        "--epochs", "1", "--workers", "2", "--batch-size", "4"]


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in [*COMMANDS, "bench"]:
        assert cmd in out
    assert "examples:" in out and "quick" in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: groupnorm {cmd}" in out
    assert "example" in out


def test_python_dash_m_help():
    src = str(Path(groupnorm.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    res = subprocess.run([sys.executable, "-m", "groupnorm", "sweep", "--help"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--retry-failed" in res.stdout


def test_bench_is_handed_over_or_explained(capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("groupnorm.bench") is not None:
        with pytest.raises(SystemExit) as exc:  # every argument goes to groupnorm.bench
            main(["bench", "--help"])
        assert exc.value.code == 0
        assert "bench" in capsys.readouterr().out
        return
    assert main(["bench"]) == 2
    assert "groupnorm bench is not available" in capsys.readouterr().err


def test_demo_prints_errors_vs_float64(capsys):
    assert main(["demo", "--shape", "2", "8", "4", "4", "4"]) == 0
    out = capsys.readouterr().out
    assert "max |err| vs float64" in out and "torch.nn.functional" in out


def test_bad_override_names_the_fields(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--set", "batchsize=2"])
    assert exc.value.code == 2
    assert "known fields" in capsys.readouterr().err


def test_train_rejects_grids(capsys):
    with pytest.raises(SystemExit, match="groupnorm sweep"):
        main(["train", "--norm", "bn,gn"])


def test_train_sweep_report(tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["train", *TINY, "--norm", "bn", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["median_val_error"] <= 100
    assert json.loads((out / "config.json").read_text())["norm"] == "bn"
    assert len((out / "epochs.jsonl").read_text().splitlines()) == 1
    assert not (out / "checkpoint.pt").exists()

    preset = tmp_path / "p.toml"
    preset.write_text('[[study]]\nname = "s"\nkind = "batch"\n')
    db = tmp_path / "runs.db"
    assert main(["sweep", str(preset), "--db", str(db), *TINY, "--norm", "bn,gn",
                 "--no-progress"]) == 0
    assert main(["report", str(db), "-o", str(tmp_path / "rep"), "--csv"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| BN | " in md and "| GN | " in md
    assert (tmp_path / "rep" / "runs.csv").exists()


def test_parser_builds_with_every_shipped_preset_named():
    text = build_parser().format_help()
    assert "quick" in text and "full" in text


def test_reproduce_end_to_end_on_a_tiny_preset(tmp_path, capsys):
    preset = tmp_path / "tiny.toml"
    preset.write_text('description = "tiny batch study"\n[[study]]\nname = "batch_size"\n'
                      'kind = "batch"\n[study.grid]\nnorm = ["bn", "gn"]\n'
                      'batch_size = [2, 4]\n')
    out = tmp_path / "rep"
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), *TINY[:-4],
                 "--workers", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "groupnorm reproduce --preset tiny: tiny batch study" in printed
    assert "| norm | n |" in printed and "| BN | 2 |" in printed  # the table, printed
    assert "Findings:" in printed and "BN error at n=2 − at n=4:" in printed
    assert "(paper: +7.4)" in printed  # beside the paper's claim
    assert "wall time" in printed and str(out / "report.md") in printed
    assert sorted(p.name for p in out.glob("*.png")) == ["batch_size_curves.png",
                                                         "batch_size_error_vs_batch.png"]
    with sqlite3.connect(out / "runs.db") as c:
        assert c.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 4
