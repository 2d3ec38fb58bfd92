"""Batch-statistics noise (groupnorm.analysis.batchnoise, `groupnorm batch-noise`): the measure
against closed forms, the layer moments against a direct computation, BN's penalty from a
database, the figure's contents and the command end to end on generated data."""

from __future__ import annotations

import copy
import csv
import io
import math
import re

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm.analysis import batchnoise as B
from groupnorm.cli import main

P = 4096  # population; the finite-population factor below keeps the closed forms exact


def _fpc(n: int) -> float:
    """Drawing n of P images without replacement shrinks a mean's variance by (P-n)/(P-1)."""
    return (P - n) / (P - 1)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.mean((2, 3)), (x * x).mean((2, 3))


@pytest.mark.parametrize("n", [2, 8, 32])
def test_iid_gaussian_mean_error_is_one_over_root_n_positions(n):
    """i.i.d. values: a batch of n images of S positions averages N = n*S values, so its mean
    strays by sigma/sqrt(N); a large offset (mean 50, std 3) must not spoil the variance."""
    g = torch.Generator().manual_seed(1)
    x = 50.0 + 3.0 * torch.randn(P, 6, 4, 4, generator=g, dtype=torch.float64)
    m1, m2 = _moments(x)
    r = B.batch_noise(m1, m2, [n], draws=6000, seed=0)[n]
    big_n = n * 16
    assert r["mean_error"] == pytest.approx(math.sqrt(_fpc(n) / big_n), rel=0.04)
    # biased variance of N Gaussian values: E[(s2_b - s2)^2] / s2^2 = (2N - 1) / N^2
    assert r["var_error"] == pytest.approx(math.sqrt(2 * big_n - 1) / big_n * math.sqrt(_fpc(n)),
                                           rel=0.05)
    assert r["channels_used"] == 6 and r["batches"] >= 6000


def test_between_image_variation_does_not_shrink_with_the_image_size():
    """x = a_i + e: an offset per image (variance tau^2) plus noise (s^2) over S positions: the
    mean error is sqrt((tau^2 + s^2/S) / (n (tau^2 + s^2))). The data's part."""
    g = torch.Generator().manual_seed(2)
    tau, s, side, n = 1.0, 2.0, 8, 4
    a = tau * torch.randn(P, 3, 1, 1, generator=g, dtype=torch.float64)
    x = a + s * torch.randn(P, 3, side, side, generator=g, dtype=torch.float64)
    m1, m2 = _moments(x)
    r = B.batch_noise(m1, m2, [n], draws=6000, seed=0)[n]
    want = math.sqrt((tau**2 + s**2 / side**2) / (n * (tau**2 + s**2)) * _fpc(n))
    assert r["mean_error"] == pytest.approx(want, rel=0.04)
    assert r["mean_error"] > 3 * math.sqrt(1 / (n * side**2))  # far above the i.i.d. value


def test_constant_channels_are_left_out_and_counted():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 3, 2, 2, generator=g, dtype=torch.float64)
    x[:, 1] = 7.0  # a dead channel: no scale to measure in
    m1, m2 = _moments(x)
    r = B.batch_noise(m1, m2, [2], draws=500)[2]
    assert r["channels_used"] == 2 and math.isfinite(r["mean_error"])


def test_bad_sizes_and_shapes_are_refused():
    m = torch.zeros(10, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"batch sizes \[11\].*\[1, 10\]"):
        B.batch_noise(m, m + 1, [2, 11])
    with pytest.raises(ValueError, match="must both be"):
        B.batch_noise(m, m[:, :1])


def test_layer_moments_see_each_bn_input_normalized_by_the_population_statistics():
    """Layer 2's input is layer 1's output with the *population's* statistics, whatever virtual
    batch the model was trained with; the model itself is left untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(groupnorm.BatchNorm(3), nn.ReLU(), groupnorm.BatchNorm(3))
    groupnorm.set_virtual_batch(model, 2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = 2.0 + torch.randn(64, 3, 5, 5)
    layers = B.layer_moments(model, x)
    assert [lm.name for lm in layers] == ["0", "2"] and layers[0].shape == (3, 5, 5)
    torch.testing.assert_close(layers[0].m1, x.double().mean((2, 3)), rtol=1e-12, atol=1e-12)
    mu = x.double().mean((0, 2, 3), keepdim=True)
    var = x.double().var((0, 2, 3), unbiased=False, keepdim=True)
    y = torch.relu((x.double() - mu) / torch.sqrt(var + 1e-5))  # gamma 1, beta 0
    torch.testing.assert_close(layers[1].m1, y.mean((2, 3)), rtol=1e-5, atol=1e-6)
    assert not model.training and model[0].virtual_batch == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _oracle_rows(model: nn.Module, x: torch.Tensor, sizes: list[int], draws: int,
                 seed: int) -> list[tuple[int, int, float, float]]:
    """The measure computed directly in float64: a float64 copy of the net on the whole
    population (training-mode BN, one batch), each BN layer's raw input kept, and every drawn
    batch's statistics taken over (n, H, W) with torch.mean / torch.var."""
    net = copy.deepcopy(model).double().train()
    groupnorm.set_virtual_batch(net, None)
    inputs: list[torch.Tensor] = []
    for m in net.modules():
        if isinstance(m, groupnorm.BatchNorm):
            m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone()))
    with torch.no_grad():
        net(x.double())
    out = []
    for k, a in enumerate(inputs, 1):
        mu = a.mean((0, 2, 3))
        var = a.var((0, 2, 3), unbiased=False)
        gen = torch.Generator().manual_seed(seed)
        for n in sizes:
            idx = B.batch_indices(len(x), n, draws, gen)
            zm, zv = [], []
            for b in idx:
                xb = a[b]
                zm.append((xb.mean((0, 2, 3)) - mu) / var.sqrt())
                zv.append((xb.var((0, 2, 3), unbiased=False) - var) / var)
            rms_m = torch.stack(zm).pow(2).mean(0).sqrt()
            rms_v = torch.stack(zv).pow(2).mean(0).sqrt()
            out.append((k, n, float(rms_m.mean()), float(rms_v.mean())))
    return out


def test_measure_model_matches_a_float64_direct_computation():
    """Oracle for the whole measure on a tiny conv net whose running statistics are far from
    the population's (as a trained model's may be): per layer and n, the mean and variance
    errors equal those computed directly from the raw float64 activations. Guards against
    e.g. a batch variance taken as the mean of per-image variances, or layers fed by running
    statistics instead of the population's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), groupnorm.BatchNorm(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, stride=2, padding=1), groupnorm.BatchNorm(3))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-2.0, 2.0)
            bn.running_var.uniform_(0.2, 4.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    # per-image offsets and scales: the between-image spread that makes small batches stray
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(24, 2, 1, 1, generator=g) + 1.0
         + torch.rand(24, 1, 1, 1, generator=g) * torch.randn(24, 2, 6, 6, generator=g))
    sizes, draws = [2, 3, 8], 60
    rows = B.measure_model(model, x, sizes, draws=draws, seed=7)
    want = _oracle_rows(model, x, sizes, draws, seed=7)
    assert [(r["layer"], r["n"]) for r in rows] == [(k, n) for k, n, _, _ in want]
    for r, (_k, _n, m, v) in zip(rows, want, strict=True):
        assert r["mean_error"] == pytest.approx(m, rel=1e-4)
        assert r["var_error"] == pytest.approx(v, rel=1e-4)
        assert r["batches"] == len(B.batch_indices(24, r["n"], draws, torch.Generator()))


def test_batch_indices_are_whole_permutations_cut_into_disjoint_batches():
    idx = B.batch_indices(10, 3, 7, torch.Generator().manual_seed(0))
    assert idx.shape == (9, 3)  # 3 batches per permutation, 3 permutations for >= 7 batches
    for perm in idx.view(3, 9):
        assert len(set(perm.tolist())) == 9  # disjoint within a permutation
    with pytest.raises(ValueError, match=r"n=11: must be an integer in \[1, 10\]"):
        B.batch_indices(10, 11, 5, torch.Generator())


def test_a_model_without_bn_is_refused():
    with pytest.raises(ValueError, match="no batch-statistics norm"):
        B.layer_moments(nn.Sequential(nn.GroupNorm(1, 3)), torch.randn(4, 3, 2, 2))


def test_measure_model_rows_per_layer_and_n():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), groupnorm.BatchNorm(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), groupnorm.BatchNorm(4))
    rows = B.measure_model(model, torch.randn(128, 1, 8, 8), [2, 8], draws=200)
    assert [(r["layer"], r["n"], r["height"], r["width"]) for r in rows] == [
        (1, 2, 8, 8), (1, 8, 8, 8), (2, 2, 4, 4), (2, 8, 4, 4)]
    assert rows[0]["iid_mean_error"] == pytest.approx(1 / math.sqrt(2 * 64))
    assert all(r["mean_error"] > 0 and r["var_error"] > 0 for r in rows)
    assert rows[1]["mean_error"] < rows[0]["mean_error"]  # more images, less noise


def test_error_with_batch_statistics_against_the_pair_case():
    """One BN'd feature x ~ N(0, 1), class = (x > 0), a classifier on the sign of x-hat. With
    the running statistics (mean 0, var 1) every image is right; normalized by a pair's own
    statistics the two get opposite signs, so when both x share a sign (probability 1/2) one of
    them is wrong: 25 % error. Large batches come back towards 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8000, 1, 1, 1, generator=g)
    y = (x.flatten() > 0).long()
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.zero_()
    model = nn.Sequential(groupnorm.BatchNorm(1, affine=False), nn.Flatten(), head)
    model.eval()  # running mean 0, var 1: the population's
    err = B.error_with_batch_stats(model, x, y, [2, 64], seed=0)
    assert err[0] == 0.0
    assert err[2] == pytest.approx(25.0, abs=1.5)
    assert err[64] < 5.0
    assert not model.training and model[0].virtual_batch is None
    assert torch.equal(model[0].running_mean, torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# BN's penalty from a results database, the figure, the command


def test_bn_penalty_is_paired_by_seed_per_dataset(tmp_path):
    from test_report_figures import _batch_runs, fake_db

    db = fake_db(tmp_path / "r.db", [("b", "batch", _batch_runs(
        "cifar10-jpeg", [0, 1, 2], {2: 40.0, 32: 36.0}, {2: 38.0, 32: 38.0})
        + _batch_runs("fashion-mnist", [0, 1], {2: 18.0, 32: 18.5}, {2: 19.0, 32: 19.0}))])
    p = B.bn_penalty([db], "cifar10-jpeg")
    assert (p.lo, p.hi, p.mean, p.std, p.seeds) == (2, 32, 4.0, 0.0, 3)
    assert "study b" in p.source and "resnet20 width 8" in p.setup
    q = B.bn_penalty([db], "fashion-mnist")
    assert (q.mean, q.seeds) == (-0.5, 2)
    assert B.bn_penalty([db], "mnist") is None


def _rows() -> list[dict]:
    rows = []
    for ds, scale in (("cifar10-jpeg", 0.3), ("fashion-mnist", 0.2)):
        for state, f in (("trained", 1.0), ("init", 1.2)):
            for layer in (1, 2, 3):
                for n in (2, 8, 32):
                    rows.append({"dataset": ds, "model_state": state, "layer": layer,
                                 "name": f"bn{layer}", "channels": 8, "height": 4, "width": 4,
                                 "n": n, "batches": 100, "mean_error": f * scale / math.sqrt(n),
                                 "var_error": 1.5 * f * scale / math.sqrt(n),
                                 "iid_mean_error": 1 / math.sqrt(16 * n), "channels_used": 8})
    return rows


def test_figure_draws_both_datasets_per_layer_vs_n_and_their_penalties():
    pens = {"cifar10-jpeg": B.Penalty("cifar10-jpeg", 2, 32, 3.5, 0.4, 3, "db", "resnet20"),
            "fashion-mnist": B.Penalty("fashion-mnist", 2, 32, -0.5, 0.0, 1, "db", "resnet20")}
    evals = [{"dataset": ds, "n": n, "val_error": e0 + (d / n if n else 0.0), "images": 100}
             for ds, e0, d in (("cifar10-jpeg", 40.0, 20.0), ("fashion-mnist", 15.0, 4.0))
             for n in (0, 2, 8, 32)]
    fig = B.figure(_rows(), pens, evals=evals, subtitle="resnet20 width 8")
    a_mean, a_var, a_n, a_eval, a_pen = fig.axes
    assert "Does the data decide BN's small-batch penalty?" in fig._suptitle.get_text()
    labels = [ln.get_label() for ln in a_mean.get_lines()]
    assert labels == ["CIFAR-10 (JPEG q75), trained", "CIFAR-10 (JPEG q75), at init",
                      "Fashion-MNIST, trained", "Fashion-MNIST, at init"]
    assert [ln.get_linestyle() for ln in a_mean.get_lines()] == ["-", "--", "-", "--"]
    assert list(a_mean.get_lines()[0].get_ydata()) == pytest.approx([0.3 / math.sqrt(2)] * 3)
    assert "n = 2" in a_mean.get_title() and "(μ_B − μ)/σ" in a_mean.get_ylabel()
    assert "(σ²_B − σ²)/σ²" in a_var.get_ylabel()
    assert [list(ln.get_xdata()) for ln in a_n.get_lines()][0] == [2, 8, 32]
    eval_lines = {ln.get_label(): ln for ln in a_eval.get_lines()}
    batch = eval_lines["CIFAR-10 (JPEG q75): BN with batch statistics"]
    assert list(batch.get_xdata()) == [2, 8, 32]  # n = 0 (eval mode) is the dotted line
    assert list(batch.get_ydata()) == pytest.approx([50.0, 42.5, 40.625])
    assert "Fashion-MNIST: BN with running statistics (eval mode)" in eval_lines
    assert [b.get_height() for b in a_pen.patches] == [3.5, -0.5]
    texts = [t.get_text() for t in a_pen.texts]
    assert texts == ["+3.5 ± 0.4 (3 seeds)", "-0.5 (1 seed)"]  # no ± for one seed
    assert "n = 2 − at n = 32" in a_pen.get_ylabel()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_markdown_headline_names_both_datasets():
    pens = {"cifar10-jpeg": B.Penalty("cifar10-jpeg", 2, 32, 3.5, 0.4, 3, "db", "resnet20"),
            "fashion-mnist": None}
    md = B.markdown(_rows(), pens, {"command": "groupnorm batch-noise ...", "models": []})
    assert ("At n = 2, the batch mean of the trained models' BN layers strays by **0.21 σ on "
            "CIFAR-10 (JPEG q75) vs 0.14 σ on Fashion-MNIST**") in md
    assert "| CIFAR-10 (JPEG q75) | trained | 0.212 | 0.053 |" in md
    evals = [{"dataset": "cifar10-jpeg", "n": 0, "val_error": 40.0},
             {"dataset": "cifar10-jpeg", "n": 2, "val_error": 55.0},
             {"dataset": "cifar10-jpeg", "n": 32, "val_error": 41.0},
             {"dataset": "fashion-mnist", "n": 0, "val_error": 15.0},
             {"dataset": "fashion-mnist", "n": 2, "val_error": 18.0},
             {"dataset": "fashion-mnist", "n": 32, "val_error": 15.5}]
    md = B.markdown(_rows(), pens, {"models": []}, evals=evals)
    assert ("from 40.0 % to 55.0 % on CIFAR-10 (JPEG q75) (+15.0 points) and from 15.0 % to "
            "18.0 % on Fashion-MNIST (+3.0); at n = 32: +1.0 vs +0.5 points.") in md
    assert "BN penalty on Fashion-MNIST: no database" in md


@pytest.mark.slow
def test_batch_noise_command_trains_measures_and_writes(tmp_path, capsys):
    """End to end on generated data: trains a tiny BN model through the harness, measures it
    and its init, writes CSV + PNG + markdown; a second call reuses the trained run."""
    args = ["batch-noise", "--dataset", "synthetic", "--train-epochs", "1",
            "--set", "model=simplenet", "--set", "model_options={width = 4, hidden = 16}",
            "--set", "dataset_options={n = 256, image_size = 8, channels = 1, num_classes = 4}",
            "--set", "train_size=null", "--set", "val_size=64", "--set", "batch_size=8",
            "--set", "workers=2", "--population", "128", "--sizes", "2,8", "--draws", "100",
            "-o", str(tmp_path / "out")]
    assert main(args) == 0
    out = tmp_path / "out"
    rows = list(csv.DictReader(io.StringIO((out / "batch_noise.csv").read_text())))
    assert {r["model_state"] for r in rows} == {"trained", "init"}
    assert {r["n"] for r in rows} == {"2", "8"} and {r["dataset"] for r in rows} == {"synthetic"}
    evals = list(csv.DictReader(io.StringIO((out / "batch_noise_eval.csv").read_text())))
    assert [e["n"] for e in evals] == ["0", "2", "8"]
    assert (out / "batch_noise.png").stat().st_size > 10_000
    md = (out / "batch_noise.md").read_text()
    assert "groupnorm batch-noise --dataset synthetic" in md
    assert (out / "batch_noise_meta.json").exists()  # what --replot reads
    ckpt = out / "runs" / "synthetic" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    assert main(args) == 0  # reused, not retrained
    assert ckpt.stat().st_mtime_ns == stamp
    assert (out / "batch_noise.csv").read_text() == "\n".join(
        [",".join(B.CSV_FIELDS)] + [",".join(r.values()) for r in rows]) + "\n"


def test_batch_noise_command_refuses_nothing_to_measure(capsys):
    with pytest.raises(SystemExit) as e:
        main(["batch-noise", "-o", "x"])
    assert e.value.code == 2
    assert "--run FOLDER" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--sizes", "2,0"], r"batch sizes \[0\]: each n must be an integer >= 1"),
    (["--sizes", "2,x"], r"--sizes '2,x': must be integers"),
    (["--sizes", "2,2"], r"repeat a value"),
    (["--sizes", "2,64", "--population", "32"], r"batch sizes \[64\] exceed the population of 32"),
    (["--population", "20000"], r"--population 20000 exceeds the 10000 training images"),
    (["--draws", "0"], r"draws=0: must be an integer >= 1"),
    (["--db", "no/such.db"], r"results database no/such.db does not exist"),
    (["--run", "no/such/run"], r"run folder no/such/run lacks config.json, run.json, checkpoint"),
    (["--train-epochs", "0"], r"--train-epochs 0: must be >= 1"),
])
def test_batch_noise_command_refuses_bad_input_before_training(tmp_path, capsys, extra, message):
    """Each bad value is named with its fix, and nothing is trained or written first."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["batch-noise", "--dataset", "fashion-mnist", *extra, "-o", str(out)])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_committed_batch_noise_summary_matches_its_csv_and_database():
    """results/batch-noise/batch_noise.md (its numbers, table and penalty line) is what the
    committed batch_noise*.csv and runs.db give."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "results" / "batch-noise"
    if not (root / "batch_noise.md").exists():
        pytest.skip("results/batch-noise is not in this checkout")
    rows = B.read_csv(root / "batch_noise.csv")
    evals = B.read_csv(root / "batch_noise_eval.csv")
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    pens = {ds: B.bn_penalty([root / "runs.db"], ds) for ds in datasets}
    md = B.markdown(rows, pens, {}, evals=evals)
    committed = (root / "batch_noise.md").read_text(encoding="utf-8")
    assert B.summary_text(md) == B.summary_text(committed)


def test_replot_redraws_from_the_measurement_and_a_database_that_gained_runs(tmp_path, capsys):
    """--replot: the figure and summary from the folder's CSVs and the databases alone, so a
    penalty that gained seeds shows without measuring again; a folder never measured is
    refused with the fix."""
    import json

    from test_report_figures import _batch_runs, fake_db

    out = tmp_path / "noise"
    out.mkdir()
    (out / "batch_noise.csv").write_text(B.csv_text(_rows()), encoding="utf-8")
    evals = [{"dataset": ds, "n": n, "val_error": 20.0 + n, "images": 100}
             for ds in ("cifar10-jpeg", "fashion-mnist") for n in (0, 2, 32)]
    (out / "batch_noise_eval.csv").write_text(B.csv_text(evals, B.EVAL_FIELDS), encoding="utf-8")
    (out / "batch_noise_meta.json").write_text(json.dumps(
        {"command": "groupnorm batch-noise ...", "population": 64, "models": []}))
    db = fake_db(tmp_path / "r.db", [("b", "batch", _batch_runs(
        "cifar10-jpeg", [0, 1], {2: 40.0, 32: 36.0}, {2: 38.0, 32: 38.0}))])
    assert main(["batch-noise", "--replot", "--db", str(db), "-o", str(out)]) == 0
    md = (out / "batch_noise.md").read_text()
    assert "| CIFAR-10 (JPEG q75) | trained | 0.212 | 0.053 | 0.318 | 0.080 | +4.0 ± 0.0 (2 " \
           "seeds) |" in md
    assert "BN penalty on Fashion-MNIST: no database" in md
    assert (out / "batch_noise.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["batch-noise", "--replot", "-o", str(tmp_path / "never")])
    assert "batch_noise.csv" in capsys.readouterr().err
