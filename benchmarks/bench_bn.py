"""BN on virtual workers: aten per worker (now) vs the per-chunk tensor ops (before) vs whole-batch
aten BN, in the same run; and how far the two paths' statistics are apart, in ulps.

Three parts, each printed as it finishes:

* ``op``: forward + backward of one BN layer in training mode on a batch of W·n samples, for the
  CIFAR ResNets' layer shapes (C, H = 16, 32 / 32, 16 / 64, 8; W = 4, n = 2 and 32; NCHW and
  channels-last): ``whole`` is one aten call on the whole batch (the target), ``before`` the
  per-chunk tensor ops (``per_chunk_batch_norm``, what ``BatchNorm(virtual_batch=n)`` ran
  before), ``now`` ``BatchNorm(virtual_batch=n)``, ``folded`` the workers folded into the
  channel dim of one aten call (transposed copies in and out). Columns: whole µs, before ÷
  whole, now ÷ whole, folded ÷ whole, before ÷ now.
* ``step``: one SGD training step (forward, cross-entropy, backward, update) of resnet20 with BN,
  W = 4: img/s of the whole-batch BN and of the two virtual-worker paths, and the same ratios.
* ``stats``: per worker, the mean and unbiased variance of the two paths against the exact
  float64 ones and against each other, in float32 ulps (max over channels and workers).

Timing: the contenders run round-robin (one round = ``--reps`` calls of each, in turn) and each
keeps its fastest round's mean; time is the thread's CPU time (``time.thread_time``), so the
ratios hold on a machine shared with other jobs (waiting for a core is not counted, cache
pollution is). With ``--threads 1`` (the default, as the sweeps run) all the work is on this
thread.

Usage::

    python benchmarks/bench_bn.py [--rounds 7] [--threads 1] [--parts op step stats]
                                  [--csv out.csv]   # writes out-op.csv, out-step.csv, out-stats.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from groupnorm._sysinfo import cpu_model  # noqa: E402
from groupnorm.layers.batchnorm import (  # noqa: E402
    BatchNorm,
    per_chunk_batch_norm,
    worker_batch_norm,
)
from groupnorm.models import create_model  # noqa: E402


def race(contenders: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, float]:
    """Seconds per call of each contender: the fastest of ``rounds`` round-robin rounds."""
    for fn in contenders.values():  # warm-up: allocator, lazy init
        fn()
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.thread_time()
            for _ in range(reps):
                fn()
            best[name] = min(best[name], (time.thread_time() - t0) / reps)
    return best


@contextlib.contextmanager
def per_chunk_path() -> Iterator[None]:
    """Make BatchNorm's virtual workers run the per-chunk tensor ops (the path before aten)."""
    def forward_workers(self: BatchNorm, x: torch.Tensor, n: int) -> torch.Tensor:
        y, means, unbiased = per_chunk_batch_norm(x, n, self.weight, self.bias, self.eps)
        self._update_running(means, unbiased)
        return y

    saved = BatchNorm._forward_workers
    BatchNorm._forward_workers = forward_workers  # type: ignore[method-assign]
    try:
        yield
    finally:
        BatchNorm._forward_workers = saved  # type: ignore[method-assign]


class Table:
    """Print rows (dicts) as aligned columns as they come; keep them for the CSV."""

    def __init__(self, title: str, columns: list[str]) -> None:
        self.columns, self.rows = columns, []
        print(f"\n## {title}")
        print(" ".join(f"{c:>{max(len(c), 13)}}" for c in columns), flush=True)

    def add(self, **row: object) -> None:
        self.rows.append(row)
        print(" ".join(f"{row[c]!s:>{max(len(c), 13)}}" for c in self.columns), flush=True)


def write_csvs(tables: dict[str, Table], csv_path: Path, env: str) -> None:
    """One CSV per part, <stem>-<part>.csv beside csv_path, each row tagged with env."""
    for part, table in tables.items():
        path = csv_path.with_name(f"{csv_path.stem}-{part}{csv_path.suffix}")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, [*table.columns, "env"])
            w.writeheader()
            w.writerows({**r, "env": env} for r in table.rows)


def folded_batch_norm(x: torch.Tensor, n: int, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float = 1e-5) -> torch.Tensor:
    """The alternative not taken: the W workers folded into the channel dim of one aten call.

    (W·n, C, L) -> (n, W·C, L) is a transposed copy (W and C are not adjacent in memory, in NCHW
    or channels-last), and so is the way back; autograd adds the same two for the gradient.
    """
    w = x.shape[0] // n
    c = x.shape[1]
    folded = x.reshape(w, n, c, -1).transpose(0, 1).reshape(n, w * c, -1)
    y = F.batch_norm(folded, None, None, weight.repeat(w), bias.repeat(w), True, 0.0, eps)
    return y.reshape(n, w, c, -1).transpose(0, 1).reshape(x.shape)


def _op_case(c: int, h: int, n: int, layout: str, workers: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(workers * n, c, h, h, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    whole, now, before = BatchNorm(c), BatchNorm(c, virtual_batch=n), BatchNorm(c, virtual_batch=n)

    def fwd_bwd(m: BatchNorm) -> None:  # autograd.grad: no .grad accumulation timed
        torch.autograd.grad(m(x), (x, m.weight, m.bias), dy)

    def run_before() -> None:
        with per_chunk_path():
            fwd_bwd(before)

    def run_folded() -> None:
        y = folded_batch_norm(x, n, now.weight, now.bias)
        torch.autograd.grad(y, (x, now.weight, now.bias), dy)

    t = race({"whole": lambda: fwd_bwd(whole), "before": run_before, "now": lambda: fwd_bwd(now),
              "folded": run_folded}, rounds, reps=20 if n == 2 else 3)
    return {"C": c, "HxW": f"{h}x{h}", "n": n, "layout": layout,
            "whole_us": round(t["whole"] * 1e6, 1),
            "before/whole": round(t["before"] / t["whole"], 3),
            "now/whole": round(t["now"] / t["whole"], 3),
            "folded/whole": round(t["folded"] / t["whole"], 3),
            "before/now": round(t["before"] / t["now"], 3)}


def op_part(rounds: int, workers: int) -> Table:
    table = Table(f"op: one BN layer, fwd+bwd, W = {workers} (CPU µs; ratios of CPU time)",
                  ["C", "HxW", "n", "layout", "whole_us", "before/whole", "now/whole",
                   "folded/whole", "before/now"])
    for c, h in ((16, 32), (32, 16), (64, 8)):
        for n in (2, 32):
            for layout in ("NCHW", "channels_last"):
                table.add(**_op_case(c, h, n, layout, workers, rounds))
    return table


def _step_case(width: int, n: int, layout: str, workers: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 3, norm="bn", width=width)
    x = torch.randn(workers * n, 3, 32, 32)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (workers * n,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bns = [m for m in model.modules() if isinstance(m, BatchNorm)]

    def step(vb: int | None, before: bool = False) -> None:
        for m in bns:
            m.virtual_batch = vb
        with per_chunk_path() if before else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    t = race({"whole": lambda: step(None), "before": lambda: step(n, True),
              "now": lambda: step(n)}, rounds, reps=8 if n == 2 else 1)
    ips = {k: workers * n / v for k, v in t.items()}
    return {"width": width, "n": n, "layout": layout,
            "whole_img/s": round(ips["whole"], 1), "before_img/s": round(ips["before"], 1),
            "now_img/s": round(ips["now"], 1),
            "before/whole": round(t["before"] / t["whole"], 3),
            "now/whole": round(t["now"] / t["whole"], 3),
            "before/now": round(t["before"] / t["now"], 3)}


def step_part(rounds: int, workers: int, widths: list[int]) -> Table:
    table = Table(f"step: resnet20 + BN, one SGD step, W = {workers} (img/s from CPU time)",
                  ["width", "n", "layout", "whole_img/s", "before_img/s", "now_img/s",
                   "before/whole", "now/whole", "before/now"])
    for width in widths:
        for n in (2, 32):
            for layout in ("NCHW", "channels_last"):
                table.add(**_step_case(width, n, layout, workers, rounds))
    return table


def _ulps(a: torch.Tensor, exact: torch.Tensor) -> float:
    e32 = exact.float().abs()
    spacing = (torch.nextafter(e32, torch.full_like(e32, float("inf"))) - e32).double()
    return round(float(((a.double() - exact).abs() / spacing).max()), 2)


def stats_part(workers: int) -> Table:
    table = Table(f"stats: per-worker mean / unbiased variance, W = {workers}, x = 3 + 2·N(0, 1);"
                  " max ulps over workers and channels (float32 spacing at the exact value)",
                  ["per worker", "layout", "mean now-old", "now-exact", "old-exact",
                   "var now-old", "now-exact ", "old-exact "])
    for n, c, h in ((2, 16, 32), (32, 16, 32), (2, 64, 8), (32, 64, 8)):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(workers * n, c, h, h, generator=g) * 2 + 3
        _, m_exact, v_exact = per_chunk_batch_norm(x.double(), n)
        _, m_old, v_old = per_chunk_batch_norm(x, n)
        for layout in ("NCHW", "channels_last"):
            xi = x if layout == "NCHW" else x.contiguous(memory_format=torch.channels_last)
            _, m_new, v_new = worker_batch_norm(xi, n)
            table.add(**{"per worker": f"{n}x{c}x{h}x{h}", "layout": layout,
                         "mean now-old": _ulps(m_new, m_old.double()),
                         "now-exact": _ulps(m_new, m_exact), "old-exact": _ulps(m_old, m_exact),
                         "var now-old": _ulps(v_new, v_old.double()),
                         "now-exact ": _ulps(v_new, v_exact),
                         "old-exact ": _ulps(v_old, v_exact)})
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="round-robin rounds (fastest kept)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--workers", type=int, default=4, help="virtual workers W")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="resnet20 widths")
    p.add_argument("--parts", nargs="+", default=["op", "step", "stats"],
                   choices=["op", "step", "stats"])
    p.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = (f"{datetime.date.today()}, {cpu_model()}, torch {torch.__version__}, "
           f"threads {torch.get_num_threads()}")
    print(f"# {env}")
    tables = {}
    if "op" in args.parts:
        tables["op"] = op_part(args.rounds, args.workers)
    if "step" in args.parts:
        tables["step"] = step_part(args.rounds, args.workers, args.widths)
    if "stats" in args.parts:
        tables["stats"] = stats_part(args.workers)
    if args.csv:
        write_csvs(tables, args.csv, env)


if __name__ == "__main__":
    main()
