"""The report's figures and claims read without the code: titles in words, labelled axes, the
paper's curve at its own settings, train/val and the fine-tuning switch in the legend, datasets
side by side with a verdict each, and no "±" for one seed.

The databases here are written directly through the Store with made-up numbers (no training),
so every expected value is known. No pixel is compared: the tests read the matplotlib objects.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from groupnorm.experiments import Store, build_report
from groupnorm.experiments import plots as P
from groupnorm.experiments.cells import study_cells
from groupnorm.experiments.config import make_config
from groupnorm.experiments.findings import NOT_WORSE, SAME, verdict
from groupnorm.experiments.kinds import KINDS
from groupnorm.experiments.recorder import RunInfo

BASE = {"model": "resnet20", "model_options": {"width": 8}, "workers": 4, "epochs": 4,
        "train_size": 1000, "report_last": 2, "progress": False}


def _rows(cfg, err: float) -> list[dict]:
    phases = ["pretrain"] * cfg.pretrain_epochs + ["train"] * cfg.epochs
    return [{"phase": ph, "lr": 0.1, "train_loss": 1.0, "train_error": err - 5 + 10 / e,
             "val_loss": 1.0, "val_error": err + 10 / e, "images_per_s": 100.0,
             "epoch_seconds": 1.0, "data_seconds": 0.0, "step_seconds": 1.0, "eval_seconds": 0.1}
            for e, ph in enumerate(phases, 1)]


def fake_db(path: Path, studies: list[tuple[str, str, list[tuple[dict, float]]]]) -> Path:
    """A results database holding finished runs with the given reported errors."""
    with Store(path) as s:
        for pos, (name, kind, runs) in enumerate(studies):
            s.add_study(name, kind, "", "fake", pos)
            for over, err in runs:
                cfg = make_config({**BASE, **over})
                (rid,) = s.enqueue([(name, cfg)])
                if s.run(rid)["status"] == "done":
                    continue
                s.claim(rid, "cpu (test)", "2.x")
                s.start_run(rid, RunInfo(None, 100))
                for e, row in enumerate(_rows(cfg, err), 1):
                    s.add_epoch(rid, e, row)
                s.finish(rid, {"median_val_error": err, "final_val_error": err,
                               "best_val_error": err, "final_train_error": err - 5,
                               "images_per_s": 100.0, "train_seconds": 1.0, "num_params": 100},
                         {"steps": 1, "step_s": 1.0})
    return path


def _batch_runs(dataset: str, seeds: list[int], bn: dict[int, float], gn: dict[int, float],
                sizes=(2, 32)) -> list[tuple[dict, float]]:
    out = []
    for seed in seeds:
        for n in sizes:
            out.append(({"dataset": dataset, "norm": "bn", "batch_size": n, "seed": seed},
                        bn[n] + seed))
            out.append(({"dataset": dataset, "norm": "gn", "batch_size": n, "seed": seed},
                        gn[n] + 0.5 * seed))
    return out


def _cells(db: Path, study: str):
    with Store(db, readonly=True) as s:
        ids = set(s.study_run_ids(study))
        runs = [r for r in s.runs(status="done") if r["id"] in ids]
    return runs, *study_cells(runs)


def _texts(fig) -> list[str]:
    """Every title, suptitle and axis label of a figure."""
    out = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
    return out


def _legend(ax) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


def _ours(ax) -> dict[str, tuple[list, list]]:
    """Our series of a panel (errorbar containers): label -> (x, y)."""
    return {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
            for c in ax.containers}


def _close(fig) -> None:
    P._plt().close(fig)


# ---------------------------------------------------------------------------------------------
# figures


def test_batch_figure_draws_the_paper_at_its_own_n_on_its_own_labelled_axis(tmp_path):
    """Was: the paper's curve drawn only at our n (a straight line from 2 to 32 when we ran
    only those), in an unlabelled panel titled with the study id."""
    db = fake_db(tmp_path / "r.db", [("ws_like_study", "batch", _batch_runs(
        "fashion-mnist", [0, 1], {2: 18.0, 32: 18.5}, {2: 19.0, 32: 19.0}))])
    runs, varying, cells = _cells(db, "ws_like_study")
    fig = P.batch_figure(KINDS["batch"], varying, cells, P.setup_words(runs, varying))
    ours, paper = fig.axes
    assert "Batch-size study: val error vs images per worker n" in fig._suptitle.get_text()
    assert "Fashion-MNIST, 1000 training images" in fig._suptitle.get_text()
    assert not any("ws_like_study" in t for t in _texts(fig))
    assert "val error (%)" in ours.get_ylabel() and "2 seeds" in ours.get_ylabel()
    assert "paper" in paper.get_ylabel() and "ImageNet" in paper.get_ylabel()
    assert "Table 2" in paper.get_title()
    drawn = {ln.get_label(): list(ln.get_xdata()) for ln in paper.get_lines()}
    assert drawn == {"BN": [2, 4, 8, 16, 32], "GN": [2, 4, 8, 16, 32]}
    assert [list(ln.get_ydata()) for ln in paper.get_lines()][0] == [34.7, 27.3, 24.8, 23.7,
                                                                   23.6]
    assert {k: x for k, (x, _) in _ours(ours).items()} == {"BN": [2, 32], "GN": [2, 32]}
    assert [t.get_text() for t in paper.get_xticklabels()] == ["2", "4", "8", "16", "32"]
    assert sorted(_legend(ours)) == ["BN", "GN"]
    _close(fig)


def test_one_seed_has_no_error_bars_and_says_so(tmp_path):
    db = fake_db(tmp_path / "r.db", [("s", "batch", _batch_runs(
        "fashion-mnist", [0], {2: 18.0, 32: 18.5}, {2: 19.0, 32: 19.0}))])
    runs, varying, cells = _cells(db, "s")
    fig = P.batch_figure(KINDS["batch"], varying, cells, "")
    ours = fig.axes[0]
    assert "1 seed, no error bars" in ours.get_ylabel()
    assert all(not c.has_yerr for c in ours.containers)
    _close(fig)


def test_group_figure_has_no_unlabelled_second_axis(tmp_path):
    """Was: the paper on a twinx axis over ours, both unnamed in any legend."""
    runs_ = [({"norm": "gn", "norm_options": {"num_groups": g}, "seed": s}, 20.0 - g / 8 + s)
             for g in (1, 2, 4, 8) for s in (0, 1)]
    db = fake_db(tmp_path / "r.db", [("groups", "groups", runs_)])
    runs, varying, cells = _cells(db, "groups")
    fig = P.group_figure(KINDS["groups"], "norm_options.num_groups", varying, cells,
                         P.setup_words(runs, varying))
    assert len(fig.axes) == 2  # ours and the paper's, side by side; no twin axis
    assert all(ax.get_ylabel() for ax in fig.axes)
    ours, paper = fig.axes
    assert [list(ln.get_xdata()) for ln in paper.get_lines()] == [[1, 2, 4, 8, 16, 32, 64]]
    assert _ours(ours)["GN, ours"][0] == [1, 2, 4, 8]
    assert "GN, paper" in _legend(paper) and "GN, ours" in _legend(ours)
    assert "number of groups G" in ours.get_xlabel()
    assert "GN's group setting: val error vs groups G" in fig._suptitle.get_text()
    _close(fig)


def test_curves_say_solid_is_val_dashed_is_train_and_mark_the_fine_tune_switch(tmp_path):
    runs_ = [({"norm": nm, "batch_size": 2, "pretrain_epochs": 3, "pretrain_batch_size": 32,
               "seed": s}, e) for nm, e in (("bn", 15.0), ("gn", 14.0)) for s in (0, 1)]
    db = fake_db(tmp_path / "r.db", [("finetune", "finetune", runs_)])
    runs, varying, cells = _cells(db, "finetune")
    with Store(db, readonly=True) as store:
        fig = P.curves_figure(KINDS["finetune"], varying, cells, store,
                              P.setup_words(runs, varying))
    (ax,) = fig.axes
    legend = _legend(ax)
    assert {"BN", "GN", "val error", "train error"} <= set(legend)
    assert "fine-tuning starts (n = 32 → 2)" in legend
    styles = {ln.get_linestyle() for ln in ax.get_lines() if len(ln.get_xdata()) == 7}
    assert styles == {"-", "--"}  # val solid, train dashed, 3 + 4 epochs each
    vlines = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [3.5, 3.5]]
    assert len(vlines) == 1  # between the last pretraining epoch (3) and the first at n = 2
    assert "3 + 4 epochs" in fig._suptitle.get_text()
    assert "pretraining, then fine-tuning" in ax.get_xlabel()
    _close(fig)


def test_a_study_over_two_datasets_gets_a_panel_of_ours_per_dataset(tmp_path):
    runs_ = (_batch_runs("cifar10-jpeg", [0, 1], {2: 40.0, 32: 35.0}, {2: 38.0, 32: 38.0})
             + _batch_runs("fashion-mnist", [0, 1], {2: 18.0, 32: 18.5}, {2: 19.0, 32: 19.0}))
    db = fake_db(tmp_path / "r.db", [("both", "batch", runs_)])
    runs, varying, cells = _cells(db, "both")
    assert "dataset" in varying
    fig = P.batch_figure(KINDS["batch"], varying, cells, P.setup_words(runs, varying))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["Ours: CIFAR-10 (JPEG q75)", "Ours: Fashion-MNIST"]
    assert "Paper" in titles[2]
    assert _ours(fig.axes[0])["BN"][1] == [40.5, 35.5]  # CIFAR's numbers only, seeds averaged
    assert _ours(fig.axes[1])["BN"][1] == [18.5, 19.0]
    _close(fig)
    with Store(db, readonly=True) as store:
        fig = P.curves_figure(KINDS["batch"], varying, cells, store, "")
    assert sorted(ax.get_title() for ax in fig.axes) == [
        "CIFAR-10 (JPEG q75) · BN", "CIFAR-10 (JPEG q75) · GN", "Fashion-MNIST · BN",
        "Fashion-MNIST · GN"]
    _close(fig)


def test_study_figures_never_title_a_figure_with_the_study_id(tmp_path, monkeypatch):
    db = fake_db(tmp_path / "r.db", [("zz_study_id", "batch", _batch_runs(
        "fashion-mnist", [0, 1], {2: 18.0, 32: 18.5}, {2: 19.0, 32: 19.0}))])
    seen = []
    real = P._save
    monkeypatch.setattr(P, "_save", lambda plt, fig, path: seen.append(_texts(fig))
                        or real(plt, fig, path))
    build_report(db, tmp_path / "rep")
    assert len(seen) == 2
    assert not any("zz_study_id" in t for texts in seen for t in texts)


# ---------------------------------------------------------------------------------------------
# the report: claims per dataset, with verdicts


def test_report_sets_datasets_side_by_side_per_claim_with_a_verdict_each(tmp_path):
    """Was: with the dataset varying in a study, each finding compared the first matching cell
    whatever its dataset, and no line named which data a number came from."""
    runs_ = (_batch_runs("cifar10-jpeg", [0, 1], {2: 40.0, 32: 35.0}, {2: 38.0, 32: 38.0})
             + _batch_runs("fashion-mnist", [0], {2: 18.0, 32: 18.5}, {2: 19.0, 32: 19.0}))
    db = fake_db(tmp_path / "r.db", [("batch_size", "batch", runs_)])
    md = build_report(db, tmp_path / "rep", plots=False).read_text()
    assert ("- datasets: `cifar10-jpeg` (CIFAR-10 (JPEG q75)), 8 runs; `fashion-mnist` "
            "(Fashion-MNIST), 4 runs") in md
    head = ("| claim | comparison | paper | CIFAR-10 (JPEG q75) | verdict | Fashion-MNIST | "
            "verdict |")
    assert head in md
    row = next(ln for ln in md.splitlines() if "| BN error at n=2 − at n=32 |" in ln)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0].startswith("C1 ")
    # CIFAR: +5.0 on both seeds (paired), so no spread; Fashion-MNIST: one seed, no ±
    assert cells[2:] == ["+11.1", "+5.0 ± 0.0 (2 seeds)", "holds", "-0.5 (1 seed)",
                         "other sign (1 seed)"]
    gn = next(ln for ln in md.splitlines() if "| GN − BN error at n=2 |" in ln)
    assert "-2.2 ± 0.4 (2 seeds) | holds" in gn and "+1.0 (1 seed)" in gn  # seeds: -2, -2.5
    assert "Findings on CIFAR-10 (JPEG q75):" in md and "Findings on Fashion-MNIST:" in md
    fm = md.split("Findings on Fashion-MNIST:")[1]
    assert "- BN error at n=2 − at n=32: -0.5 points over 1 seed (paper: +11.1)" in fm
    assert "± 0.0 points over 1" not in md


def test_claims_of_one_dataset_per_study_share_rows(tmp_path):
    db = fake_db(tmp_path / "r.db", [
        ("batch_cifar", "batch", _batch_runs("cifar10-jpeg", [0, 1], {2: 40.0, 32: 35.0},
                                             {2: 38.0, 32: 38.0})),
        ("batch_fmnist", "batch", _batch_runs("fashion-mnist", [0, 1], {2: 18.0, 32: 18.5},
                                              {2: 19.0, 32: 19.0}))])
    md = build_report(db, tmp_path / "rep", plots=False).read_text()
    rows = [ln for ln in md.splitlines() if "| BN error at n=2 − at n=32 |" in ln]
    assert len(rows) == 1  # one row, a column pair per dataset
    assert "+5.0 ± 0.0 (2 seeds) | holds" in rows[0]
    assert "-0.5 ± 0.0 (2 seeds) | reversed" in rows[0]
    assert "dataset=cifar10-jpeg (CIFAR-10 (JPEG q75))" in md


@pytest.mark.parametrize("d,paper,expect,want", [
    ((3.5, 0.4, 2), 11.1, SAME, "holds"),  # the CIFAR pilot's BN penalty
    ((-0.8, 0.6, 3), 11.1, SAME, "reversed"),  # Fashion-MNIST, full preset
    ((0.2, 0.6, 3), 11.1, SAME, "within noise"),  # Fashion-MNIST, 40 epochs
    ((2.0, 0.0, 1), 11.1, SAME, "paper's sign (1 seed)"),
    ((-3.0, 0.9, 3), 0.0, SAME, "does not hold (beyond ±1.5)"),  # GN not flat
    ((0.3, 0.2, 3), 0.0, SAME, "holds (within ±1.5)"),
    ((-3.1, 1.2, 3), -0.7, NOT_WORSE, "holds (not worse by over 1.5)"),  # GN better is fine
    ((-3.1, 1.2, 3), -0.7, SAME, "does not hold (beyond ±1.5)"),
    ((4.0, 0.5, 3), 0.5, NOT_WORSE, "does not hold (worse by over 1.5)"),
    ((2.6, 1.8, 3), 0.5, NOT_WORSE, "within noise"),
    (None, 0.5, SAME, "not measured"),
    ((1.0, 0.1, 3), None, SAME, "no published number"),
])
def test_verdict_rule(d, paper, expect, want):
    assert verdict(d, paper, expect) == want


def test_verdict_margin_is_two_standard_errors():
    # 3 seeds, std 1.5: se = 0.866, margin 1.73; +1.8 clears it, +1.7 does not
    assert verdict((1.8, 1.5, 3), 5.0) == "holds"
    assert verdict((1.7, 1.5, 3), 5.0) == "within noise"
    assert math.isclose(2 * 1.5 / math.sqrt(3), 1.732, abs_tol=1e-3)


def test_a_study_of_one_norm_over_n_is_still_set_beside_the_paper(tmp_path):
    """Was: with the norm set for the whole study (the BN-only quick preset), the finding had no
    norm, so no published number and no verdict ("no published number")."""
    runs_ = [({"norm": "bn", "batch_size": n, "seed": seed}, err + seed)
             for seed in (0, 1) for n, err in ((2, 40.0), (32, 33.0))]
    db = fake_db(tmp_path / "r.db", [("batch_size", "batch", runs_)])
    md = build_report(db, tmp_path / "rep", plots=False).read_text()
    assert "BN error at n=2 − at n=32: +7.0 ± 0.0 points over 2 seed(s) (paper: +11.1)" in md
    assert "paper: +11.1" in md and "no published number" not in md


def test_training_wall_time_counts_every_attempt_of_a_resumed_run(tmp_path):
    """A run's train_seconds is its finishing attempt's alone; a run resumed after a crash (the
    CIFAR-10 full sweep's first runs) would lose its earlier epochs from the report's total. The
    total is the done runs' epoch times; a run still running is not in it."""
    db = fake_db(tmp_path / "runs.db", [("s", "batch", [
        ({"norm": "bn", "batch_size": 2}, 30.0), ({"norm": "gn", "batch_size": 2}, 20.0)])])
    with Store(db) as s:
        (rid,) = s.enqueue([("s", make_config({**BASE, "norm": "ln", "batch_size": 2}))])
        s.claim(rid, "cpu (test)", "2.x")
        s.add_epoch(rid, 1, {"phase": "train", "epoch_seconds": 600.0})
    with sqlite3.connect(db) as c:  # 4 epochs of 30 s each per done run; train_seconds 1 s
        c.execute("UPDATE epochs SET epoch_seconds=30.0 WHERE epoch_seconds=1.0")
    md = build_report(db, tmp_path / "rep", plots=False).read_text()
    assert "training wall time 4.0 min in total" in md
