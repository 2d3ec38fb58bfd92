"""CPU SyncBatchNorm on 2 gloo ranks (half the batch each) ≡ BatchNorm on the full batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from groupnorm import BatchNorm, SyncBatchNorm

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    return x, dy


def _init(m):
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, 4))
        m.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    return m


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, dy = _data()
        half = x.shape[0] // WORLD
        xs = x[rank * half:(rank + 1) * half].clone().requires_grad_(True)
        m = _init(SyncBatchNorm(4).double())
        for _ in range(2):  # two steps: running stats compound
            xs.grad = None
            m.zero_grad()
            y = m(xs)
            y.backward(dy[rank * half:(rank + 1) * half])
        # DDP averages parameter gradients across ranks; here we sum to get the full-batch grad.
        gw, gb = m.weight.grad.clone(), m.bias.grad.clone()
        dist.all_reduce(gw)
        dist.all_reduce(gb)
        torch.save({"y": y.detach(), "gx": xs.grad, "gw": gw, "gb": gb,
                    "rm": m.running_mean, "rv": m.running_var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # nobody tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_syncbn_two_gloo_ranks_equals_full_batch_bn(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x, dy = _data()
    x = x.requires_grad_(True)
    bn = _init(BatchNorm(4).double())
    for _ in range(2):
        x.grad = None
        bn.zero_grad()
        y = bn(x)
        y.backward(dy)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), x.grad)
    for r in ranks:
        torch.testing.assert_close(r["gw"], bn.weight.grad)
        torch.testing.assert_close(r["gb"], bn.bias.grad)
        torch.testing.assert_close(r["rm"], bn.running_mean)
        torch.testing.assert_close(r["rv"], bn.running_var)


def test_syncbn_without_process_group_is_bn():
    x = torch.randn(6, 4, 5)
    torch.testing.assert_close(SyncBatchNorm(4)(x), BatchNorm(4)(x))
