"""The CPU kernel's cache thresholds, A/B in one process: GN time under several settings of
``GROUPNORM_CPU_STREAM_MIN_BYTES`` (outputs at least this large are written with non-temporal
stores) and ``GROUPNORM_CPU_SLAB_CACHE_BYTES`` (the NHWC schedule's cache budget). The kernel reads
both at every call, so the settings are interleaved round-robin with a copy in one loop
(``groupnorm.bench.measure``, clean rounds), and every ratio comes from the same seconds.

    python benchmarks/bench_cache_thresholds.py --shapes 8x256x56x56,1x512x64x64

Settings (stream threshold / slab budget): ``default`` (what the kernel derives from the L3, see
``torch.ops.groupnorm_cpu.cache_config``), ``sysconf`` (64 MiB / 128 MiB: what the 256 MiB that
sysconf reported for the L3 of the 2-core EPYC VM gave before 2026-11-30), and the two changed
one at a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from groupnorm import bench  # noqa: E402
from groupnorm._sysinfo import cpu_flags, cpu_model  # noqa: E402

MiB = 1 << 20
SETTINGS: dict[str, tuple[int, int] | None] = {
    "default": None,
    "sysconf": (64 * MiB, 128 * MiB),
    "stream-only": (8 * MiB, 128 * MiB),
    "slab-only": (64 * MiB, 16 * MiB),
}
KEYS = ("GROUPNORM_CPU_STREAM_MIN_BYTES", "GROUPNORM_CPU_SLAB_CACHE_BYTES")


def _under(setting: tuple[int, int] | None, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        for key, value in zip(KEYS, setting or (None, None), strict=True):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = str(value)
        return fn()
    return run


def main(argv: list[str] | None = None) -> int:
    """Print one line per shape × layout × pass: ms and fraction of copy per setting."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x256x56x56,1x512x64x64,2x320x64x64,8x256x32x32,"
                   "32x64x56x56")
    p.add_argument("--layouts", default="nhwc,nchw")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float, default=1.5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench.reuse_freed_memory()
    from groupnorm.kernels.cpu_ext import load_cpu_ext

    if not load_cpu_ext():
        raise SystemExit("the C++ CPU extension did not build")
    isa = [f for f in ("avx512f", "avx2", "fma") if f in cpu_flags().split()]
    print(f"# {cpu_model()} ({', '.join(isa)}), torch {torch.__version__}, "
          f"{args.threads} threads, fp32, G = 32; default cache_config (L3, stream, slab): "
          f"{list(torch.ops.groupnorm_cpu.cache_config())}", flush=True)
    op = bench._make_op("cpu", "gn", bench.GROUPS)
    for shape in (bench._parse_shape(s) for s in args.shapes.split(",")):
        for layout in args.layouts.split(","):
            x = bench._layout(torch.randn(shape), layout)
            w, b, dy = torch.randn(shape[1]), torch.randn(shape[1]), torch.randn_like(x)
            for pass_ in ("fwd", "fwd+bwd"):
                fns: dict[str, Callable[[], object]] = {"copy": x.clone}
                for name, setting in SETTINGS.items():
                    fns[name] = _under(setting, bench._pass_fn(op, pass_, x, w, b, dy))
                samples = bench.clean_rounds(bench.measure(fns, torch.device("cpu"),
                                                           args.min_time))
                med = {k: statistics.median(v) for k, v in samples.items()}
                moved = bench.TENSORS_MOVED[pass_]
                cells = [f"{k} {med[k] * 1e3:6.2f} ms ({moved / 2 * med['copy'] / med[k]:.2f})"
                         for k in SETTINGS]
                print(f"{'x'.join(map(str, shape)):>14} {layout} {pass_:7} copy "
                      f"{med['copy'] * 1e3:5.2f} ms | " + " | ".join(cells)
                      + f" | sysconf/default {med['sysconf'] / med['default']:.2f}", flush=True)
    for key in KEYS:
        os.environ.pop(key, None)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
