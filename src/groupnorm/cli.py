"""`groupnorm` command line: train, sweep, report, reproduce, bench, demo.

Every command resolves a TrainConfig the same way: preset defaults (TOML) < `--set key=value`
overrides < the common flags (--norm, --batch-size, ...). The resolved config is stored with
every run. Run `groupnorm COMMAND --help` for each command's examples.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ("--threads", "num_threads", "torch CPU threads (0: torch's default)"),
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
    from groupnorm.experiments.config import check_key, parse_assignment, split_values

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
            raise SystemExit(f"error: train takes one value per field, got {multi}; "
                             "use `groupnorm sweep` for grids")
    return out


# ---------------------------------------------------------------------------------------------
# commands


def cmd_train(args: argparse.Namespace) -> int:
    """Train one configuration; results (config, per-epoch metrics, summary) go to --out."""
    from groupnorm.experiments.config import load_preset, make_config
    from groupnorm.experiments.train import train

    overrides = {k: v[0] for k, v in _overrides(args, lists=False).items()}
    base = load_preset(args.preset).defaults if args.preset else {}
    cfg = make_config({**base, **overrides})
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out) if args.out else Path("runs") / "train" / cfg.config_hash()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        print(f"run {cfg.config_hash()} -> {out}")
        print(json.dumps(cfg.identity(), sort_keys=True))
    metrics_path = out / "epochs.jsonl"

    def on_resume(epoch: int) -> None:
        # keep only the lines the checkpoint covers (same rule as the sweep's epoch rows)
        if metrics_path.exists():
            lines = [ln for ln in metrics_path.read_text().splitlines()
                     if ln and json.loads(ln)["epoch"] <= epoch]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))

    def on_epoch(epoch: int, row: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, **row}, sort_keys=True) + "\n")

    ckpt = None if args.no_checkpoint else out / "checkpoint.pt"
    result = train(cfg, checkpoint_path=ckpt, on_epoch=on_epoch, on_resume=on_resume)
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        summary = {**result.summary, "timings": result.timings, "world_size": world}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        if ckpt is not None and not args.keep_checkpoint:
            ckpt.unlink(missing_ok=True)
        print(f"median val error (last {cfg.report_last} epochs) "
              f"{result.summary['median_val_error']:.2f}%, final "
              f"{result.summary['final_val_error']:.2f}%")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a preset's grid (plus --set axes) into a results database."""
    from groupnorm.experiments.config import load_preset
    from groupnorm.experiments.sweep import run_sweep

    preset = load_preset(args.preset)
    db = Path(args.db) if args.db else Path("runs") / f"{preset.name}.db"
    counts = run_sweep(preset, db, overrides=_overrides(args, lists=True), studies=args.study,
                       retry_failed=args.retry_failed, progress=not args.no_progress,
                       jobs=args.jobs)
    return 1 if counts.get("failed") and args.strict else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.md + figures (+ CSVs) from a results database."""
    from groupnorm.experiments.report import build_report

    if not Path(args.db).exists():
        raise SystemExit(f"error: no database at {args.db}; run `groupnorm sweep` first")
    path = build_report(args.db, args.out, plots=not args.no_plots, csv_export=args.csv,
                        title=args.title)
    print(f"wrote {path}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Run a reproduction preset end to end: sweep, report, and the findings printed."""
    from groupnorm.experiments.config import load_preset
    from groupnorm.experiments.report import build_report
    from groupnorm.experiments.sweep import run_sweep

    preset = load_preset(args.preset)
    out = Path(args.out) if args.out else Path("results") / preset.name
    db = Path(args.db) if args.db else out / "runs.db"
    overrides = _overrides(args, lists=True)
    t0 = time.perf_counter()
    print(f"groupnorm reproduce --preset {preset.name}: {preset.description}")
    counts = run_sweep(preset, db, overrides=overrides, studies=args.study,
                       retry_failed=args.retry_failed, progress=not args.no_progress,
                       jobs=args.jobs)
    wall = time.perf_counter() - t0
    path = build_report(db, out, plots=True, csv_export=args.csv)
    text = path.read_text()
    print()
    for line in text.splitlines():
        if not line.startswith("!["):
            print(line)
    print(f"\nwall time {wall / 60:.1f} min; report: {path}; database: {db}")
    return 1 if counts.get("failed") and args.strict else 0


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
    from groupnorm.experiments.config import list_presets

    presets = ", ".join(list_presets())
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
               "  groupnorm reproduce --preset quick\n"
               f"\nshipped presets: {presets}",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train", formatter_class=FORMATTER, help="train one configuration",
        description="Train one configuration (preset defaults < --set < flags). Writes "
                    "config.json, epochs.jsonl and summary.json to --out; an interrupted run "
                    "continues from its last epoch checkpoint when started again. Under torchrun "
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
        description="Run every configuration of a preset's studies (and --set axes) into a "
                    "SQLite results database. Safe to kill at any moment: rerun the same command "
                    "and finished runs are skipped, an interrupted run resumes from its last "
                    "epoch, and each run is recorded exactly once. Failed runs are recorded with "
                    "their error and skipped (rerun them with --retry-failed).",
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
    p.add_argument("--strict", action="store_true", help="exit 1 if any run failed")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of tqdm bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (default 1)")
    _add_config_args(p, lists=True)

    p = sub.add_parser(
        "report", formatter_class=FORMATTER, help="write report.md + figures from a database",
        description="Build report.md and PNG figures from a results database alone: mean ± "
                    "std over seeds per cell, error vs batch size, error curves, group "
                    "ablations, and the paper's numbers beside ours. Same database, same "
                    "report.md, byte for byte.",
        epilog="examples:\n"
               "  groupnorm report results/quick/runs.db -o results/quick\n"
               "  groupnorm report runs/full.db -o runs/full-report --csv",
    )
    p.add_argument("db", help="results database written by sweep/reproduce")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--csv", action="store_true", help="also export runs.csv and epochs.csv")
    p.add_argument("--no-plots", action="store_true", help="markdown only")
    p.add_argument("--title", help="report title")

    p = sub.add_parser(
        "reproduce", formatter_class=FORMATTER, help="run the paper's studies end to end",
        description="Sweep a reproduction preset, write its report and print the findings "
                    "next to the paper's claims. `quick`: BN vs GN over batch sizes on real "
                    "Fashion-MNIST, about 10 minutes on 2 CPU cores. `full`: every study "
                    "(batch size, norms, groups, batch renorm, weight standardization, "
                    "fine-tuning, video), resumable across sessions. Rerunning continues where "
                    "it stopped.",
        epilog="examples:\n"
               "  groupnorm reproduce                       # = --preset quick\n"
               "  groupnorm reproduce --preset full --device cuda\n"
               "  groupnorm reproduce --preset full --study batch_size --db runs/full.db",
    )
    p.add_argument("--preset", default="quick", help=f"{presets} or a .toml path")
    p.add_argument("--db", help="results database (default <out>/runs.db)")
    p.add_argument("--out", help="report folder (default results/<preset>)")
    p.add_argument("--study", action="append", help="run only this study (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="queue failed runs again")
    p.add_argument("--csv", action="store_true", help="also export runs.csv and epochs.csv")
    p.add_argument("--strict", action="store_true", help="exit 1 if any run failed")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of tqdm bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (default 1)")
    _add_config_args(p, lists=True)

    sub.add_parser(
        "bench", formatter_class=FORMATTER, add_help=False,
        help="operator benchmarks (arguments go to groupnorm.bench; see bench --help)",
        description="Benchmarks of the GN operator; every argument is passed to "
                    "groupnorm.bench.main.",
    )

    p = sub.add_parser(
        "demo", formatter_class=FORMATTER, help="GN vs torch on a random tensor, vs float64",
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
    commands = {"train": cmd_train, "sweep": cmd_sweep, "report": cmd_report,
                "reproduce": cmd_reproduce, "demo": cmd_demo}
    try:
        return commands[args.command](args)
    except ValueError as exc:  # bad configuration: one line (GROUPNORM_DEBUG=1: traceback)
        if os.environ.get("GROUPNORM_DEBUG"):
            raise
        parser.exit(2, f"groupnorm {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
