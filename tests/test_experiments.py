"""Harness tests: config and overrides, LR scaling, virtual workers, the store, failures, reports.

Every training run here is tiny (synthetic 16 px images, a 4-channel SimpleNet, 1 thread).
"""

from __future__ import annotations

import copy
import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch

import groupnorm
from groupnorm.experiments import Store, build_report, run_sweep, train
from groupnorm.experiments.config import (
    TrainConfig,
    list_presets,
    load_preset,
    make_config,
    parse_assignment,
    parse_preset,
    split_values,
)
from groupnorm.experiments.report import paper_table, paper_value
from groupnorm.experiments.train import lr_multiplier

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
    assert a.config_hash() == tiny(device="cuda", num_threads=4, progress=True).config_hash()
    assert a.config_hash() != tiny(seed=1).config_hash()
    assert a.config_hash() != tiny(norm="bn").config_hash()


@pytest.mark.parametrize("name", list_presets())
def test_shipped_presets_expand(name):
    preset = load_preset(name)
    pairs = preset.expand()
    assert pairs, name
    hashes = {c.config_hash() for _, c in pairs}
    assert len(hashes) <= len(pairs)


def test_quick_preset_is_the_batch_study_on_real_fashion_mnist():
    pairs = load_preset("quick").expand()
    cfgs = [c for _, c in pairs]
    assert {c.dataset for c in cfgs} == {"fashion-mnist"}
    assert {c.norm for c in cfgs} == {"bn", "gn"}
    assert {c.batch_size for c in cfgs} == {2, 4, 8, 16, 32}
    assert len({c.seed for c in cfgs}) >= 2
    assert len(cfgs) == 20


def test_command_line_axes_replace_or_extend_the_grid():
    preset = tiny_preset({"norm": ["bn", "gn"]})
    assert len(preset.expand({"seed": [0, 1, 2]})) == 6
    assert [c.norm for _, c in preset.expand({"norm": ["gn"]})] == ["gn"]


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
    from groupnorm.experiments.train import param_groups

    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), groupnorm.norm_layer("gn", 4, num_groups=2))
    (all_,) = param_groups(m, 1e-4, wd_norm=True)
    assert len(all_["params"]) == 4 and all_["weight_decay"] == 1e-4
    decay, no_decay = param_groups(m, 1e-4, wd_norm=False)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0
    # and the optimizer the harness builds has those groups
    from groupnorm.experiments.train import make_optimizer

    gamma = m[1].weight
    for wd_norm, want in ((True, 1e-4), (False, 0.0)):
        opt = make_optimizer(tiny(wd_norm=wd_norm, weight_decay=1e-4), m, 0.1)
        (group,) = [g for g in opt.param_groups if any(p is gamma for p in g["params"])]
        assert group["weight_decay"] == want


def test_summary_is_the_median_of_the_last_k_epochs_of_the_final_phase():
    from groupnorm.experiments.train import summarize

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


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    preset = tiny_preset({"model": ["nosuchnet", "simplenet"]}, epochs=1, kind="grid")
    db = tmp_path / "runs.db"
    counts = run_sweep(preset, db, log=lambda m: None)
    assert counts["done"] == 1 and counts["failed"] == 1
    with Store(db) as s:
        (failed,) = s.runs(status="failed")
        assert "unknown model 'nosuchnet'" in failed["error"]
        assert failed["attempts"] == 1
    # not retried unless asked
    assert run_sweep(preset, db, log=lambda m: None)["failed"] == 1
    with Store(db) as s:
        assert s.runs(status="failed")[0]["attempts"] == 1
    assert run_sweep(preset, db, retry_failed=True, log=lambda m: None)["failed"] == 1
    with Store(db) as s:
        assert s.runs(status="failed")[0]["attempts"] == 2
        assert len(s.runs(status="done")) == 1


def test_resume_from_checkpoint_gives_the_uninterrupted_numbers(tmp_path):
    cfg = tiny(norm="bn", epochs=3)
    full = train(cfg, log=None)
    ckpt = tmp_path / "c.pt"

    class Stop(Exception):
        pass

    def stop_after_one(epoch, row):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, checkpoint_path=ckpt, on_epoch=stop_after_one, log=None)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    resumed_from = []
    res = train(cfg, checkpoint_path=ckpt, on_resume=resumed_from.append, log=None)
    assert resumed_from == [1]
    keys = ("train_loss", "train_error", "val_loss", "val_error", "lr")
    assert [[e[k] for k in keys] for e in res.epochs] == [[e[k] for k in keys]
                                                          for e in full.epochs]


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
