"""`groupnorm` command line: train, sweep, report, reproduce, status, export-db, batch-noise, bench,
demo.

Every command resolves a TrainConfig the same way: preset defaults (TOML) < `--set key=value`
overrides < the common flags (--norm, --batch-size, ...), checked before anything runs. The
resolved config is stored with every run. Expected errors (a bad value, a missing dataset, a
database that cannot be written) end with one line naming the value or file and the fix, exit
status 2; `--debug` shows the traceback. A sweep that ends with failed runs exits with 1. Run
`groupnorm COMMAND --help` for each command's examples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# common flags: sugar for --set FIELD=VALUE (comma lists allowed in sweeps)
COMMON_FLAGS = (
    ("--model", "model", "model name (groupnorm.models.list_models())"),
    ("--dataset", "dataset", "dataset name (groupnorm.data.list_datasets())"),
    ("--norm", "norm", "normalization: bn, gn, ln, in, brn, syncbn, none, gn+ws"),
    ("--batch-size", "batch_size", "n: images per (virtual) worker, the batch BN sees"),
    ("--workers", "workers", "W: virtual workers; one optimizer step takes W*n images"),
    ("--epochs", "epochs", "training epochs (the same for every batch size)"),
    ("--lr", "lr", "base learning rate for ref_batch (32) images per worker"),
    ("--seed", "seed", "random seed"),
    ("--device", "device", "cpu, cuda or cuda:K"),
    ("--threads", "num_threads", "torch CPU threads (default 1; part of a run's identity)"),
)

FORMATTER = argparse.RawDescriptionHelpFormatter


def _add_config_args(p: argparse.ArgumentParser, lists: bool) -> None:
    g = p.add_argument_group("configuration (preset < --set < flags)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field; dotted keys reach into dicts "
                        "(norm_options.num_groups=8)"
                        + ("; comma lists make a grid axis (norm=bn,gn)" if lists else ""))
    for flag, field, text in COMMON_FLAGS:
        g.add_argument(flag, dest=f"flag_{field}", metavar="V" + (",..." if lists else ""),
                       help=text)


def _overrides(args: argparse.Namespace, lists: bool) -> dict[str, list[Any]]:
    from groupnorm.experiments.config import ConfigError, check_key, parse_assignment, split_values

    out: dict[str, list[Any]] = {}
    for text in args.overrides:
        key, values = parse_assignment(text)
        out[key] = values
    for _flag, field, _text in COMMON_FLAGS:
        value = getattr(args, f"flag_{field}")
        if value is not None:
            check_key(field)
            out[field] = split_values(value)
    if not lists:
        multi = {k: v for k, v in out.items() if len(v) > 1}
        if multi:
            raise ConfigError(f"train takes one value per field, got {multi}; use `groupnorm "
                              "sweep` for grids")
    return out


# ---------------------------------------------------------------------------------------------
# commands


def cmd_train(args: argparse.Namespace) -> int:
    """Train one configuration; results (config, per-epoch metrics, summary) go to --out."""
    import torch

    from groupnorm.experiments import recipe, runtime
    from groupnorm.experiments.config import make_config
    from groupnorm.experiments.loop import train
    from groupnorm.experiments.presets import load_preset
    from groupnorm.experiments.recorder import RunFolder

    overrides = {k: v[0] for k, v in _overrides(args, lists=False).items()}
    base = load_preset(args.preset).defaults if args.preset else {}
    cfg = make_config({**base, **overrides})
    recipe.check(cfg)
    d = runtime.dist_info()
    out = Path(args.out) if args.out else Path("runs") / "train" / cfg.config_hash()
    recorder = None
    if d.is_main:
        recorder = RunFolder(out, cfg.to_dict(), cfg.config_hash(),
                             runtime.device_description(cfg.device), torch.__version__,
                             extra={"world_size": d.world_size})
        print(f"run {cfg.config_hash()} -> {out}")
        print(json.dumps(cfg.identity(), sort_keys=True))
    ckpt = None if args.no_checkpoint else out / "checkpoint.pt"
    result = train(cfg, recorder, checkpoint=ckpt, keep_checkpoint=args.keep_checkpoint)
    if d.is_main:
        print(f"median val error (last {cfg.report_last} epochs) "
              f"{result.summary['median_val_error']:.2f}%, final "
              f"{result.summary['final_val_error']:.2f}%")
    runtime.leave_distributed()
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a preset's grid (plus --set axes) into a results database."""
    from groupnorm.experiments.presets import load_preset
    from groupnorm.experiments.sweep import run_sweep

    preset = load_preset(args.preset)
    db = Path(args.db) if args.db else Path("runs") / f"{preset.name}.db"
    counts = run_sweep(preset, db, overrides=_overrides(args, lists=True), studies=args.study,
                       retry_failed=args.retry_failed, progress=not args.no_progress,
                       jobs=args.jobs, reclaim=args.reclaim)
    return 1 if counts.get("failed") else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.md + figures (+ CSVs) from a results database, or print it."""
    from groupnorm.experiments.config import ConfigError
    from groupnorm.experiments.report import build_report, render_report, terminal_text
    from groupnorm.experiments.store import Store

    if args.out is None and not args.print:
        raise ConfigError("say where the report goes: -o FOLDER, or --print for the terminal")
    if args.out is None:
        with Store(args.db, readonly=True) as store:
            print(terminal_text(render_report(store, None, title=args.title)), end="")
        return 0
    path = build_report(args.db, args.out, plots=not args.no_plots, csv_export=args.csv,
                        title=args.title)
    if args.print:
        print(terminal_text(path.read_text(encoding="utf-8")), end="")
    print(f"wrote {path}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Run a reproduction preset end to end: sweep, report, and the findings printed."""
    from groupnorm.experiments.presets import load_preset
    from groupnorm.experiments.report import build_report, terminal_text
    from groupnorm.experiments.sweep import run_sweep

    preset = load_preset(args.preset)
    out = Path(args.out or preset.out or Path("results") / preset.name)
    db = Path(args.db) if args.db else out / "runs.db"
    overrides = _overrides(args, lists=True)
    t0 = time.perf_counter()
    print(f"groupnorm reproduce --preset {preset.name}: {preset.description}")
    counts = run_sweep(preset, db, overrides=overrides, studies=args.study,
                       retry_failed=args.retry_failed, progress=not args.no_progress,
                       jobs=args.jobs, reclaim=args.reclaim)
    wall = time.perf_counter() - t0
    path = build_report(db, out, plots=True, csv_export=args.csv)
    print()
    print(terminal_text(path.read_text(encoding="utf-8")), end="")
    print(f"\nwall time {wall / 60:.1f} min; report: {path}; database: {db}")
    return 1 if counts.get("failed") else 0


def cmd_export_db(args: argparse.Namespace) -> int:
    """Write a single-file copy of a results database (its write-ahead log folded in)."""
    from groupnorm.experiments.store import Store

    with Store(args.db) as store:
        dest = store.export(args.dest)
        counts = store.counts()
    print(f"wrote {dest} ({', '.join(f'{v} {k}' for k, v in counts.items() if v) or 'no runs'})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print where a sweep stands: runs per status and study, what runs, the time left."""
    from groupnorm.experiments.progress import status_text

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if not Path(args.db).is_file():
        raise FileNotFoundError(f"no results database at {args.db}")
    print(status_text(args.db, jobs=args.jobs))
    return 0


def cmd_batch_noise(args: argparse.Namespace) -> int:
    """Batch-statistics noise per BN layer on each dataset, beside BN's penalty there."""
    from groupnorm.analysis import batchnoise
    from groupnorm.experiments.config import ConfigError, parse_assignment

    if args.replot:
        if args.run or args.dataset:
            raise ConfigError("--replot redraws a measured folder; it takes no --run/--dataset")
        paths = batchnoise.render(args.out, args.db)
        print(f"wrote {paths['png']}, {paths['md']} (from {paths['csv']} and the databases)")
        return 0
    if not args.run and not args.dataset:
        raise ConfigError("name the models to measure: --run FOLDER (a `groupnorm train "
                          "--keep-checkpoint` run) or --dataset NAME (train one here), or both")
    if args.train_epochs is not None and not args.dataset:
        raise ConfigError("--train-epochs trains the models of --dataset; give --dataset NAME")
    try:
        sizes = [int(v) for v in args.sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--sizes {args.sizes!r}: must be integers separated by commas, "
                          "e.g. 2,4,8,16,32") from None
    overrides = {}
    for text in args.overrides:
        key, values = parse_assignment(text)
        if len(values) != 1:
            raise ConfigError(f"--set {text}: one value per field here")
        overrides[key] = values[0]
    if args.train_epochs is not None and args.train_epochs < 1:
        raise ConfigError(f"--train-epochs {args.train_epochs}: must be >= 1")
    # everything named is checked before any model is trained
    batchnoise.check_request(sizes, args.population, args.draws, args.run, args.db)
    out = Path(args.out)
    runs = [Path(r) for r in args.run]
    epochs = args.train_epochs or batchnoise.TRAIN_DEFAULTS["epochs"]
    cfgs = [batchnoise.train_config(name, epochs, overrides, progress=not args.no_progress)
            for name in args.dataset]
    for cfg in cfgs:
        if cfg.train_size is not None and args.population > cfg.train_size:
            raise ConfigError(f"--population {args.population} exceeds the {cfg.train_size} "
                              f"training images of the {cfg.dataset} model (train_size); lower "
                              "it or --set train_size=N")
    for cfg in cfgs:
        print(f"BN model on {cfg.dataset}: {out / 'runs' / cfg.dataset}")
        runs.append(batchnoise.train_run(cfg, out / "runs" / cfg.dataset))
    paths = batchnoise.run_batch_noise(runs, out, dbs=args.db, sizes=sizes,
                                       population_size=args.population, draws=args.draws,
                                       seed=args.seed, progress=not args.no_progress,
                                       command="groupnorm " + " ".join(args.argv))
    print(paths["md"].read_text(encoding="utf-8").split("\n## What ran")[0].rstrip())
    print(f"wrote {paths['csv']}, {paths['png']}, {paths['md']}")
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    """Hand over to the operator benchmarks (groupnorm.bench)."""
    try:
        from groupnorm import bench
    except ImportError as exc:
        print(f"groupnorm bench is not available in this install ({exc}); the benchmarks live "
              "in groupnorm.bench (the kernels' module) and benchmarks/", file=sys.stderr)
        return 2
    return int(bench.main(rest) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    """Show the operator: GN vs torch on a random tensor, both against a float64 oracle."""
    import torch
    import torch.nn.functional as F

    import groupnorm
    from groupnorm.oracle import group_norm_reference

    torch.manual_seed(args.seed)
    n, c, h, w, g = args.shape
    x = torch.randn(n, c, h, w) * 3 + 1  # off-centre input: the mean must really be removed
    weight, bias = torch.randn(c), torch.randn(c)
    ref = group_norm_reference(x.double(), g, weight.double(), bias.double())
    print(f"group_norm on x of shape {tuple(x.shape)}, G={g} ({c // g} channels per group)")
    print(f"{'implementation':<28}{'max |err| vs float64':>22}{'time (ms)':>12}")
    rows = [("groupnorm.group_norm", lambda: groupnorm.group_norm(x, g, weight, bias)),
            ("torch.nn.functional", lambda: F.group_norm(x, g, weight, bias))]
    for backend in groupnorm.BACKENDS:
        if backend in ("auto", "torch"):
            continue
        rows.append((f"  backend={backend}",
                     lambda b=backend: groupnorm.group_norm(x, g, weight, bias, backend=b)))
    for name, fn in rows:
        try:
            y = fn()
        except Exception as exc:  # a backend absent on this machine (e.g. triton without GPU)
            print(f"{name:<28}{'unavailable: ' + type(exc).__name__:>22}")
            continue
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        ms = (time.perf_counter() - t0) * 100
        err = (y.double() - ref).abs().max().item()
        print(f"{name:<28}{err:>22.3e}{ms:>12.3f}")
    layer = groupnorm.GroupNorm(g, c)
    print(f"\nmodule: {layer}  (a drop-in for torch.nn.GroupNorm)")
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    """The `groupnorm` argument parser with one subcommand per action."""
    import groupnorm
    from groupnorm.experiments.presets import list_presets
    from groupnorm.experiments.runtime import code_version

    presets = ", ".join(list_presets())
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an expected error (as GROUPNORM_DEBUG=1)")
    parser = argparse.ArgumentParser(
        prog="groupnorm",
        formatter_class=FORMATTER,
        description="Group Normalization (Wu & He, ECCV 2018): train, sweep, report and "
                    "reproduce the paper's studies; benchmark and demo the operator.",
        epilog="examples:\n"
               "  groupnorm demo\n"
               "  groupnorm train --norm gn --batch-size 2 --epochs 3\n"
               "  groupnorm sweep quick --set seed=0,1,2 --db runs/quick.db\n"
               "  groupnorm report runs/quick.db -o runs/quick-report --csv\n"
               "  groupnorm report runs/quick.db --print\n"
               "  groupnorm reproduce --preset quick\n"
               "  groupnorm status runs/quick.db --jobs 2\n"
               "  groupnorm export-db runs/quick.db quick-copy.db\n"
               f"\nshipped presets: {presets}",
    )
    parser.add_argument("--version", action="version",
                        version=f"groupnorm {groupnorm.__version__} ({code_version()})")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the traceback of an expected error (as GROUPNORM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train", formatter_class=FORMATTER, help="train one configuration", parents=[common],
        description="Train one configuration (preset defaults < --set < flags). Writes "
                    "config.json, run.json (device, code version, data files), epochs.jsonl and "
                    "summary.json to --out; an interrupted run continues from its last epoch "
                    "checkpoint when started again (a checkpoint that does not match the folder "
                    "is discarded with a warning and the run starts over). Under torchrun "
                    "it is data-parallel (DDP, gloo on CPU), each rank a worker whose batch is "
                    "workers*batch_size; only rank 0 writes.",
        epilog="examples:\n"
               "  groupnorm train --preset quick --norm bn --batch-size 4 --seed 1\n"
               "  groupnorm train --dataset synthetic --set dataset_options.n=512 --epochs 2\n"
               "  torchrun --nproc_per_node=2 -m groupnorm train --workers 1 --batch-size 8 "
               "--set dataset=synthetic",
    )
    p.add_argument("--preset", help=f"start from a preset's defaults ({presets} or a .toml path)")
    p.add_argument("--out", help="output folder (default runs/train/<config hash>)")
    p.add_argument("--no-checkpoint", action="store_true", help="do not checkpoint epochs")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the final checkpoint")
    _add_config_args(p, lists=False)

    p = sub.add_parser(
        "sweep", formatter_class=FORMATTER, help="run a grid of configurations into a database",
        parents=[common],
        description="Run every configuration of a preset's studies (and --set axes) into a "
                    "SQLite results database. Every grid point is checked first (values, "
                    "names, the model built dry, the device): a problem stops the sweep before "
                    "anything is queued. Safe to kill at any moment: rerun the same command "
                    "and finished runs are skipped, an interrupted run resumes from its last "
                    "epoch, and each run is recorded exactly once. Failed runs are recorded with "
                    "their error and skipped (rerun them with --retry-failed); the sweep exits "
                    "with 1 if any of its runs has failed.",
        epilog="examples:\n"
               "  groupnorm sweep quick\n"
               "  groupnorm sweep quick --set seed=0,1,2 --db runs/q.db\n"
               "  groupnorm sweep full --study batch_size --device cuda\n"
               "  groupnorm sweep my.toml --set norm=bn,gn --set batch_size=2,32 --retry-failed",
    )
    p.add_argument("preset", help=f"preset name ({presets}) or path to a .toml file")
    p.add_argument("--db", help="results database (default runs/<preset>.db)")
    p.add_argument("--study", action="append", help="run only this study (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="queue failed runs again")
    p.add_argument("--reclaim", action="store_true", help=RECLAIM_HELP)
    p.add_argument("--no-progress", action="store_true", help="log lines instead of tqdm bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (default 1)")
    _add_config_args(p, lists=True)

    p = sub.add_parser(
        "report", formatter_class=FORMATTER, help="write report.md + figures from a database",
        parents=[common],
        description="Build report.md and PNG figures from a results database alone: mean ± "
                    "std over seeds per cell, error vs batch size, error curves, group "
                    "ablations, and the paper's numbers beside ours. Same database, same "
                    "report.md, byte for byte.",
        epilog="examples:\n"
               "  groupnorm report results/quick/runs.db -o results/quick\n"
               "  groupnorm report runs/full.db -o runs/full-report --csv\n"
               "  groupnorm report runs/full.db --print",
    )
    p.add_argument("db", help="results database written by sweep/reproduce (opened read-only)")
    p.add_argument("-o", "--out", help="output folder")
    p.add_argument("--print", action="store_true",
                   help="print the report's text and tables to the terminal (with -o: also)")
    p.add_argument("--csv", action="store_true", help="also export runs.csv and epochs.csv")
    p.add_argument("--no-plots", action="store_true", help="markdown only")
    p.add_argument("--title", help="report title")

    p = sub.add_parser(
        "reproduce", formatter_class=FORMATTER, help="run the paper's studies end to end",
        parents=[common],
        description="Sweep a reproduction preset, write its report and print the findings "
                    "next to the paper's claims. `quick`: BN's small-batch penalty (n = 2 vs "
                    "32) on real CIFAR-10, about 10 minutes on 2 CPU cores. `full`: the paper's "
                    "studies on CIFAR-10 (group ablation, batch size, training length, norms, "
                    "batch renorm, weight standardization, fine-tuning) and the seed report's, "
                    "hours. `fmnist-*`: the same on Fashion-MNIST (and video). Rerunning "
                    "continues where it stopped.",
        epilog="examples:\n"
               "  groupnorm reproduce                       # = --preset quick\n"
               "  groupnorm reproduce --preset full --device cuda\n"
               "  groupnorm reproduce --preset full --study batch_size --db runs/full.db",
    )
    p.add_argument("--preset", default="quick", help=f"{presets} or a .toml path")
    p.add_argument("--db", help="results database (default <out>/runs.db)")
    p.add_argument("--out", help="report folder (default: the preset's `out`, else "
                   "results/<preset>)")
    p.add_argument("--study", action="append", help="run only this study (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="queue failed runs again")
    p.add_argument("--csv", action="store_true", help="also export runs.csv and epochs.csv")
    p.add_argument("--reclaim", action="store_true", help=RECLAIM_HELP)
    p.add_argument("--no-progress", action="store_true", help="log lines instead of tqdm bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (default 1)")
    _add_config_args(p, lists=True)

    p = sub.add_parser(
        "status", formatter_class=FORMATTER, parents=[common],
        help="where a sweep stands, and how long the rest takes",
        description="Runs per status and per study, the runs in progress (epoch, heartbeat), "
                    "and an estimate of the time left from the epoch times the database already "
                    "holds for runs of the same kind (model, data, images per worker, norm). "
                    "The database is opened read-only and may be in use by a sweep.",
        epilog="example:\n  groupnorm status results/cifar10/runs.db --jobs 2",
    )
    p.add_argument("db", help="results database")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time for the time-left figure (default 1)")

    p = sub.add_parser(
        "export-db", formatter_class=FORMATTER, parents=[common],
        help="write a single-file copy of a results database",
        description="Copy a results database into one self-contained file (SQLite VACUUM "
                    "INTO): what its write-ahead log (runs.db-wal) still holds is included, so "
                    "the copy can be moved alone. The database may be in use by a sweep.",
        epilog="example:\n  groupnorm export-db runs/full.db full-2026-12-01.db",
    )
    p.add_argument("db", help="results database")
    p.add_argument("dest", help="the copy to write (must not exist)")

    p = sub.add_parser(
        "batch-noise", formatter_class=FORMATTER, parents=[common],
        help="how far n-image BN statistics stray from the population's, per layer and dataset",
        description="Beyond the paper: for a trained BN model and the same model at its "
                    "initialization, measure per BN layer how far the per-channel mean and "
                    "variance of n-image batches stray from the population's (RMS over "
                    "batches of (mu_B - mu)/sigma and (var_B - var)/var, averaged over "
                    "channels), for each n of --sizes, on each dataset; set it beside each "
                    "dataset's BN penalty (error at n=2 minus n=32) from the --db databases. "
                    "Writes batch_noise.csv, batch_noise_eval.csv, batch_noise_meta.json, "
                    "batch_noise.png and batch_noise.md to -o (--replot redraws the last "
                    "two). Models come from run folders (--run) or are trained here through "
                    "the harness (--dataset, --train-epochs; default resnet20 width 8, BN, "
                    "n=32, W=4, 10000 images; --set changes it) into <out>/runs/<dataset>, "
                    "reused when run again.",
        epilog="examples:\n"
               "  groupnorm batch-noise --dataset cifar10-jpeg --dataset fashion-mnist "
               "--train-epochs 6 \\\n"
               "      --db results/batch-noise/runs.db -o results/batch-noise\n"
               "  groupnorm train --dataset fashion-mnist --norm bn --keep-checkpoint --out "
               "runs/fm\n"
               "  groupnorm batch-noise --run runs/fm --db results/quick/runs.db -o runs/noise",
    )
    p.add_argument("--run", action="append", default=[],
                   help="run folder of a BN model with its kept checkpoint (repeatable, one "
                        "per dataset)")
    p.add_argument("--dataset", action="append", default=[],
                   help="train a BN model on this dataset first (repeatable)")
    p.add_argument("--train-epochs", type=int,
                   help="epochs of each model trained for --dataset (default 6, "
                        "groupnorm.analysis.batchnoise.TRAIN_DEFAULTS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change the trained models' config (model=simplenetv2, ...)")
    p.add_argument("--db", action="append", default=[],
                   help="results database to take each dataset's BN penalty from (repeatable; "
                        "the first with a BN batch-size study on the dataset is used)")
    p.add_argument("--sizes", default="2,4,8,16,32", help="batch sizes n (default 2,4,8,16,32)")
    p.add_argument("--population", type=int, default=5000,
                   help="training images that stand for the population (default 5000)")
    p.add_argument("--draws", type=int, default=2000,
                   help="at least this many batches per n (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the population and batches")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of tqdm bars")
    p.add_argument("--replot", action="store_true",
                   help="redraw the figure and summary of -o from its CSVs and --db, without "
                        "measuring (after the databases gained runs)")
    p.add_argument("-o", "--out", required=True, help="output folder")

    sub.add_parser(
        "bench", formatter_class=FORMATTER, add_help=False,
        help="operator benchmarks (arguments go to groupnorm.bench; see bench --help)",
        description="Benchmarks of the GN operator; every argument is passed to "
                    "groupnorm.bench.main.",
    )

    p = sub.add_parser(
        "demo", formatter_class=FORMATTER, help="GN vs torch on a random tensor, vs float64",
        parents=[common],
        description="A short demo of the operator: groupnorm.group_norm and torch's group_norm "
                    "on a random tensor, each compared with the float64 reference.",
        epilog="example:\n  groupnorm demo --shape 4 64 32 32 32",
    )
    p.add_argument("--shape", type=int, nargs=5, default=[8, 64, 28, 28, 32],
                   metavar=("N", "C", "H", "W", "G"), help="input shape and groups")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `groupnorm` console script and `python -m groupnorm`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to groupnorm.bench
        return cmd_bench(argparse.Namespace(), argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given, for the records that name it
    commands = {"train": cmd_train, "sweep": cmd_sweep, "report": cmd_report,
                "reproduce": cmd_reproduce, "export-db": cmd_export_db, "status": cmd_status,
                "demo": cmd_demo,
                "batch-noise": cmd_batch_noise}
    from groupnorm.experiments.runtime import debug_enabled

    try:
        return commands[args.command](args)
    except _expected_errors() as exc:
        if args.debug or debug_enabled():
            raise
        parser.exit(2, f"groupnorm {args.command}: error: {_one_line(exc)}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"groupnorm {args.command}: interrupted; rerun the same command to "
                         "continue\n")
    return 0


RECLAIM_HELP = ("also take over runs held by processes on other hosts (they cannot be checked "
                "from here): use it when that host's sweep is known to be dead. Runs of a dead "
                "process on this host are taken over without it; a live one's never are")


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: bad values, missing data, unwritable files."""
    from groupnorm.data import CorruptDatasetError, DatasetNotFoundError
    from groupnorm.experiments.config import ConfigError
    from groupnorm.experiments.store import StoreError
    from groupnorm.experiments.sweep import SweepStopped

    return (ConfigError, StoreError, SweepStopped, DatasetNotFoundError, CorruptDatasetError,
            OSError, ValueError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
