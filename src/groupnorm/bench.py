"""`groupnorm bench`: GroupNorm operator benchmark — our fast backend vs torch, and vs a copy.

For each shape × layout (NCHW / NHWC) × dtype × variant (plain GN, GN+SiLU) × pass (fwd, bwd,
fwd+bwd) it times torch (``F.group_norm``, then ``F.silu`` for the fused variant) and our backend
(``"cpu"`` on the CPU, ``"triton"`` on CUDA) round-robin with ``x.clone()`` in the same loop, so
that ratios come from the same minutes of a shared, noisy machine. Reported per measurement:
p20 / p50 / p80 time, GB/s from the bytes that must move (fwd: read x, write y; bwd: read x and
dy, write dx; fwd+bwd: both), GB/s ÷ the clone's GB/s (``frac_of_copy``), and torch p50 ÷ ours
p50 (``speedup``). One tidy CSV row per measurement, plus a printed table.

Channels-last on the CPU gets a fourth contender, ``torch-robust``: aten's CPU channels-last
kernel computes E[x²]−E[x]² in fp32 (wrong by orders of magnitude at a large mean offset), so
``group_norm(..., backend="torch")`` runs such input through aten's robust NCHW kernel; the
``vs_robust`` column is that contender's p50 ÷ ours.

On the CPU the allocator is first told to keep freed memory (glibc ``mallopt``): otherwise every
tensor above the mmap threshold is a fresh mapping whose pages fault in on first write, which
costs more than the kernel itself at these sizes (25 MB: ~5 ms of faults vs a 1.3 ms copy) and
lands on whichever contender allocated last. ``--fresh-pages`` keeps glibc's defaults.

    groupnorm bench                       # CPU: 2 threads, quick subset, fp32 (a few minutes)
    groupnorm bench --device cuda         # all shapes, fp32 / bf16 / fp16
    groupnorm bench --shapes 8x256x56x56 --dtype fp32,bf16 --csv out/bench.csv
    groupnorm bench --plot-only out/bench.csv --plot out/bench.png   # a figure from CSV rows
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

GROUPS = 32
ALL_SHAPES = [
    (32, 64, 56, 56),
    (8, 256, 32, 32),
    (1, 512, 64, 64),
    (2, 320, 64, 64),
    (1, 128, 64, 64),
    (1, 128, 16, 64, 64),  # video
    (8, 256, 56, 56),  # 25.7 MB in fp32: the CPU target size
]
# CPU default: the 25 MB target plus a small, a single-sample and a video case.
QUICK_SHAPES = [(8, 256, 56, 56), (8, 256, 32, 32), (1, 128, 64, 64), (1, 128, 16, 64, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "bwd", "fwd+bwd")
# tensors of x's size that must move per pass (reads + writes)
TENSORS_MOVED = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
FIELDS = ["timestamp", "device", "device_name", "torch", "triton", "threads", "allocator",
          "shape", "layout", "dtype", "variant", "pass", "backend", "p20_ms", "p50_ms", "p80_ms",
          "gbps", "frac_of_copy", "speedup", "vs_robust", "bytes"]
ROBUST = "torch-robust"


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not like 8x256x32x32") from err
    if len(shape) not in (4, 5):
        raise argparse.ArgumentTypeError(f"shape {text!r} must have 4 or 5 dims (N, C, *spatial)")
    return shape


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="groupnorm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--shapes", default=None,
                   help="'quick', 'all', or comma-separated NxCxHxW[xD] "
                        "(default: quick on CPU, all on CUDA)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated of fp32,bf16,fp16 (default: fp32 on CPU, all on CUDA)")
    p.add_argument("--layouts", default="nchw,nhwc", help="comma-separated of nchw,nhwc")
    p.add_argument("--variants", default="gn,gn+silu", help="comma-separated of gn,gn+silu")
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated of fwd,bwd,fwd+bwd")
    p.add_argument("--csv", default=None, type=Path, help="append rows to this CSV file")
    p.add_argument("--plot", default=None, type=Path,
                   help="draw the rows (ours ÷ torch and fraction of copy per case) into a PNG")
    p.add_argument("--plot-only", default=None, type=Path, metavar="CSV",
                   help="measure nothing: draw --plot from the rows of this CSV (several runs "
                        "of a case are drawn as their median with a min-max bar)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--min-time", type=float, default=0.4,
                   help="seconds of timing per contender and case (default: 0.4)")
    p.add_argument("--reps", type=int, default=None, help="fixed repetitions (overrides min-time)")
    p.add_argument("--fresh-pages", action="store_true",
                   help="CPU: keep glibc's allocator defaults (every large tensor is a new "
                        "mapping whose pages fault in on first write) instead of reusing memory")
    p.add_argument("--clean-rounds", action="store_true",
                   help="on a shared machine: keep only the round-robin rounds in which the copy "
                        "ran within 1.25x of its fastest time (falls back to all rounds if fewer "
                        "than 3 remain)")
    return p


def reuse_freed_memory() -> bool:
    """Tell glibc malloc to keep and reuse freed memory; False where that is not possible.

    Sets M_MMAP_THRESHOLD to 1 GiB (large tensors come from the heap, not from fresh mappings)
    and M_TRIM_THRESHOLD to 2 GiB (freed heap memory is not handed back to the kernel), so
    repeated allocations of the same size reuse pages that are already mapped.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)
                    and libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Overwrite a 256 MB buffer so that the next kernel starts from a cold L2 (an H100's L2 is
    50 MB: without this, the bench's 25 MB tensors would be read from L2, above HBM speed)."""
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    _L2_FLUSH[device].zero_()


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call (CUDA: events around the call, L2 flushed before it)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _flush_l2(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fns: dict[str, Callable[[], object]], device: torch.device, min_time: float,
            reps: int | None = None) -> dict[str, list[float]]:
    """Times each function round-robin (warm-up first); returns the samples in seconds."""
    for fn in fns.values():  # warm-up: compile / allocate / fault pages in
        fn()
        fn()
    _sync(device)
    if reps is None:
        one = sum(_time_once(fn, device) for fn in fns.values())
        reps = int(min(200, max(7, min_time * len(fns) / max(one, 1e-6))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device))
    return samples


def clean_rounds(samples: dict[str, list[float]], ref: str = "copy",
                 slack: float = 1.25) -> dict[str, list[float]]:
    """Samples of the rounds in which ``ref`` ran within ``slack`` of its fastest time."""
    best = min(samples[ref])
    keep = [i for i, t in enumerate(samples[ref]) if t <= slack * best]
    if len(keep) < 3:
        return samples
    return {k: [v[i] for i in keep] for k, v in samples.items()}


def _quantiles(ts: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return q[1], statistics.median(ts), q[7]


def _make_op(backend: str, variant: str, groups: int) -> Callable:
    act = "silu" if variant == "gn+silu" else None

    if backend == "torch":
        def op(x, w, b):
            y = F.group_norm(x, groups, w, b, 1e-5)
            return F.silu(y) if act else y
    elif backend == ROBUST:
        from groupnorm.functional import group_norm

        def op(x, w, b):
            return group_norm(x, groups, w, b, 1e-5, activation=act, backend="torch")
    else:
        from groupnorm.kernels import group_norm_fast

        def op(x, w, b):
            return group_norm_fast(backend, x, groups, w, b, 1e-5, act, None)
    return op


def _pass_fn(op: Callable, pass_: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
             dy: torch.Tensor) -> Callable[[], object]:
    xg = x.detach().requires_grad_()
    wg = w.detach().requires_grad_()
    bg = b.detach().requires_grad_()
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return op(x, w, b)
    elif pass_ == "bwd":
        y = op(xg, wg, bg)

        def fn():
            return torch.autograd.grad(y, [xg, wg, bg], dy, retain_graph=True)
    else:
        def fn():
            y = op(xg, wg, bg)
            return torch.autograd.grad(y, [xg, wg, bg], dy)
    return fn


def _env(device: torch.device, allocator: str = "") -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        triton_version = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        from groupnorm._sysinfo import cpu_model

        name = cpu_model() or platform.processor() or platform.machine()
    return {"timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": device.type, "device_name": name, "torch": torch.__version__,
            "triton": triton_version,
            "threads": str(torch.get_num_threads()) if device.type == "cpu" else "",
            "allocator": allocator}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                        else torch.channels_last_3d)


def run(shapes: list[tuple[int, ...]], dtypes: list[str], layouts: list[str],
        variants: list[str], passes: list[str], device: torch.device, min_time: float,
        reps: int | None = None, clean: bool = False,
        allocator: str = "") -> list[dict[str, object]]:
    """All measurements as tidy rows (see FIELDS)."""
    ours = "triton" if device.type == "cuda" else "cpu"
    env = _env(device, allocator)
    rows: list[dict[str, object]] = []
    for shape in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for layout in layouts:
                torch.manual_seed(0)
                x = _layout(torch.randn(shape, device=device, dtype=dtype), layout)
                dy = _layout(torch.randn(shape, device=device, dtype=dtype), layout)
                c = shape[1]
                w = torch.rand(c, device=device, dtype=dtype) + 0.5
                b = torch.randn(c, device=device, dtype=dtype)
                nbytes = x.numel() * x.element_size()
                base = {**env, "shape": "x".join(map(str, shape)), "layout": layout,
                        "dtype": dname}
                for variant in variants:
                    t_op, o_op = _make_op("torch", variant, GROUPS), _make_op(ours, variant,
                                                                              GROUPS)
                    with torch.no_grad():  # sanity: ours agrees with torch before timing
                        diff = (t_op(x, w, b).float() - o_op(x, w, b).float()).abs().max().item()
                    if diff > (1e-3 if dtype == torch.float32 else 0.1):
                        raise RuntimeError(f"{ours} differs from torch by {diff} on {shape} "
                                           f"{layout} {dname} {variant}")
                    # aten's CPU channels-last kernel is not robust (see the module docstring)
                    robust = device.type == "cpu" and layout == "nhwc"
                    for pass_ in passes:
                        fns = {"copy": lambda x=x: x.clone(),
                               "torch": _pass_fn(t_op, pass_, x, w, b, dy),
                               ours: _pass_fn(o_op, pass_, x, w, b, dy)}
                        if robust:
                            fns[ROBUST] = _pass_fn(_make_op(ROBUST, variant, GROUPS), pass_,
                                                   x, w, b, dy)
                        samples = measure(fns, device, min_time, reps)
                        if clean:
                            samples = clean_rounds(samples)
                        q = {k: _quantiles(v) for k, v in samples.items()}
                        copy_gbps = 2 * nbytes / q["copy"][1] / 1e9
                        moved = TENSORS_MOVED[pass_] * nbytes
                        for backend in fns:
                            p20, p50, p80 = q[backend]
                            is_copy = backend == "copy"
                            gbps = (2 * nbytes if is_copy else moved) / p50 / 1e9
                            rows.append({**base, "variant": "copy" if is_copy else variant,
                                         "pass": "copy" if is_copy else pass_,
                                         "backend": backend, "p20_ms": p20 * 1e3,
                                         "p50_ms": p50 * 1e3, "p80_ms": p80 * 1e3,
                                         "gbps": gbps, "frac_of_copy": gbps / copy_gbps,
                                         "speedup": q["torch"][1] / p50,
                                         "vs_robust": q[ROBUST][1] / p50 if robust else "",
                                         "bytes": 2 * nbytes if is_copy else moved})
                        _print_case(rows[-len(fns):], ours)
    return rows


_HEADER = (f"{'shape':<16} {'layout':<5} {'dtype':<5} {'variant':<8} {'pass':<8} "
           f"{'copy ms':>8} {'torch ms':>9} {'ours ms':>9} {'speedup':>10} "
           f"{'GB/s':>7} {'of copy':>7} {'vs_robust':>9}")


def _print_case(rows: list[dict[str, object]], ours: str) -> None:
    r = {row["backend"]: row for row in rows}
    o = r[ours]
    print(f"{o['shape']:<16} {o['layout']:<5} {o['dtype']:<5} {o['variant']:<8} "
          f"{o['pass']:<8} {r['copy']['p50_ms']:8.2f} {r['torch']['p50_ms']:9.2f} "
          f"{o['p50_ms']:9.2f} {o['speedup']:9.2f}x {o['gbps']:7.1f} "
          f"{o['frac_of_copy']:7.2f} "
          f"{f'{v:8.2f}x' if isinstance(v := o['vs_robust'], float) else '-':>9}", flush=True)


def read_csv(path: Path) -> list[dict[str, object]]:
    """Rows written by :func:`write_csv`, numbers as floats."""
    numeric = {"p20_ms", "p50_ms", "p80_ms", "gbps", "frac_of_copy", "speedup", "vs_robust",
               "bytes"}
    with path.open(newline="") as fh:
        return [{k: (float(v) if k in numeric and v != "" else v) for k, v in row.items()}
                for row in csv.DictReader(fh)]


def plot_rows(rows: list[dict[str, object]], path: Path) -> Path:
    """Two panels per (shape, dtype): ours ÷ torch (and torch-robust ÷ ours where measured) and
    ours' fraction of copy bandwidth, one group of bars per layout × variant × pass. Several
    rows of one case (repeated runs) are drawn as the median with a min-max bar."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["backend"] in ("cpu", "triton")]
    if not ours:
        raise ValueError("no rows of our backend ('cpu' or 'triton') to plot")
    panels = sorted({(r["shape"], r["dtype"]) for r in ours})
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 3.6 * len(panels)), squeeze=False)
    for (shape, dtype), (ax_speed, ax_copy) in zip(panels, axes, strict=True):
        cases: dict[tuple[str, str, str], list[dict[str, object]]] = {}
        for r in ours:
            if (r["shape"], r["dtype"]) == (shape, dtype):
                cases.setdefault((r["layout"], r["variant"], r["pass"]), []).append(r)
        keys = sorted(cases, key=lambda k: (k[0], k[1], PASSES.index(k[2])))
        xs = np.arange(len(keys))

        def bars(ax, field, offset, width, label, color, keys=keys, cases=cases, xs=xs):
            vals = [[float(r[field]) for r in cases[k] if r[field] not in ("", None)]
                    for k in keys]
            med = np.array([np.median(v) if v else np.nan for v in vals])
            lo = np.array([med[i] - min(v) if v else 0.0 for i, v in enumerate(vals)])
            hi = np.array([max(v) - med[i] if v else 0.0 for i, v in enumerate(vals)])
            ax.bar(xs + offset, med, width, yerr=[lo, hi], capsize=2, label=label, color=color)

        bars(ax_speed, "speedup", -0.2, 0.4, "ours ÷ torch (F.group_norm)", "tab:blue")
        if any(r["vs_robust"] not in ("", None) for k in keys for r in cases[k]):
            bars(ax_speed, "vs_robust", 0.2, 0.4, "torch-robust ÷ ours (channels-last)",
                 "tab:orange")
        ax_speed.axhline(1.0, color="k", lw=0.8)
        ax_speed.set_ylabel("speed ratio (> 1: ours faster)")
        bars(ax_copy, "frac_of_copy", 0.0, 0.6, "ours: GB/s ÷ copy GB/s", "tab:green")
        ax_copy.axhline(0.8, color="tab:red", lw=0.8, ls="--", label="0.8 (the CPU target)")
        ax_copy.set_ylabel("fraction of copy bandwidth")
        for ax in (ax_speed, ax_copy):
            ax.set_xticks(xs, ["\n".join(k) for k in keys], fontsize=7)
            ax.set_title(f"{shape} {dtype}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
            ax.grid(axis="y", alpha=0.3)
    first = ours[0]
    fig.suptitle(f"groupnorm bench: {first['device_name']}, torch {first['torch']}, "
                 f"threads {first['threads'] or '-'}, allocator {first.get('allocator') or '-'}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    """Append rows to a CSV (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v)
                             for k, v in row.items()})


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``groupnorm bench``; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.plot_only is not None:
        if args.plot is None:
            print("groupnorm bench: --plot-only needs --plot PATH.png", file=sys.stderr)
            return 2
        if not args.plot_only.is_file():
            print(f"groupnorm bench: no CSV at {args.plot_only}", file=sys.stderr)
            return 2
        print(f"# wrote {plot_rows(read_csv(args.plot_only), args.plot)}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("groupnorm bench: --device cuda asked for but CUDA is not available",
              file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    spec = args.shapes or ("quick" if device.type == "cpu" else "all")
    if spec == "quick":
        shapes = QUICK_SHAPES
    elif spec == "all":
        shapes = ALL_SHAPES
    else:
        shapes = [_parse_shape(s) for s in spec.split(",")]
    default = "fp32" if device.type == "cpu" else "fp32,fp16" + (
        ",bf16" if torch.cuda.is_bf16_supported() else "")
    dtypes = (args.dtype or default).split(",")
    for name in dtypes:
        if name not in DTYPES:
            print(f"groupnorm bench: unknown dtype {name!r}; use fp32, bf16 or fp16",
                  file=sys.stderr)
            return 2
    allocator = ""
    if device.type == "cpu":
        allocator = "fresh-pages" if args.fresh_pages or not reuse_freed_memory() else "reuse"
    env = _env(device, allocator)
    print(f"# {env['device_name']} | torch {env['torch']} | triton {env['triton'] or '-'} | "
          f"threads {env['threads'] or '-'} | allocator {allocator or '-'} | "
          f"{env['timestamp']} | G={GROUPS} | p50 of round-robin repeats; speedup = torch p50 "
          f"÷ ours (> 1: ours faster); 'of copy' = GB/s ÷ x.clone() GB/s in the same loop; "
          f"vs_robust = torch-robust p50 ÷ ours")
    print(_HEADER, flush=True)
    rows = run(shapes, dtypes, args.layouts.split(","), args.variants.split(","),
               args.passes.split(","), device, args.min_time, args.reps, args.clean_rounds,
               allocator)
    if args.csv is not None:
        write_csv(rows, args.csv)
        print(f"# wrote {len(rows)} rows to {args.csv}")
    if args.plot is not None:
        print(f"# wrote {plot_rows(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
