"""Loader throughput vs one SimpleNetV2 training step, on real Fashion-MNIST, in the same run.

For each batch size (32, 128) it times, one after the other in one process:

* ``train_step/<norm>``: one SGD step (forward, cross-entropy, backward, update) of
  ``simplenetv2`` with GN and with BN on that batch size, images/s;
* ``loader``: ``groupnorm.data.Loader`` producing normalized float32 batches, without and with
  augmentation (random crop, pad 4, + horizontal flip), images/s from the median batch;
* ``loader(epoch)``: the same over one whole epoch (60 000 images), which includes the epoch's
  permutation and the tail, so it is the figure that bounds an epoch's data time;

and prints one tidy row per measurement (p20/p50/p80 of per-batch time) plus the ratio
``loader images/s ÷ the fastest train step's images/s``: how many times faster the loader is than
the model it feeds (a ratio of 20 means the loader costs 1/20 = 5% of an epoch when run
synchronously).

Usage::

    python benchmarks/bench_loader.py [--batches 30] [--threads 1] [--norms gn bn]
                                      [--device cpu] [--csv out.csv]

Falls back to the ``synthetic`` dataset (28x28, 1 channel) when Fashion-MNIST is not installed
and says so in every row.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from groupnorm.data import DatasetNotFoundError, Loader, load_dataset  # noqa: E402
from groupnorm.models import create_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def time_loader(ds, batch: int, augment: bool, batches: int, device: torch.device) -> list[float]:
    """Per-batch seconds to produce ``batches`` normalized batches (after one warm-up batch)."""
    loader = Loader(ds, batch, shuffle=True, augment=augment, drop_last=True, seed=0,
                    device=device)
    times: list[float] = []
    epoch = 0
    while len(times) < batches + 1:
        loader.set_epoch(epoch)
        it = iter(loader)
        while len(times) < batches + 1:
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            _sync(device)
            times.append(time.perf_counter() - t0)
        epoch += 1
    return times[1:]


def time_epoch(ds, batch: int, augment: bool, device: torch.device) -> float:
    """Seconds per image over one whole epoch of the loader (all batches, tail included)."""
    loader = Loader(ds, batch, shuffle=True, augment=augment, seed=0, device=device)
    loader.set_epoch(1)
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    _sync(device)
    return (time.perf_counter() - t0) / n


def time_train_step(ds, batch: int, batches: int, device: torch.device,
                    norm: str = "gn") -> list[float]:
    """Per-step seconds of SGD on simplenetv2 with ``norm``, inputs already on the device."""
    torch.manual_seed(0)
    model = create_model("simplenetv2", ds.num_classes, in_channels=ds.in_channels,
                         norm=norm).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = next(iter(Loader(ds, batch, device=device)))
    times = []
    for _ in range(batches + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[2:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=30, help="timed batches/steps per row")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--norms", nargs="+", default=["gn", "bn"], help="norms of the train step")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        ds = load_dataset("fashion-mnist", "train")
    except DatasetNotFoundError:
        ds = load_dataset("synthetic", n=8192, channels=1, image_size=28)
    env = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
           f"threads {torch.get_num_threads()}, device {device}")
    print(f"# {ds.name}: {tuple(ds.images.shape)} uint8; {env}")
    print(f"# {args.batches} timed batches per row; images/s from the median batch time")
    rows = []
    header = ("dataset", "batch", "what", "p20_ms", "p50_ms", "p80_ms", "images_per_s",
              "loader_over_train")
    print("{:>14} {:>5} {:>16} {:>8} {:>8} {:>8} {:>12} {:>18}".format(*header))
    for batch in args.batch_sizes:
        results = []
        for norm in args.norms:
            results.append((f"train_step/{norm}",
                            _quantiles(time_train_step(ds, batch, args.batches, device, norm)),
                            None))
        train_ips = max(batch / q[1] for _, q, _ in results)  # the fastest model: data matters most
        for augment in (False, True):
            name = "loader+aug" if augment else "loader"
            q = _quantiles(time_loader(ds, batch, augment, args.batches, device))
            results.append((name, q, (batch / q[1]) / train_ips))
            per_image = time_epoch(ds, batch, augment, device)
            q = (per_image * batch,) * 3  # one number: the epoch's mean per batch
            results.append((f"{name}(epoch)", q, (1 / per_image) / train_ips))
        for what, (p20, p50, p80), ratio in results:
            shown_ratio = "" if ratio is None else round(ratio, 1)
            row = (ds.name, batch, what, round(p20 * 1e3, 3), round(p50 * 1e3, 3),
                   round(p80 * 1e3, 3), round(batch / p50), shown_ratio)
            rows.append(row)
            print("{:>14} {:>5} {:>16} {:>8} {:>8} {:>8} {:>12} {:>18}".format(*row))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow((*header, "env"))
            w.writerows((*r, env) for r in rows)


if __name__ == "__main__":
    main()
