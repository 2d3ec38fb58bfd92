"""Training throughput of the CIFAR-10 studies' nets, before ÷ after, and where a step's time goes.

``--part throughput`` (default): one SGD training step (the Loader's next augmented batch, forward,
cross-entropy, backward, update) on 32x32x3 input, W = 4 virtual workers of n images, for
resnet20 at widths 8/16/32 and simplenetv2 (widths 32/64/128, 1024-unit head), with BN and GN at
n = 2 and 32. In one round-robin race per net and norm, three variants:

* ``before``: NCHW model and batches, BN's virtual workers through the per-chunk tensor ops (the
  code before aten per worker);
* ``NCHW``: NCHW, BN through aten per worker;
* ``CL``: channels-last model (``model.to(memory_format=torch.channels_last)``) and channels-last
  batches (``Loader(channels_last=True)``), BN through aten per worker.

GN's ``before`` and ``NCHW`` run the same code (a check on the noise). Printed: img/s per variant
and the ratios NCHW ÷ before and CL ÷ before (higher is faster).

``--part profile``: one resnet20 step of each of GN and BN (n = 2 and 32, channels-last), split
into data (the Loader's batch), forward + backward by operator kind (from torch.profiler's
self CPU time: convolution, norm, pointwise/pool, linear + loss, the rest is autograd and Python
overhead), and the optimizer; and the cost of one evaluation pass per training image, with and
without autograd recording (the harness evaluates with it on).

Timing: the thread's CPU time (``time.thread_time``), fastest round of ``--rounds``, so that jobs
on other cores do not count; ``--threads 1`` (the sweeps' setting). The data are cifar10-jpeg
(a 4096-image train subset) when it is found, else the synthetic set at 32x32x3 (said in the
header). ``--keep-freed-memory`` makes glibc keep freed memory (``mallopt``), to measure what the
allocator's page faults cost.

Usage::

    python benchmarks/bench_train.py [--part throughput profile] [--rounds 5] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bn import Table, per_chunk_path, race, write_csvs  # noqa: E402

from groupnorm import set_virtual_batch  # noqa: E402
from groupnorm._sysinfo import cpu_model  # noqa: E402
from groupnorm.data import DatasetNotFoundError, Loader, load_dataset, subset  # noqa: E402
from groupnorm.models import create_model  # noqa: E402

WORKERS = 4
NETS = {"resnet20-w8": ("resnet20", 8), "resnet20-w16": ("resnet20", 16),
        "resnet20-w32": ("resnet20", 32), "simplenetv2": ("simplenetv2", None)}


def keep_freed_memory() -> bool:
    """glibc: no mmap per large tensor and no trimming, so freed pages are reused, not faulted."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)
                    and libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


def dataset() -> tuple:
    try:
        return subset(load_dataset("cifar10-jpeg", "train"), 4096), "cifar10-jpeg (4096 images)"
    except DatasetNotFoundError:
        return load_dataset("synthetic", n=4096), "synthetic 32x32x3 (cifar10-jpeg not found)"


class Trainer:
    """One net + optimizer + loader; ``step()`` is one training step on the next batch."""

    def __init__(self, ds, net: str, norm: str, n: int, channels_last: bool,
                 before: bool = False) -> None:
        name, width = NETS[net]
        torch.manual_seed(0)
        self.model = create_model(name, 10, 3, norm=norm, width=width)
        set_virtual_batch(self.model, n)  # GN: untouched
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                   weight_decay=1e-4)
        self.loader = Loader(ds, WORKERS * n, augment=True, drop_last=True, seed=0,
                             channels_last=channels_last)
        self.before = before
        self.batches = self._batches()

    def _batches(self) -> Iterator:
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def step(self) -> None:
        x, y = next(self.batches)
        with per_chunk_path() if self.before else contextlib.nullcontext():
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def throughput_part(ds, rounds: int, nets: list[str]) -> Table:
    table = Table(f"throughput: one training step, W = {WORKERS}, img/s from CPU time",
                  ["net", "norm", "n", "before_img/s", "NCHW_img/s", "CL_img/s", "NCHW/before",
                   "CL/before"])
    for net in nets:
        for norm in ("bn", "gn"):
            for n in (2, 32):
                trainers = {"before": Trainer(ds, net, norm, n, False, before=True),
                            "NCHW": Trainer(ds, net, norm, n, False),
                            "CL": Trainer(ds, net, norm, n, True)}
                reps = max(1, 64 // (WORKERS * n))  # ~64 images per round and variant
                t = race({k: tr.step for k, tr in trainers.items()}, rounds, reps)
                ips = {k: WORKERS * n / v for k, v in t.items()}
                table.add(**{"net": net, "norm": norm, "n": n,
                             "before_img/s": round(ips["before"], 1),
                             "NCHW_img/s": round(ips["NCHW"], 1), "CL_img/s": round(ips["CL"], 1),
                             "NCHW/before": round(ips["NCHW"] / ips["before"], 3),
                             "CL/before": round(ips["CL"] / ips["before"], 3)})
    return table


_KINDS = (
    ("conv", ("conv", "mkldnn")),
    ("norm", ("batch_norm", "group_norm", "groupnorm", "GroupNorm", "lerp", "cat",
              "split_with_sizes")),
    ("linear+loss", ("addmm", "aten::mm", "linear", "cross_entropy", "log_softmax",
                     "nll_loss", "_log_softmax")),
    ("pointwise+pool", ("relu", "threshold", "add", "mul", "pool", "mean", "sum", "copy_",
                        "fill_", "zero")),
)


def _kind(op: str) -> str | None:
    for kind, keys in _KINDS:
        if any(k in op for k in keys):
            return kind
    return None


def _profile_case(ds, norm: str, n: int, rounds: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tr = Trainer(ds, "resnet20-w16", norm, n, True)
    x, y = next(tr.batches)
    model, opt = tr.model, tr.opt
    eval_x = next(iter(Loader(ds, 256, shuffle=False, channels_last=True)))[0]

    def fwd_bwd() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def evaluate(grad: bool) -> None:
        model.eval()
        with contextlib.nullcontext() if grad else torch.inference_mode():
            model(eval_x)
        model.train()

    reps = max(1, 64 // (WORKERS * n))
    t = race({"step": tr.step, "data": lambda: next(tr.batches), "fwd_bwd": fwd_bwd,
              "opt": opt.step, "eval": lambda: evaluate(True),
              "eval_nograd": lambda: evaluate(False)}, rounds, reps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fwd_bwd()
    kinds = dict.fromkeys([k for k, _ in _KINDS], 0.0)
    total_self = 0.0
    for ev in prof.key_averages():
        total_self += ev.self_cpu_time_total
        kind = _kind(ev.key)
        if kind is not None:
            kinds[kind] += ev.self_cpu_time_total
    # the profiler's split (of its own, slower, timing) scaled onto the unprofiled fwd+bwd time
    fwd_bwd_ms = t["fwd_bwd"] * 1e3
    ms = {k: v / total_self * fwd_bwd_ms for k, v in kinds.items()}
    per = {k: v * 1e3 for k, v in t.items()}
    return {"norm": norm, "n": n, "step_ms": round(per["step"], 2),
            "data_ms": round(per["data"], 2), "conv_ms": round(ms["conv"], 2),
            "norm_ms": round(ms["norm"], 2), "pointwise+pool_ms": round(ms["pointwise+pool"], 2),
            "linear+loss_ms": round(ms["linear+loss"], 2),
            "overhead_ms": round(fwd_bwd_ms - sum(ms.values()), 2),
            "optimizer_ms": round(per["opt"], 2),
            "eval_ms/img": round(per["eval"] / len(eval_x), 3),
            "eval_nograd_ms/img": round(per["eval_nograd"] / len(eval_x), 3),
            "train_ms/img": round(per["step"] / len(x), 3)}


def profile_part(ds, rounds: int) -> Table:
    table = Table("profile: resnet20-w16, channels-last, one step (ms of CPU time per step; "
                  "fwd+bwd split by torch.profiler's self CPU time per operator kind; overhead = "
                  "the rest: autograd engine, Python, allocator)",
                  ["norm", "n", "step_ms", "data_ms", "conv_ms", "norm_ms", "pointwise+pool_ms",
                   "linear+loss_ms", "overhead_ms", "optimizer_ms", "eval_ms/img",
                   "eval_nograd_ms/img", "train_ms/img"])
    for norm in ("gn", "bn"):
        for n in (2, 32):
            table.add(**_profile_case(ds, norm, n, rounds))
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", default=["throughput"], choices=["throughput", "profile"])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (fastest kept)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc mallopt: reuse freed memory instead of new mmaps per tensor")
    p.add_argument("--csv", type=Path, default=None, help="also write <stem>-<part>.csv")
    args = p.parse_args(argv)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    torch.set_num_threads(args.threads)
    ds, what = dataset()
    env = (f"{datetime.date.today()}, {cpu_model()}, torch {torch.__version__}, threads "
           f"{torch.get_num_threads()}, allocator {'keep-freed' if kept else 'glibc default'}, "
           f"data {what}")
    print(f"# {env}")
    tables = {}
    if "throughput" in args.part:
        tables["throughput"] = throughput_part(ds, args.rounds, args.nets)
    if "profile" in args.part:
        tables["profile"] = profile_part(ds, args.rounds)
    if args.csv:
        write_csvs(tables, args.csv, env)


if __name__ == "__main__":
    main()

