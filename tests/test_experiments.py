"""Harness tests: config and overrides, LR scaling, virtual workers, the store, failures, reports.

Every training run here is tiny (synthetic 16 px images, a 4-channel SimpleNet, 1 thread).
The tests of "refuse bad input" and "never record a wrong number" each name the defect of the
harness before commit 853ce5e's successor that they guard against.
"""

from __future__ import annotations

import copy
import json
import math
import sqlite3
import typing
from pathlib import Path

import pytest
import torch

import groupnorm
from groupnorm.experiments import MemoryRecorder, Store, build_report, run_sweep, train
from groupnorm.experiments.config import (
    ConfigError,
    TrainConfig,
    make_config,
    parse_assignment,
    split_values,
)
from groupnorm.experiments.kinds import KINDS
from groupnorm.experiments.paper import paper_table
from groupnorm.experiments.presets import STUDY_KINDS, list_presets, load_preset, parse_preset
from groupnorm.experiments.recipe import lr_multiplier


def paper_value(kind: str, values: dict) -> float | None:
    return KINDS[kind].paper(values)

TINY = {
    "model": "simplenet",
    "model_options": {"width": 4, "hidden": 32},
    "norm_options": {"num_groups": 2},
    "dataset": "synthetic",
    "dataset_options": {"n": 192, "image_size": 16, "channels": 1, "num_classes": 4},
    "val_size": 64,
    "epochs": 2,
    "workers": 2,
    "batch_size": 4,
    "report_last": 2,
    "num_threads": 1,
    "progress": False,
}


def tiny(**kw) -> TrainConfig:
    return make_config({**TINY, **kw})


def tiny_preset(grid: dict, name: str = "tiny", kind: str = "batch", **defaults):
    return parse_preset({"defaults": {**TINY, **defaults},
                         "study": [{"name": name, "kind": kind, "grid": grid}]}, "tiny")


# ---------------------------------------------------------------------------------------------
# config


def test_overrides_parse_values_lists_and_dotted_keys():
    assert split_values("bn,gn") == ["bn", "gn"]
    assert split_values("2,4") == [2, 4]
    assert split_values("[0.5,0.75],[0.9]") == [[0.5, 0.75], [0.9]]
    assert parse_assignment("norm_options.num_groups=8") == ("norm_options.num_groups", [8])
    cfg = make_config({"lr": 1, "norm_options.num_groups": 8, "milestones": 0.5})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.norm_options == {"num_groups": 8} and cfg.milestones == [0.5]


def test_unknown_field_and_bad_values_name_the_fix():
    with pytest.raises(ValueError, match="unknown config field 'batchsize'.*batch_size"):
        parse_assignment("batchsize=2")
    with pytest.raises(ValueError, match="schedule='linear'"):
        make_config({"schedule": "linear"})
    with pytest.raises(ValueError, match="milestones"):
        make_config({"milestones": [30, 60]})


def test_config_hash_ignores_runtime_fields_only():
    a = tiny()
    assert a.config_hash() == tiny(device="cuda", progress=True).config_hash()
    assert a.config_hash() != tiny(seed=1).config_hash()
    assert a.config_hash() != tiny(norm="bn").config_hash()


@pytest.mark.parametrize("name", list_presets())
def test_shipped_presets_expand(name):
    preset = load_preset(name)
    points = preset.expand()
    assert points, name
    hashes = {p.config.config_hash() for p in points}
    assert len(hashes) <= len(points)


def test_fmnist_quick_preset_is_the_batch_study_on_real_fashion_mnist():
    cfgs = [p.config for p in load_preset("fmnist-quick").expand()]
    assert {c.dataset for c in cfgs} == {"fashion-mnist"}
    assert {c.norm for c in cfgs} == {"bn", "gn"}
    assert {c.batch_size for c in cfgs} == {2, 4, 8, 16, 32}
    assert len({c.seed for c in cfgs}) >= 2
    assert len(cfgs) == 20


@pytest.mark.parametrize("name,out", [("fmnist-quick", "results/quick"),
                                      ("fmnist-full", "results/full"),
                                      ("fmnist-long", "results/long"),
                                      ("full", "results/cifar10"),
                                      ("quick", "results/cifar10-quick")])
def test_renamed_presets_still_write_to_their_evidence(name, out):
    # the Fashion-MNIST presets were renamed when quick/full moved to CIFAR-10: without `out`,
    # `reproduce --preset full` would have added CIFAR-10 runs to the Fashion-MNIST results/full
    assert load_preset(name).out == out


def test_preset_out_must_be_a_folder_name():
    assert parse_preset({"out": "somewhere"}, "x").out == "somewhere"
    assert parse_preset({}, "x").out is None
    with pytest.raises(ConfigError, match="out=3: must be a folder name"):
        parse_preset({"out": 3}, "x")


def test_quick_preset_is_bn_at_the_two_ends_of_n_on_real_cifar10():
    # the paper's protocol on the full preset's net and data, BN only (no GN kernel to build,
    # and GN's claim is about converged nets): see the preset's header for the budget
    cfgs = [p.config for p in load_preset("quick").expand()]
    full = load_preset("full").defaults
    assert {c.dataset for c in cfgs} == {"cifar10-jpeg"}
    assert {c.norm for c in cfgs} == {"bn"}
    assert {c.batch_size for c in cfgs} == {2, 32}
    assert {c.seed for c in cfgs} == {0, 1}
    for c in cfgs:
        assert (c.model, c.model_options, c.train_size, c.workers, c.lr, c.schedule) == (
            full["model"], full["model_options"], full["train_size"], full["workers"],
            full["lr"], full["schedule"])


def test_command_line_axes_replace_or_extend_the_grid():
    preset = tiny_preset({"norm": ["bn", "gn"]})
    assert len(preset.expand({"seed": [0, 1, 2]})) == 6
    assert [p.config.norm for p in preset.expand({"norm": ["gn"]})] == ["gn"]


# ---------------------------------------------------------------------------------------------
# protocol: LR scaling and schedule


def test_lr_scales_linearly_with_images_per_worker():
    assert tiny(lr=0.1, batch_size=32).step_lr() == pytest.approx(0.1)
    assert tiny(lr=0.1, batch_size=2).step_lr() == pytest.approx(0.1 * 2 / 32)
    assert tiny(lr=0.1, batch_size=2, lr_scaling="none").step_lr() == pytest.approx(0.1)
    # the number of workers does not enter: W workers of n images, like the paper's 8 GPUs
    assert tiny(batch_size=8, workers=8).step_lr() == tiny(batch_size=8, workers=1).step_lr()


def test_lr_scaling_reaches_the_optimizer():
    for n in (2, 8):
        res = train(tiny(batch_size=n, epochs=1, schedule="constant"), log=None)
        assert res.epochs[0]["lr"] == pytest.approx(0.1 * n / 32)


def test_step_schedule_divides_by_ten_at_30_60_90_percent():
    cfg = tiny(schedule="step", milestones=[0.3, 0.6, 0.9])
    spe, epochs = 10, 100
    at = {e: lr_multiplier(cfg, e * spe, spe, epochs) for e in (0, 29, 30, 59, 60, 89, 90, 99)}
    assert at[0] == at[29] == 1.0
    assert at[30] == at[59] == pytest.approx(0.1)
    assert at[60] == at[89] == pytest.approx(0.01)
    assert at[90] == at[99] == pytest.approx(0.001)


def test_cosine_and_warmup():
    cfg = tiny(schedule="cosine", warmup_epochs=1.0, warmup_factor=0.1)
    assert lr_multiplier(cfg, 0, 10, 10) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 5, 10, 10) == pytest.approx((0.1 + 0.9 * 0.5)
                                                          * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert lr_multiplier(cfg, 100, 10, 10) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_on_gamma_beta_is_switchable():
    from groupnorm.experiments.recipe import param_groups

    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), groupnorm.norm_layer("gn", 4, num_groups=2))
    (all_,) = param_groups(m, 1e-4, wd_norm=True)
    assert len(all_["params"]) == 4 and all_["weight_decay"] == 1e-4
    decay, no_decay = param_groups(m, 1e-4, wd_norm=False)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0
    # and the optimizer the harness builds has those groups
    from groupnorm.experiments.recipe import make_optimizer

    gamma = m[1].weight
    for wd_norm, want in ((True, 1e-4), (False, 0.0)):
        opt = make_optimizer(tiny(wd_norm=wd_norm, weight_decay=1e-4), m, 0.1)
        (group,) = [g for g in opt.param_groups if any(p is gamma for p in g["params"])]
        assert group["weight_decay"] == want


def test_summary_is_the_median_of_the_last_k_epochs_of_the_final_phase():
    from groupnorm.experiments.loop import summarize

    rows = [{"phase": "pretrain", "val_error": 1.0, "train_error": 0.0, "images_per_s": 1.0}]
    rows += [{"phase": "train", "val_error": v, "train_error": 5.0, "images_per_s": 1.0}
             for v in (90.0, 10.0, 30.0, 20.0, 50.0, 100.0)]
    s = summarize(rows, report_last=5)
    assert s["median_val_error"] == 30.0  # median of 10, 30, 20, 50, 100 (mean: 42)
    assert summarize(rows, report_last=2)["median_val_error"] == 75.0
    # k larger than the phase: all its epochs, never the pretraining ones
    assert summarize(rows, report_last=10)["median_val_error"] == 40.0  # (30 + 50) / 2
    assert s["final_val_error"] == 100.0 and s["best_val_error"] == 10.0


# ---------------------------------------------------------------------------------------------
# virtual workers


def test_virtual_worker_bn_equals_bn_run_separately_on_each_chunk():
    torch.manual_seed(0)
    n, w, c = 3, 4, 6
    bn = groupnorm.norm_layer("bn", c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(w * n, c, 5, 5) * 2 + 1
    per_chunk = []
    for k in range(w):  # W separate "GPUs", each a fresh copy of the same layer
        worker = copy.deepcopy(bn)
        per_chunk.append(worker(x[k * n:(k + 1) * n]))
    expected = torch.cat(per_chunk)
    virtual = groupnorm.set_virtual_batch(copy.deepcopy(bn), n)
    torch.testing.assert_close(virtual(x), expected, rtol=1e-5, atol=1e-5)
    # ... and it is not plain BN over the whole batch
    assert not torch.allclose(copy.deepcopy(bn)(x), expected, atol=1e-3)


def test_gn_output_independent_of_virtual_workers():
    torch.manual_seed(0)
    gn = groupnorm.norm_layer("gn", 8, num_groups=4)
    x = torch.randn(8, 8, 4, 4)
    ref = gn(x)
    for n in (1, 2, 4):
        torch.testing.assert_close(groupnorm.set_virtual_batch(gn, n)(x), ref)
    torch.testing.assert_close(gn(x[:1]), ref[:1])  # per-sample: the batch plays no part


def test_harness_sets_virtual_batch_to_n(monkeypatch):
    seen = []
    real = groupnorm.set_virtual_batch

    def spy(model, n):
        seen.append(n)
        return real(model, n)

    monkeypatch.setattr(groupnorm, "set_virtual_batch", spy)
    train(tiny(norm="bn", workers=3, batch_size=2, epochs=1), log=None)
    train(tiny(norm="bn", workers=1, batch_size=6, epochs=1), log=None)
    assert seen == [2, None]


def test_same_step_batch_split_differently_changes_bn_not_gn():
    # W*n = 8 images per step either way; with lr_scaling off, only the BN chunking differs
    def err(norm, w, n):
        res = train(tiny(norm=norm, workers=w, batch_size=n, lr_scaling="none"), log=None)
        return [(e["train_loss"], e["val_loss"]) for e in res.epochs]

    assert err("gn", 2, 4) == err("gn", 4, 2)
    assert err("bn", 2, 4) != err("bn", 4, 2)


def test_same_seed_same_numbers_on_cpu():
    a = train(tiny(norm="bn"), log=None)
    b = train(tiny(norm="bn"), log=None)
    keys = ("train_loss", "train_error", "val_loss", "val_error")
    assert [[e[k] for k in keys] for e in a.epochs] == [[e[k] for k in keys] for e in b.epochs]
    c = train(tiny(norm="bn", seed=1), log=None)
    assert [e["train_loss"] for e in a.epochs] != [e["train_loss"] for e in c.epochs]


def test_pretrain_then_finetune_phases():
    res = train(tiny(norm="bn", pretrain_epochs=1, pretrain_batch_size=8, batch_size=2,
                     epochs=1), log=None)
    assert [e["phase"] for e in res.epochs] == ["pretrain", "train"]
    assert res.epochs[0]["lr"] == pytest.approx(0.1 * 8 / 32)  # pretraining LR: n=8
    assert res.epochs[1]["lr"] == pytest.approx(0.1 * 2 / 32)  # fine-tuning: n=2, fresh schedule
    assert res.summary["median_val_error"] == res.epochs[-1]["val_error"]


# ---------------------------------------------------------------------------------------------
# store and sweep


def test_sweep_records_each_run_once_and_skips_done_runs(tmp_path):
    preset = tiny_preset({"norm": ["bn", "gn"]}, epochs=1)
    db = tmp_path / "runs.db"
    assert run_sweep(preset, db, log=lambda m: None)["done"] == 2
    # a second study sharing a config reuses the run
    again = parse_preset({"defaults": {**TINY, "epochs": 1},
                          "study": [{"name": "other", "kind": "norms",
                                     "grid": {"norm": ["gn", "ln"]}}]}, "tiny2")
    assert run_sweep(again, db, log=lambda m: None)["done"] == 2
    with Store(db) as s:
        assert len(s.runs()) == 3
        assert sorted(len(s.study_run_ids(n)) for n in ("tiny", "other")) == [2, 2]
        assert len(s.epochs()) == 3
        with pytest.raises(sqlite3.IntegrityError):  # duplicates are impossible
            s.add_epoch(1, 1, {"phase": "train"})
    assert not any((tmp_path / "runs-checkpoints").glob("*.pt"))


def _fail_runs_with(monkeypatch, norm: str, error: Exception) -> None:
    """Make every run of `norm` raise `error` when its model is built (a run-time failure)."""
    import groupnorm.experiments.loop as loop

    real = loop.build_model

    def build(cfg, *args, **kwargs):
        if cfg.norm == norm:
            raise error
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "build_model", build)


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    _fail_runs_with(monkeypatch, "bn", RuntimeError("the bn run broke"))
    preset = tiny_preset({"norm": ["bn", "gn"]}, epochs=1, kind="grid")
    db = tmp_path / "runs.db"
    counts = run_sweep(preset, db, log=lambda m: None)
    assert counts["done"] == 1 and counts["failed"] == 1
    with Store(db) as s:
        (failed,) = s.runs(status="failed")
        assert "the bn run broke" in failed["error"]
        assert failed["attempts"] == 1
    # not retried unless asked
    assert run_sweep(preset, db, log=lambda m: None)["failed"] == 1
    with Store(db) as s:
        assert s.runs(status="failed")[0]["attempts"] == 1
    assert run_sweep(preset, db, retry_failed=True, log=lambda m: None)["failed"] == 1
    with Store(db) as s:
        assert s.runs(status="failed")[0]["attempts"] == 2
        assert len(s.runs(status="done")) == 1


class Stop(Exception):
    pass


class StopAt(MemoryRecorder):
    """A recorder whose process "dies" (raises Stop) when epoch `at` is recorded."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def add_epoch(self, epoch, row):
        super().add_epoch(epoch, row)
        if epoch == self.at:
            raise Stop


def test_resume_from_checkpoint_gives_the_uninterrupted_numbers(tmp_path):
    cfg = tiny(norm="bn", epochs=3)
    full = train(cfg, log=None)
    ckpt = tmp_path / "c.pt"
    rec = StopAt(2)
    with pytest.raises(Stop):
        train(cfg, rec, checkpoint=ckpt, log=None)
    assert [r["epoch"] for r in rec.rows] == [1, 2]  # row 2 recorded, its checkpoint not written
    rec.at = 0
    said = []
    res = train(cfg, rec, checkpoint=ckpt, log=said.append)
    assert any("resuming from epoch 1" in m for m in said)
    keys = ("train_loss", "train_error", "val_loss", "val_error", "lr")
    assert [[e[k] for k in keys] for e in res.epochs] == [[e[k] for k in keys]
                                                          for e in full.epochs]
    assert [[e[k] for k in keys] for e in rec.rows] == [[e[k] for k in keys]
                                                        for e in full.epochs]
    assert not ckpt.exists()


# ---------------------------------------------------------------------------------------------
# reports


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("report") / "runs.db"
    preset = tiny_preset({"norm": ["bn", "gn"], "batch_size": [2, 4], "seed": [0, 1]})
    run_sweep(preset, db, log=lambda m: None)
    return db


def test_report_tables_plots_and_csv(small_db, tmp_path):
    path = build_report(small_db, tmp_path / "rep", csv_export=True)
    md = path.read_text()
    assert "| norm | n | val error % (median of last epochs) |" in md
    assert "| BN | 2 |" in md and "| GN | 4 |" in md
    assert "34.7" in md and "27.3" in md  # the paper's BN at n=2 and n=4 beside ours
    assert "BN error at n=2 − at n=4:" in md and "(paper: +7.4)" in md
    assert " ± " in md and "| 2 |" in md  # mean ± std over 2 seeds
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs == ["tiny_curves.png", "tiny_error_vs_batch.png"]
    assert all((tmp_path / "rep" / p).stat().st_size > 1000 for p in pngs)
    runs_csv = (tmp_path / "rep" / "runs.csv").read_text().splitlines()
    assert len(runs_csv) == 1 + 8 and "config.norm" in runs_csv[0]
    assert len((tmp_path / "rep" / "epochs.csv").read_text().splitlines()) == 1 + 16


def test_sweep_records_device_code_version_and_wall_time(small_db, tmp_path):
    with Store(small_db) as s:
        runs = s.runs(status="done")
        sweeps = s.get_meta("sweeps")
    assert all(r["device"].startswith("cpu (") and r["code_version"] for r in runs)
    assert len({r["code_version"] for r in runs}) == 1  # read once per process
    assert len(sweeps) == 1 and sweeps[0]["counts"]["done"] == 8
    # one process ran the 8 runs one after another: the sweep took at least their sum
    assert sweeps[0]["wall_s"] >= 0.9 * sum(r["train_seconds"] for r in runs)
    md = build_report(small_db, tmp_path / "rep", plots=False).read_text()
    assert "- sweep wall time " in md and "over 1 invocation(s) of the sweep command (jobs 1)" in md


def test_report_is_deterministic(small_db, tmp_path):
    a = build_report(small_db, tmp_path / "a").read_bytes()
    assert build_report(small_db, tmp_path / "b").read_bytes() == a
    no_plots = build_report(small_db, tmp_path / "c", plots=False).read_bytes()
    assert b"![" not in no_plots and b"![" in a


def test_paper_reference_data():
    paper = paper_table()
    assert paper[("table2_batch", "n=2", "BN")] == 34.7
    assert paper[("table1_norms", "n=32", "GN")] == 24.1
    assert paper_value("groups", {"norm_options.num_groups": 1}) == 25.3
    assert paper_value("groups", {"norm_options.group_size": 1}) == 28.4
    assert paper_value("batch_renorm", {"norm": "brn", "batch_size": 4}) == 26.3
    assert paper_value("video", {"norm": "gn", "batch_size": 4}) == pytest.approx(27.2)
    assert json.dumps(paper_value("batch", {"norm": "bn", "batch_size": 64})) == "null"
    assert set(KINDS) == set(STUDY_KINDS)  # one place says how each kind of study is shown


def test_parallel_sweep_gives_the_sequential_numbers(tmp_path, small_db):
    preset = tiny_preset({"norm": ["bn", "gn"], "batch_size": [2, 4], "seed": [0, 1]})
    db = tmp_path / "par.db"
    counts = run_sweep(preset, db, jobs=2, log=lambda m: None)
    assert counts["done"] == 8

    def rows(path):
        with Store(path) as s:
            return sorted((r["config_hash"], r["median_val_error"], r["final_val_error"])
                          for r in s.runs())

    assert rows(db) == rows(small_db)


# every published results/<preset>/ (quick, full, long, ...)
PUBLISHED = sorted(p.parent.name for p in
                   (Path(__file__).resolve().parents[1] / "results").glob("*/report.md"))


def test_every_committed_results_database_has_its_report():
    """A results/<name>/runs.db without report.md would escape the check below."""
    root = Path(__file__).resolve().parents[1] / "results"
    dbs = sorted(p.parent.name for p in root.glob("*/runs.db"))
    assert [name for name in dbs if name not in PUBLISHED] == []


@pytest.mark.parametrize("preset", PUBLISHED or ["quick"])
def test_committed_report_matches_its_database(tmp_path, preset):
    """results/<preset>/report.md is exactly what `groupnorm report` makes of the committed db."""
    import shutil

    root = Path(__file__).resolve().parents[1] / "results" / preset
    if not (root / "report.md").exists():
        pytest.skip(f"results/{preset}/report.md is not in this checkout (not published yet)")
    db = tmp_path / "runs.db"
    shutil.copy(root / "runs.db", db)  # a copy: opening the store must not touch the repo
    md = build_report(db, tmp_path / "rep").read_text(encoding="utf-8")
    assert md == (root / "report.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# bad input is refused before anything is queued


@pytest.mark.parametrize("field,value,fix", [
    ("lr", math.nan, "finite number > 0"),  # was run and recorded done, config_json with NaN
    ("lr", math.inf, "finite number > 0"),
    ("lr", -0.1, "finite number > 0"),
    ("momentum", 5.0, r"\[0, 1\)"),  # was run and recorded done
    ("weight_decay", math.nan, "finite number >= 0"),  # was run and recorded done
    ("seed", "abc", "an integer >= 0"),  # was "not all arguments converted ..." at run time
    ("epochs", 0, "integer >= 1"),  # was "no median for empty data" at run time
    ("num_threads", -3, "integer >= 1"),  # was accepted
    ("batch_size", True, "an integer >= 1"),
    ("label_smoothing", 1.0, r"\[0, 1\)"),
    ("device", "gpu", "cpu, cuda or cuda:K"),
])
def test_bad_values_are_refused_naming_field_value_and_fix(field, value, fix):
    with pytest.raises(ConfigError, match=rf"^{field}=.*: must be .*{fix}") as err:
        tiny(**{field: value})
    assert "\n" not in str(err.value)


def test_values_from_the_command_line_are_checked_the_same_way():
    key, values = parse_assignment("lr=nan")
    with pytest.raises(ConfigError, match="lr=nan"):
        make_config({**TINY, key: values[0]})
    key, values = parse_assignment("seed=abc")
    with pytest.raises(ConfigError, match="seed='abc': must be an integer >= 0"):
        make_config({**TINY, key: values[0]})
    assert make_config({**TINY, "norm": None}).norm == "none"  # `--norm none` is a name


def test_num_threads_is_part_of_the_identity_with_a_fixed_default():
    # 1 vs 2 threads split float sums differently, so they are different runs; the default
    # (was 0: all cores, a property of the machine) is a fixed number
    assert TrainConfig().num_threads == 1
    assert tiny(num_threads=1).config_hash() != tiny(num_threads=2).config_hash()
    assert "num_threads" in tiny().identity()


@pytest.mark.parametrize("preset", PUBLISHED or ["quick"])
def test_committed_runs_keep_their_config_hash(preset):
    """Adding num_threads to the identity left every recorded run's hash as it was."""
    db = Path(__file__).resolve().parents[1] / "results" / preset / "runs.db"
    if not db.exists():
        pytest.skip(f"results/{preset} is not in this checkout")
    with Store(db, readonly=True) as s:
        runs = s.runs()
    assert runs
    for r in runs:
        assert make_config(r["config"]).config_hash() == r["config_hash"], r["id"]


def test_a_row_recorded_under_the_same_hash_with_other_threads_is_refused(tmp_path):
    from groupnorm.experiments import StoreError

    db = tmp_path / "runs.db"
    with Store(db) as s:
        s.add_study("s", "grid")
        (run_id,) = s.enqueue([("s", tiny())])
        # as an earlier version recorded it: num_threads was not part of the hash
        s.conn.execute("UPDATE runs SET config_json = json_set(config_json, '$.num_threads', 2)")
        with pytest.raises(StoreError, match=r"num_threads=2 there, 1 now"):
            s.enqueue([("s", tiny())])


def test_unknown_norm_option_is_refused(tmp_path):
    preset = tiny_preset({"norm": ["bn", "gn"]}, norm_options={"num_group": 2})
    with pytest.raises(ConfigError, match=r"no norm takes \['num_group'\].*did you mean "
                                          r"'num_groups'"):
        run_sweep(preset, tmp_path / "runs.db", log=lambda m: None)
    assert not (tmp_path / "runs.db").exists()  # nothing was queued (was: ignored, runs done)
    # an option of another kind of the family is fine: num_groups for BN in a BN-vs-GN grid
    from groupnorm.experiments.recipe import NormSpec

    assert NormSpec.resolve("bn", {"num_groups": 2}).options == ()
    assert NormSpec.resolve("gn+ws", {"num_groups": 2}).options == (("num_groups", 2),)


@pytest.mark.parametrize("change,message", [
    ({"norm": "gm"}, "norm='gm': unknown norm"),
    ({"model": "simplnet"}, "model='simplnet': unknown model.*did you mean 'simplenet'"),
    ({"dataset": "synthetc"}, "dataset='synthetc': unknown dataset.*did you mean 'synthetic'"),
    ({"dataset_options": {"n": 192, "size": 16}}, r"dataset_options=.*takes .*not \['size'\]"),
    ({"norm_options": {"num_groups": 3}}, r"num_channels \(4\) must be divisible by num_groups "
                                          r"\(3\)"),
    ({"model_options": {"width": 4, "depth": 3}}, "model='simplenet'.*depth"),
])
def test_a_grid_point_that_cannot_run_stops_the_sweep_before_anything_is_queued(
        tmp_path, change, message):
    # was: queued, failed at train time, the sweep exited 0
    preset = tiny_preset({"seed": [0, 1]}, **change)
    with pytest.raises(ConfigError, match=message):
        run_sweep(preset, tmp_path / "runs.db", log=lambda m: None)
    assert not (tmp_path / "runs.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without "
                    "a GPU")
def test_a_device_without_cuda_stops_the_sweep_before_anything_is_queued(tmp_path):
    preset = tiny_preset({"norm": ["gn"]}, device="cuda")
    with pytest.raises(ConfigError, match="device='cuda': CUDA is not available.*device=cpu"):
        run_sweep(preset, tmp_path / "runs.db", log=lambda m: None)
    assert not (tmp_path / "runs.db").exists()


def test_a_setup_error_met_by_a_run_is_not_a_run_failure(tmp_path, monkeypatch):
    """A config error that only the run can see (here: a training set smaller than one step)
    puts the run back in the queue and stops the sweep; the next sweep runs it without
    --retry-failed (was: marked failed, skipped by every later sweep)."""
    from groupnorm.experiments.sweep import SweepStopped

    preset = tiny_preset({"norm": ["gn"]}, epochs=1)
    db = tmp_path / "runs.db"
    _fail_runs_with(monkeypatch, "gn", ConfigError("train_size=4: smaller than one step"))
    with pytest.raises(SweepStopped, match=r"run 1 \(tiny .*\): train_size=4.*queued again"):
        run_sweep(preset, db, log=lambda m: None)
    with Store(db) as s:
        (run,) = s.runs()
        assert run["status"] == "queued" and "train_size=4" in run["error"]
    monkeypatch.undo()
    assert run_sweep(preset, db, log=lambda m: None)["done"] == 1


def test_a_full_disk_stops_the_sweep_naming_the_file(tmp_path, monkeypatch):
    import errno

    import groupnorm.experiments.runtime as rt
    from groupnorm.experiments.sweep import SweepStopped

    def full(path, blob):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rt, "replace_file", full)
    db = tmp_path / "runs.db"
    with pytest.raises(SweepStopped, match=r"No space left on device: '.*runs-checkpoints/"):
        run_sweep(tiny_preset({"norm": ["gn"]}, epochs=1), db, log=lambda m: None)
    with Store(db) as s:
        assert [r["status"] for r in s.runs()] == ["queued"]  # was: failed


# ---------------------------------------------------------------------------------------------
# what a run read, and checkpoints that must not be resumed


class DataFile(typing.NamedTuple):
    path: str
    size: int
    sha256: str


def _with_files(monkeypatch, tag: str) -> list[dict]:
    """Make load_dataset return datasets that say which files they were read from."""
    from groupnorm import data

    real = data.load_dataset

    def load(name, split="train", *args, **kwargs):
        ds = real(name, split, *args, **kwargs)
        ds = copy.copy(ds)
        ds.files = (DataFile(f"/data/{split}-images.gz", 1000 + len(tag), tag * 64),)
        return ds

    monkeypatch.setattr(data, "load_dataset", load)
    return [{"path": f"/data/{s}-images.gz", "size": 1000 + len(tag), "sha256": tag * 64}
            for s in ("test", "train")]


def test_each_run_records_its_data_files_and_the_report_shows_them(tmp_path, monkeypatch):
    files = _with_files(monkeypatch, "a")
    db = tmp_path / "runs.db"
    run_sweep(tiny_preset({"norm": ["gn"]}, epochs=1), db, log=lambda m: None)
    with Store(db) as s:
        assert s.runs()[0]["data_files"] == files
    md = build_report(db, tmp_path / "rep", plots=False, csv_export=True).read_text()
    assert "- data files: test-images.gz 1001 B sha256 aaaaaaaaaaaaaaaa; train-images.gz" in md
    assert "/data/train-images.gz" in (tmp_path / "rep" / "runs.csv").read_text()


def test_a_checkpoint_of_other_data_files_is_not_resumed(tmp_path, monkeypatch):
    cfg = tiny(norm="bn", epochs=3)
    ckpt = tmp_path / "c.pt"
    _with_files(monkeypatch, "a")
    rec = StopAt(2)
    with pytest.raises(Stop):
        train(cfg, rec, checkpoint=ckpt, log=None)
    files_b = _with_files(monkeypatch, "b")  # the files changed under the same config
    rec.at = 0
    with pytest.warns(UserWarning, match=rf"checkpoint {ckpt} was not resumed: it was written "
                                         "for other data files"):
        res = train(cfg, rec, checkpoint=ckpt, log=None)
    assert [r["epoch"] for r in rec.rows] == [1, 2, 3]  # all from this data: started over
    assert rec.info.data_files == files_b and len(res.epochs) == 3


def test_a_damaged_checkpoint_is_discarded_and_the_run_restarts(tmp_path):
    cfg = tiny(norm="bn", epochs=3)
    full = train(cfg, log=None)
    ckpt = tmp_path / "c.pt"
    rec = StopAt(2)
    with pytest.raises(Stop):
        train(cfg, rec, checkpoint=ckpt, log=None)
    blob = bytearray(ckpt.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])
    ckpt.write_bytes(bytes(blob))
    rec.at = 0
    with pytest.warns(UserWarning, match="does not match its SHA-256: the file is damaged"):
        res = train(cfg, rec, checkpoint=ckpt, log=None)
    keys = ("train_loss", "val_loss", "val_error", "lr")
    assert [[e[k] for k in keys] for e in res.epochs] == [[e[k] for k in keys]
                                                          for e in full.epochs]


def test_a_checkpoint_ahead_of_the_recorded_rows_is_not_resumed(tmp_path):
    cfg = tiny(norm="bn", epochs=3)
    ckpt = tmp_path / "c.pt"
    rec = StopAt(3)
    with pytest.raises(Stop):
        train(cfg, rec, checkpoint=ckpt, log=None)  # checkpoint of epoch 2
    rec.rows = rec.rows[:1]  # the record lost epoch 2 (was: resumed, a row missing)
    rec.at = 0
    with pytest.warns(UserWarning, match="its epoch 2 does not match the 1 epoch row"):
        train(cfg, rec, checkpoint=ckpt, log=None)
    assert [r["epoch"] for r in rec.rows] == [1, 2, 3]


def test_a_checkpoint_of_another_record_is_not_resumed(tmp_path):
    cfg = tiny(norm="bn", epochs=2)
    ckpt = tmp_path / "c.pt"
    with pytest.raises(Stop):
        train(cfg, StopAt(2), checkpoint=ckpt, log=None)
    other = MemoryRecorder()  # e.g. a new database with the old checkpoint folder beside it
    other.rows = [{"epoch": 1, "phase": "train"}]
    with pytest.warns(UserWarning, match="belongs to another results database or run folder"):
        train(cfg, other, checkpoint=ckpt, log=None)
    assert [r["epoch"] for r in other.rows] == [1, 2]


# ---------------------------------------------------------------------------------------------
# the report follows what was run


def test_report_shows_no_spread_for_a_single_seed(tmp_path):
    db = tmp_path / "runs.db"
    run_sweep(tiny_preset({"norm": ["bn", "gn"], "batch_size": [2, 4]}, epochs=1), db,
              log=lambda m: None)
    md = build_report(db, tmp_path / "rep", plots=False).read_text()
    assert "GN − BN error at n=2: " in md and "points over 1 seed" in md
    assert "± 0.0" not in md  # was: "± 0.0 points over 1 seed(s)"


def test_study_text_follows_the_overrides_used(tmp_path):
    preset = parse_preset({"defaults": {**TINY, "epochs": 3}, "study": [{
        "name": "s", "kind": "batch", "grid": {"norm": ["bn", "gn"], "seed": [0, 1]},
        "description": "BN vs GN, {epochs} epochs for every n, {n_seeds} seeds, norms {norm}."}]},
        "tiny")
    db = tmp_path / "runs.db"
    run_sweep(preset, db, overrides={"epochs": [1], "seed": [0]}, log=lambda m: None)
    md = build_report(db, tmp_path / "rep", plots=False).read_text()
    assert "BN vs GN, 1 epochs for every n, 1 seeds, norms bn, gn." in md  # not 3 and 2


def test_published_numbers_are_read_once(small_db, tmp_path, monkeypatch):
    from groupnorm.experiments import paper

    reads = []
    real = paper._read
    monkeypatch.setattr(paper, "_read", lambda name: reads.append(name) or real(name))
    paper.published.cache_clear()
    build_report(small_db, tmp_path / "rep", plots=True)
    assert sorted(reads) == ["gn_paper_imagenet.csv", "published_other.csv"]  # was: per cell
    paper.published.cache_clear()


def test_reclaim_takes_over_runs_of_a_process_on_another_host(tmp_path):
    preset = tiny_preset({"norm": ["gn"]}, epochs=1)
    db = tmp_path / "runs.db"
    with Store(db) as s:
        s.add_study("tiny", "batch")
        (run_id,) = s.enqueue([("tiny", preset.expand()[0].config)])
        s.conn.execute("UPDATE runs SET status='running', owner='elsewhere:4242', "
                       "heartbeat_at='2026-01-01T00:00:00+00:00'")
    said = []
    assert run_sweep(preset, db, log=said.append)["running"] == 1  # it may be alive: kept
    assert any("elsewhere:4242 (last heartbeat 2026-01-01" in m and "--reclaim" in m
               for m in said)
    assert run_sweep(preset, db, reclaim=True, log=lambda m: None)["done"] == 1


# ---------------------------------------------------------------------------------------------
# channels-last runs, the curve subset of the val set, the dataset variant


def _watch_model(monkeypatch) -> list[tuple[bool, int, bool, bool]]:
    """Record (training?, batch size, input channels-last?, conv weights channels-last?) for
    every forward of the model the harness builds."""
    from groupnorm.experiments import loop

    seen: list[tuple[bool, int, bool, bool]] = []
    real = loop.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

        def hook(mod, inputs):
            (x,) = inputs
            seen.append((mod.training, x.shape[0],
                         x.is_contiguous(memory_format=torch.channels_last),
                         all(c.weight.is_contiguous(memory_format=torch.channels_last)
                             for c in convs)))

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", build)
    return seen


def test_channels_last_runs_model_and_batches_channels_last(monkeypatch):
    # was: no such field (a config error); the model and every batch were NCHW
    seen = _watch_model(monkeypatch)
    cl = train(tiny(norm="bn", channels_last=True, dataset_options={
        **TINY["dataset_options"], "channels": 3}), log=None)
    assert seen and all(x_cl and w_cl for _, _, x_cl, w_cl in seen)
    assert {training for training, *_ in seen} == {True, False}  # train and eval batches
    seen.clear()
    nchw = train(tiny(norm="bn", dataset_options={**TINY["dataset_options"], "channels": 3}),
                 log=None)
    assert seen and not any(x_cl for _, _, x_cl, _ in seen)
    # the same training: only the order of float sums differs
    for a, b in zip(cl.epochs, nchw.epochs, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_channels_last_and_the_curve_subset_are_identity_without_changing_old_hashes():
    # was: no such fields; a config recorded before them (no key) must keep its hash
    base = tiny()
    old = base.to_dict()
    del old["channels_last"], old["val_curve_size"]
    assert make_config(old).config_hash() == base.config_hash()
    assert tiny(channels_last=True).config_hash() != base.config_hash()
    assert tiny(val_curve_size=16).config_hash() != base.config_hash()
    assert tiny(dataset="cifar10").config_hash() != tiny(dataset="cifar10-jpeg").config_hash()
    with pytest.raises(ConfigError, match="val_curve_size=0: must be an integer >= 1"):
        tiny(val_curve_size=0)


def test_the_curves_use_the_subset_and_the_reported_epochs_the_whole_val_set(monkeypatch):
    # was: no such field; evaluating the whole val set every epoch costs 19-31 % of an epoch
    seen = _watch_model(monkeypatch)
    res = train(tiny(epochs=5, report_last=2, val_size=64, val_curve_size=16,
                     eval_batch_size=1000), log=None)
    evals = [n for training, n, *_ in seen if not training]
    assert evals == [16, 16, 16, 64, 64]  # one eval batch per epoch: the subset, then all
    last = [e["val_error"] for e in res.epochs[-2:]]
    assert res.summary["median_val_error"] == pytest.approx(sum(last) / 2)
    assert res.summary["best_val_error"] == min(last)  # never a subset epoch's number
    seen.clear()
    train(tiny(epochs=3, report_last=2, val_size=64), log=None)
    assert [n for training, n, *_ in seen if not training] == [64, 64, 64]
    # the fine-tuning phases: the last report_last epochs of the final phase see everything
    seen.clear()
    train(tiny(pretrain_epochs=2, pretrain_batch_size=8, epochs=2, report_last=1, val_size=64,
               val_curve_size=16), log=None)
    assert [n for training, n, *_ in seen if not training] == [16, 16, 16, 64]


def test_channels_last_through_a_conv_that_torch_breaks_is_refused(tmp_path):
    # torch 2.13's CPU backward of a strided 1x1 conv over 2-7 channels-last channels corrupts
    # the heap (resnet20 width 4 died with "double free or corruption" in this file's tests)
    cfg = tiny(model="resnet20", model_options={"width": 4}, channels_last=True)
    with pytest.raises(ConfigError, match=r"layer layer2\.0\.shortcut\.0 is a strided 1x1 "
                                          r"convolution over 4 channels.*width of at least 8"):
        run_sweep(tiny_preset({"norm": ["gn"]}, model="resnet20", model_options={"width": 4},
                              channels_last=True), tmp_path / "runs.db", log=lambda m: None)
    with pytest.raises(ConfigError, match="strided 1x1 convolution over 4 channels"):
        train(cfg, log=None)  # `groupnorm train` builds no grid: the loop checks too
    from groupnorm.experiments.recipe import check

    check(tiny(model="resnet20", model_options={"width": 8}, channels_last=True))
    check(tiny(model="resnet20", model_options={"width": 4}))  # NCHW is fine


def test_report_names_the_dataset_variant_and_the_run_settings(tmp_path):
    # was: the variant showed only in each study's setup line, and nothing said channels-last
    db = tmp_path / "runs.db"
    run_sweep(tiny_preset({"norm": ["gn"]}, epochs=2, report_last=1, channels_last=True,
                          val_curve_size=16), db, log=lambda m: None)
    md = build_report(db, tmp_path / "rep", plots=False).read_text()
    assert "- datasets: `synthetic`, 1 runs" in md  # a title only where it says more
    assert ("the epochs before those evaluated on a fixed val subset of 16 images (the curves "
            "only); channels-last model and batches" in md)


@pytest.mark.slow
def test_a_cifar10_jpeg_run_records_the_archive_it_read(monkeypatch):
    """A real run on cifar10-jpeg (needs the archive: GROUPNORM_DATA or ../shared/data)."""
    import hashlib
    import os

    from groupnorm.data import catalog

    bases = [Path(p) for p in os.environ.get("GROUPNORM_DATA", "").split(os.pathsep) if p]
    bases.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    archive = next((b / catalog.CIFAR10_JPEG_ARCHIVE for b in bases
                    if (b / catalog.CIFAR10_JPEG_ARCHIVE).is_file()), None)
    if archive is None:
        pytest.skip("cifar10-jpeg.tar.gz not found (GROUPNORM_DATA, ../shared/data)")
    monkeypatch.setenv("GROUPNORM_DATA", str(archive.parent))
    rec = MemoryRecorder()
    train(make_config({"model": "resnet20", "model_options": {"width": 8}, "norm": "gn",
                       "norm_options": {"num_groups": 2}, "dataset": "cifar10-jpeg",
                       "train_size": 64, "val_size": 40, "epochs": 1, "workers": 2,
                       "batch_size": 8, "report_last": 1, "channels_last": True,
                       "progress": False}), rec, log=None)
    assert rec.info is not None and rec.info.data_files is not None
    (f,) = rec.info.data_files  # one archive holds both splits
    assert Path(f["path"]).name == "cifar10-jpeg.tar.gz" and f["size"] == archive.stat().st_size
    assert f["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_code_version_is_dirty_only_for_changes_to_the_package(tmp_path):
    """A sweep writing results/<x>/runs.db inside the checkout must not mark its own runs as
    run from modified code; an edit (or a new file) in the package must."""
    import shutil
    import subprocess

    from groupnorm.experiments.runtime import git_code_version

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    pkg = repo / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text("x = 1\n")
    (repo / "results").mkdir()
    (repo / "results" / "runs.db").write_bytes(b"v1")

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo,
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    assert git_code_version(tmp_path) is None  # not a checkout
    clean = git_code_version(pkg)
    assert clean is not None and clean.startswith("git:") and not clean.endswith("-dirty")
    (repo / "results" / "runs.db").write_bytes(b"v2")  # a sweep writing its database
    (repo / "NOTES.md").write_text("untracked, outside the package\n")
    assert git_code_version(pkg) == clean
    (pkg / "new.py").write_text("y = 2\n")  # new code in the package
    assert git_code_version(pkg) == clean + "-dirty"
    (pkg / "new.py").unlink()
    (pkg / "mod.py").write_text("x = 2\n")  # edited code
    assert git_code_version(pkg) == clean + "-dirty"
