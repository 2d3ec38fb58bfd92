"""What the mode checks cost on the fast eager path: µs per call, and before ÷ after.

Times, in one process per source tree (``--src``, default this one), the median of many calls of
``group_norm(x, backend="cpu")`` on a small tensor (2x32x8x8 fp32: where per-call overhead
matters most), forward only and forward + backward, and — where the tree has them — the checks
that decide the composite path (``modes.composite_reason``, ``modes.backward_needs_composite``).
Give two trees (an older checkout first) to print the after ÷ before ratios of the same run.

Usage::

    python benchmarks/bench_dispatch.py [--src OLD/src NEW/src] [--reps 2000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"

_CHILD = r"""
import json, statistics, sys, time, torch
import groupnorm
reps = int(sys.argv[1])
torch.set_num_threads(1)
x = torch.randn(2, 32, 8, 8)
xg = x.clone().requires_grad_()
dy = torch.randn_like(x)

def med(fn):
    for _ in range(50):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6

out = {
    "group_norm fwd": med(lambda: groupnorm.group_norm(x, 8, backend="cpu")),
    "group_norm fwd+bwd": med(lambda: torch.autograd.grad(
        groupnorm.group_norm(xg, 8, backend="cpu"), xg, dy)),
}
try:
    from groupnorm import modes
    out["composite_reason"] = med(lambda: modes.composite_reason(x))
    out["backward_needs_composite"] = med(lambda: modes.backward_needs_composite(dy))
except ImportError:
    pass
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, nargs="*", default=[HERE])
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternate the trees this many times (the machine's load varies)")
    args = parser.parse_args(argv)
    import torch

    sys.path.insert(0, str(HERE))
    from groupnorm._sysinfo import cpu_model

    print(f"# {datetime.date.today()}  {cpu_model() or platform.machine()}  torch "
          f"{torch.__version__}  1 thread  median over {args.rounds} alternating rounds of the "
          f"median of {args.reps} calls, µs")
    runs: list[list[dict]] = [[] for _ in args.src]
    for _ in range(args.rounds):
        for i, src in enumerate(args.src):
            env = {**os.environ, "PYTHONPATH": str(src)}
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(args.reps)], env=env,
                                  capture_output=True, text=True, check=True)
            runs[i].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = [{k: statistics.median(r[k] for r in rs) for k in rs[0]} for rs in runs]
    for src, res in zip(args.src, results, strict=True):
        print(f"{src}: " + "  ".join(f"{k} {v:.2f}" for k, v in res.items()))
    if len(results) == 2:
        for key in ("group_norm fwd", "group_norm fwd+bwd"):
            print(f"{key}: after ÷ before = {results[1][key] / results[0][key]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
