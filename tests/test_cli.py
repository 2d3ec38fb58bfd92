"""The `groupnorm` command line: --help for every command, train/sweep/report end to end."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import groupnorm
from groupnorm.cli import build_parser, main

COMMANDS = ["train", "sweep", "report", "reproduce", "demo", "batch-noise"]
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
    with pytest.raises(SystemExit) as exc:
        main(["train", "--norm", "bn,gn"])
    assert exc.value.code == 2 and "use `groupnorm sweep` for grids" in capsys.readouterr().err


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


def test_reproduce_writes_to_the_presets_out_folder_without_out(tmp_path, capsys):
    # was: always results/<preset name>, so a renamed preset lost its evidence folder
    out = tmp_path / "evidence"
    preset = tmp_path / "tiny.toml"
    preset.write_text(f'description = "tiny"\nout = "{out.as_posix()}"\n[[study]]\n'
                      'name = "batch_size"\nkind = "batch"\n[study.grid]\nnorm = ["bn"]\n')
    assert main(["reproduce", "--preset", str(preset), *TINY, "--no-progress"]) == 0
    assert (out / "report.md").exists() and (out / "runs.db").exists()


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


# ---------------------------------------------------------------------------------------------
# one line for an expected error, a traceback with --debug, exit status that says what happened


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"groupnorm {groupnorm.__version__} (")


@pytest.mark.parametrize("args,words", [
    (["--set", "seed=abc"], "seed='abc': must be an integer >= 0"),  # was a formatting error
    (["--epochs", "0"], "epochs=0: must be an integer >= 1"),  # was "no median for empty data"
    (["--set", "lr=nan"], "lr=nan: must be a finite number > 0"),  # was run and recorded done
    (["--threads", "-3"], "num_threads=-3: must be an integer >= 1"),  # was accepted
    (["--norm", "gm"], "norm='gm': unknown norm"),
])
def test_bad_values_end_in_one_line_naming_the_field(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, *args, "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "t").exists()  # refused before anything ran


def test_debug_shows_the_traceback(tmp_path):
    from groupnorm.experiments.config import ConfigError

    with pytest.raises(ConfigError, match="lr=nan"):
        main(["train", *TINY, "--set", "lr=nan", "--debug", "--out", str(tmp_path / "t")])


def _tiny_preset(tmp_path: Path, text: str = "") -> Path:
    preset = tmp_path / "p.toml"
    preset.write_text(text or '[[study]]\nname = "s"\nkind = "batch"\n')
    return preset


@pytest.mark.parametrize("text,words", [
    ("[[study]\nname = 's'\n", "is not valid TOML"),
    ('[[study]]\nname = "s"\n[study.grid]\nnorm = "bn"\n',
     "study 's': grid value of 'norm' must be a non-empty list"),
    ('[[study]]\nkind = "batch"\n', "needs a name"),
    ('[[study]]\nname = "s"\nkind = "batchsize"\n', "kind='batchsize' is not one of"),
])
def test_a_malformed_preset_ends_in_one_line_naming_the_file(tmp_path, capsys, text, words):
    preset = _tiny_preset(tmp_path, text)
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(preset), "--db", str(tmp_path / "r.db"), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(preset) in err and words in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_corrupt_or_unwritable_database_ends_in_one_line_naming_the_file(tmp_path, capsys):
    preset = _tiny_preset(tmp_path)
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    for db, words in ((bad, "is not a results database"),
                      (bad / "runs.db", "cannot write the results database")):
        with pytest.raises(SystemExit) as exc:
            main(["sweep", str(preset), "--db", str(db), *TINY, "--no-progress"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and str(db) in err and words in err, err
        assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["report", str(bad), "--print"])
    assert "is not a results database" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_error_is_not_a_failed_run(tmp_path, capsys):
    """--device cuda without a GPU was queued, failed, the sweep exited 0 -- and the same sweep
    with --device cpu then said "1 failed" and ran nothing without --retry-failed."""
    preset, db = _tiny_preset(tmp_path), tmp_path / "r.db"
    args = ["sweep", str(preset), "--db", str(db), *TINY, "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    assert main([*args, "--device", "cpu"]) == 0
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT status FROM runs").fetchall() == [("done",)]


def test_a_sweep_with_failed_runs_exits_1(tmp_path, monkeypatch, capsys):
    import groupnorm.experiments.loop as loop

    real = loop.build_model

    def build(cfg, *a, **kw):
        if cfg.norm == "bn":
            raise RuntimeError("bn broke")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(loop, "build_model", build)
    preset, db = _tiny_preset(tmp_path), tmp_path / "r.db"
    args = ["sweep", str(preset), "--db", str(db), *TINY, "--norm", "bn,gn", "--no-progress"]
    assert main(args) == 1  # was 0 unless --strict
    out = capsys.readouterr().out
    assert "1 run(s) failed" in out and "--retry-failed" in out
    assert main(args) == 1  # still failed, still said


def test_report_prints_to_the_terminal(tmp_path, capsys):
    preset, db = _tiny_preset(tmp_path), tmp_path / "r.db"
    assert main(["sweep", str(preset), "--db", str(db), *TINY, "--norm", "bn,gn",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report", str(db), "--print"]) == 0
    out = capsys.readouterr().out
    assert "| norm | val error % (median of last epochs) |" in out and "| BN | " in out
    assert "![" not in out
    assert not list(tmp_path.glob("*.md")) and not list(tmp_path.glob("*.png"))


def test_train_records_its_files_and_resumes_only_a_matching_checkpoint(tmp_path, capsys,
                                                                         monkeypatch):
    """`groupnorm train` records through the same Recorder protocol as the database (it kept
    its own files and resume rule before): run.json has the data files read, and a checkpoint
    that does not match the folder is not resumed."""
    from groupnorm import data

    real = data.load_dataset

    def load(name, split="train", *args, **kwargs):
        ds = copy.copy(real(name, split, *args, **kwargs))
        ds.files = ((f"/data/{split}.bin", 123, "ab" * 32),)
        return ds

    monkeypatch.setattr(data, "load_dataset", load)
    out = tmp_path / "t"
    args = ["train", *TINY, "--epochs", "2", "--out", str(out)]
    assert main([*args, "--keep-checkpoint"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data_files"] == [{"path": f"/data/{s}.bin", "size": 123, "sha256": "ab" * 32}
                                 for s in ("test", "train")]
    assert run["num_params"] > 0 and run["config_hash"] and run["record_id"]
    # a checkpoint left by a run of this folder, damaged: discarded, the run starts over
    ckpt = out / "checkpoint.pt"
    blob = bytearray(ckpt.read_bytes())
    blob[-100] ^= 0xFF
    ckpt.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match=f"checkpoint {ckpt} was not resumed"):
        assert main(args) == 0
    rows = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and not ckpt.exists()
