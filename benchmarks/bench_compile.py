"""Eager vs ``torch.compile`` on the CPU: img/s of GN and BN models, ratios in the same run.

Question (issue 13): does compiling a GN model pay, as it does for a BN model? And which way of
running GN under inductor is fastest? For each model × batch × layout × pass the contenders are

- ``bn eager`` / ``bn compiled``: the same model with BatchNorm (``groupnorm.BatchNorm``);
- ``gn eager``: GroupNorm with ``backend="auto"``, not compiled (the baseline for every GN row);
- ``gn compiled``, five ways of running GN inside the compiled graph:
  - ``auto``: what ``backend="auto"`` now picks under ``torch.compile``
    (``groupnorm.kernels.CPU_COMPILE_TABLE``);
  - ``cpu``: our C++ kernels as opaque ``torch.library`` custom ops (``groupnorm::gn_cpu_*``);
  - ``aten-opaque``: aten's own GN kernels as opaque custom ops (defined in this file): an
    opaque call that is not ours, to tell the cost of opacity from the cost of our kernels;
  - ``torch``: ``backend="torch"`` (``F.group_norm``; channels-last through NCHW): inductor
    decomposes ``aten.native_group_norm`` and its backward (torch's own lowering) and fuses the
    pieces with the neighbouring ReLU / max-pool / residual add;
  - ``decomp``: GN written in aten ops here (``var_mean`` over groups, then one multiply-add per
    element), whose backward AOTAutograd derives: a decomposition of our own.

``train`` times a whole step (forward, cross-entropy, backward, SGD with momentum; only the model
is compiled, as users do with ``torch.compile(model)``); ``infer`` a no-grad forward in eval mode.
Every compiled model uses ``fullgraph=True`` (a graph break is an error, not a slow row).

The contenders run in rounds, each timing the same number of steps, in alternating order, so that
the drifts of a shared machine hit all of them; reported is the median img/s over the rounds
(with p20/p80), and the median (p20, p80) over the rounds of each compiled contender's img/s ÷
its norm's eager img/s in the same round (``vs_eager``), and of a GN contender's ÷ BN's run the
same way (``vs_bn``: GN eager ÷ BN eager, GN compiled ÷ BN compiled). Clock: CPU time
of this process with one thread (a busy machine disturbs it less than wall time), wall time with
more threads (CPU time would add the threads up). Inductor's kernels are built for the thread
count set when they compile, so each thread count runs in its own process.

Usage::

    python benchmarks/bench_compile.py                      # studies' models, 1 thread, train
    python benchmarks/bench_compile.py --threads 1,2 --passes train,infer --csv out.csv
    python benchmarks/bench_compile.py --models simplenetv2:16 --batches 8 --layouts nchw \\
        --contenders bn:eager,bn:compiled,gn:eager,gn:auto
    python benchmarks/bench_compile.py --models simplenetv2:16 --fuse-relu   # GN+ReLU fused
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import groupnorm  # noqa: E402
from groupnorm._sysinfo import cpu_flags, cpu_model  # noqa: E402
from groupnorm.activations import apply_activation  # noqa: E402
from groupnorm.models import create_model  # noqa: E402
from groupnorm.models.simplenet import SimpleBlock  # noqa: E402

MODELS = "simplenetv2:16,resnet20:8,resnet20:16"
CONTENDERS = ("bn:eager", "bn:compiled", "gn:eager", "gn:auto", "gn:cpu", "gn:aten-opaque",
              "gn:torch", "gn:decomp")
FIELDS = ["timestamp", "cpu", "isa", "torch", "threads", "clock", "loadavg", "model", "width",
          "batch", "layout", "pass", "relu", "norm", "contender", "compiled", "steps_per_round",
          "rounds", "img_s_p20", "img_s_p50", "img_s_p80", "vs_eager_p20", "vs_eager",
          "vs_eager_p80", "vs_bn_p20", "vs_bn", "vs_bn_p80", "warmup_s"]


# --- the two contenders defined here -------------------------------------------------------

@torch.library.custom_op("bench_compile::aten_gn_fwd", mutates_args=())
def _aten_gn_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, x.numel() // (n * c),
                                                     groups, eps)
    return y, mean, rstd


@_aten_gn_fwd.register_fake
def _(x, weight, bias, groups, eps):
    stats = x.new_empty(x.shape[0], groups)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("bench_compile::aten_gn_bwd", mutates_args=())
def _aten_gn_bwd(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 weight: torch.Tensor, groups: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return torch.ops.aten.native_group_norm_backward(
        dy.contiguous(memory_format=fmt), x, mean, rstd, weight, n, c, x.numel() // (n * c),
        groups, [True, True, True])


@_aten_gn_bwd.register_fake
def _(dy, x, mean, rstd, weight, groups):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _aten_setup(ctx, inputs, output) -> None:
    x, weight, _, groups, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.groups = groups


def _aten_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _aten_gn_bwd(dy, x, mean, rstd, weight, ctx.groups)
    return dx, dw, db, None, None


_aten_gn_fwd.register_autograd(_aten_backward, setup_context=_aten_setup)


def _aten_opaque_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
    """GroupNorm.forward through aten's kernels as one opaque node (channels-last x as NCHW:
    aten's channels-last CPU kernel is not robust, as the "torch" backend does)."""
    fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    y = _aten_gn_fwd(x.contiguous(), self.weight, self.bias, self.num_groups, self.eps)[0]
    return apply_activation(y.contiguous(memory_format=fmt), self.activation)


def _decomp_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
    """GroupNorm.forward in aten ops: fp32 var_mean per (sample, group), then y = x·a + b with a
    per-(sample, channel) scale a = γ·rstd and shift b = β − mean·a (one pass over x)."""
    n, c, g = x.shape[0], x.shape[1], self.num_groups
    if x.is_contiguous():
        var, mean = torch.var_mean(x.reshape(n, g, -1), dim=2, correction=0)
    else:  # channels-last: a group is a strided (HW, C/G) block of each row
        var, mean = torch.var_mean(x.permute(0, 2, 3, 1).reshape(n, -1, g, c // g), dim=(1, 3),
                                   correction=0)
    rstd = torch.rsqrt(var + self.eps)  # (N, G)
    scale = (rstd.unsqueeze(-1) * self.weight.view(g, c // g)).reshape(n, c, 1, 1)
    shift = self.bias.view(1, c, 1, 1) - (mean.unsqueeze(-1) * rstd.unsqueeze(-1)
                                          * self.weight.view(g, c // g)).reshape(n, c, 1, 1)
    return apply_activation(x * scale + shift, self.activation)


_FORWARDS = {"aten-opaque": _aten_opaque_forward, "decomp": _decomp_forward}


# --- models and steps --------------------------------------------------------------------

def build(model: str, width: int, norm: str, contender: str, layout: str, train: bool,
          fuse_relu: bool = False):
    """(model, the callable that runs it: compiled or not) for one contender."""
    torch.manual_seed(0)
    backend = contender if contender in ("auto", "cpu", "torch") else "auto"
    opts = {"backend": backend} if norm == "gn" else {}
    m = create_model(model, num_classes=10, norm=norm, width=width, **opts)
    if fuse_relu and norm == "gn":  # GN + ReLU as one call: the table's "fused" keys
        blocks = [b for b in m.modules() if isinstance(b, SimpleBlock)]
        if not blocks:
            raise SystemExit(f"--fuse-relu needs a SimpleNet model, not {model}")
        for b in blocks:
            b.norm1.activation = b.norm2.activation = "relu"
            b.relu = torch.nn.Identity()
    if contender in _FORWARDS:
        for mod in m.modules():
            if isinstance(mod, groupnorm.GroupNorm):
                mod.forward = types.MethodType(_FORWARDS[contender], mod)
    if layout == "nhwc":
        m = m.to(memory_format=torch.channels_last)
    m.train(train)
    run = m if contender == "eager" else torch.compile(m, fullgraph=True)
    return m, run


def make_step(model, run, x: torch.Tensor, y: torch.Tensor, train: bool) -> Callable[[], None]:
    """One training step (fwd, loss, bwd, SGD) or one no-grad forward."""
    if not train:
        def infer() -> None:
            with torch.no_grad():
                run(x)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _q(vals: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(vals, n=10, method="inclusive")
    return q[1], statistics.median(vals), q[7]


def run_case(model: str, width: int, batch: int, layout: str, pass_: str,
             contenders: list[str], rounds: int, round_time: float,
             clock: Callable[[], float], fuse_relu: bool = False) -> list[dict]:
    """Time every contender on one case; one result dict per contender."""
    torch._dynamo.reset()
    train = pass_ == "train"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=gen)
    steps, warm = {}, {}
    for spec in contenders:
        norm, contender = spec.split(":")
        t0 = time.perf_counter()
        m, run = build(model, width, norm, contender, layout, train, fuse_relu)
        steps[spec] = make_step(m, run, x, y, train)
        for _ in range(3):  # compiles forward (and backward) here
            steps[spec]()
        warm[spec] = time.perf_counter() - t0
    t0 = clock()
    steps[contenders[0]]()
    k = max(1, round(round_time / max(clock() - t0, 1e-6)))
    samples: dict[str, list[float]] = {s: [] for s in contenders}
    for r in range(rounds):
        for spec in (contenders if r % 2 == 0 else contenders[::-1]):
            t0 = clock()
            for _ in range(k):
                steps[spec]()
            samples[spec].append(batch * k / (clock() - t0))
    out = []
    for spec in contenders:
        norm, contender = spec.split(":")
        p20, p50, p80 = _q(samples[spec])
        row = {"norm": norm, "contender": contender, "compiled": contender != "eager",
               "steps_per_round": k, "rounds": rounds, "img_s_p20": round(p20, 1),
               "img_s_p50": round(p50, 1), "img_s_p80": round(p80, 1),
               "warmup_s": round(warm[spec], 1)}
        # per-round ratios: a contender and its eager baseline ran back to back in each round,
        # so a drift of the machine's load cancels in the ratio more than in the medians
        bases = {"vs_eager": f"{norm}:eager" if contender != "eager" else None,
                 "vs_bn": None if norm == "bn" else
                 "bn:eager" if contender == "eager" else "bn:compiled"}
        for col, base in bases.items():
            if base in samples:
                r20, r50, r80 = _q([a / b for a, b in zip(samples[spec], samples[base],
                                                          strict=True)])
                row.update({f"{col}_p20": round(r20, 3), col: round(r50, 3),
                            f"{col}_p80": round(r80, 3)})
        out.append(row)
    return out


def _isa() -> str:
    flags = set(cpu_flags().split())
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--models", default=MODELS, help=f"name:width,... (default {MODELS})")
    p.add_argument("--batches", default="8,128", help="comma-separated (default 8,128)")
    p.add_argument("--layouts", default="nchw,nhwc", help="comma-separated of nchw,nhwc")
    p.add_argument("--passes", default="train", help="comma-separated of train,infer")
    p.add_argument("--threads", default="1", help="comma-separated thread counts (default 1); "
                   "each runs in its own process")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"norm:contender,... of {','.join(CONTENDERS)}")
    p.add_argument("--fuse-relu", action="store_true",
                   help="SimpleNet only: GN layers run with activation='relu' (one fused call) "
                        "instead of GN then the block's ReLU")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    p.add_argument("--round-time", type=float, default=0.3,
                   help="seconds of steps per contender and round (default 0.3)")
    p.add_argument("--csv", type=Path, default=None, help="append the rows to this CSV file")
    args = p.parse_args(argv)
    contenders = args.contenders.split(",")
    for spec in contenders:
        if spec not in CONTENDERS:
            p.error(f"unknown contender {spec!r}; pick from {','.join(CONTENDERS)}")
    for norm in ("bn", "gn"):
        if any(s.startswith(norm + ":") for s in contenders) and f"{norm}:eager" not in contenders:
            p.error(f"{norm} contenders need {norm}:eager too (the ratios are against it)")
    threads = [int(t) for t in args.threads.split(",")]
    if len(threads) > 1:  # inductor bakes the thread count into its kernels: one process each
        rc = 0
        for t in threads:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            i = cmd.index("--threads")
            cmd[i + 1] = str(t)
            rc |= subprocess.call(cmd)
        return rc
    torch.set_num_threads(threads[0])
    clock = time.process_time if threads[0] == 1 else time.perf_counter
    env = {"timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "cpu": cpu_model(), "isa": _isa(), "torch": torch.__version__,
           "threads": threads[0], "clock": "cpu" if threads[0] == 1 else "wall"}
    print(f"# {env['timestamp']}  {env['cpu']} ({env['isa']})  torch {env['torch']}  "
          f"{env['threads']} thread(s), clock {env['clock']}, median of {args.rounds} rounds")
    print(f"{'model':16} {'batch':>5} {'layout':6} {'pass':5} {'contender':16} "
          f"{'img/s':>8} {'p20-p80':>13} {'÷eager (p20-p80)':>18}")
    writer = None
    if args.csv:
        new = not args.csv.exists()
        f = open(args.csv, "a", newline="")  # noqa: SIM115 - closed at the end of main
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
    for pass_ in args.passes.split(","):
        for spec in args.models.split(","):
            model, width = spec.split(":")
            for batch in (int(b) for b in args.batches.split(",")):
                for layout in args.layouts.split(","):
                    load = os.getloadavg()[0]
                    rows = run_case(model, int(width), batch, layout, pass_, contenders,
                                    args.rounds, args.round_time, clock, args.fuse_relu)
                    for row in rows:
                        label = f"{row['norm']} {row['contender']}"
                        ratio = (f"{row['vs_eager']:.2f}x ({row['vs_eager_p20']:.2f}-"
                                 f"{row['vs_eager_p80']:.2f})" if "vs_eager" in row else "")
                        print(f"{model + ':' + width:16} {batch:5} {layout:6} {pass_:5} "
                              f"{label:16} {row['img_s_p50']:8.1f} "
                              f"{row['img_s_p20']:6.0f}-{row['img_s_p80']:<6.0f} {ratio:>18}")
                        if writer:
                            writer.writerow({**env, "loadavg": round(load, 2), "model": model,
                                             "width": width, "batch": batch, "layout": layout,
                                             "pass": pass_,
                                             "relu": "fused" if args.fuse_relu else "separate",
                                             **row})
                    sys.stdout.flush()
                    if writer:
                        f.flush()  # a long run killed midway keeps its finished cases
    if writer:
        f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
