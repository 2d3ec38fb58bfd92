"""``Loader``: seeded shuffling, DDP sharding, batched augmentation and normalization.

The whole split lives on ``device`` as uint8; an epoch is one ``torch.randperm`` and every batch is
a handful of tensor ops (gather, pad, one advanced-indexing crop+flip, fused scale/shift), with no
per-sample Python, so on a CPU the loader costs a small fraction of a training step (see
``benchmarks/bench_loader.py``).

Determinism: the sample order is a function of ``(seed, epoch)`` only (identical on every rank,
then sharded ``order[rank::world_size]`` as ``DistributedSampler`` does), and the augmentation draws
are a function of ``(seed, epoch, rank)``. Call :meth:`Loader.set_epoch` before each epoch, as with
``DistributedSampler``; without it every epoch repeats epoch 0's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .dataset import ImageDataset

__all__ = ["Loader"]

_MASK = (1 << 63) - 1


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-style), so (seed, epoch) pairs never share a stream."""
    h = 0xCBF29CE484222325
    for p in parts:
        h = ((h ^ (p & _MASK)) * 0x100000001B3) & _MASK
    return h


class Loader:
    """Iterate over an :class:`ImageDataset` in batches of normalized float32 tensors.

    Args:
        ds: the dataset (its uint8 tensors are moved to ``device`` once).
        batch_size: samples per batch (per rank).
        shuffle: seeded random order per epoch; otherwise dataset order.
        augment: random crop (zero padding ``pad``, output the input size) and, if ``flip``,
            horizontal flip, drawn per sample; video clips get one crop/flip for all frames.
        drop_last: drop the last incomplete batch (and, with ``world_size > 1``, the samples that
            do not divide evenly; otherwise the order is padded by wrapping around, so every rank
            gets the same number of batches).
        seed: base seed of the order and of the augmentation.
        device: where batches are produced.
        rank, world_size: this process's shard for data-parallel training.
        pad: zero padding of the random crop, pixels per side.
        flip: include the horizontal flip in ``augment`` (turn off for digits).
        channels_last: yield batches in channels-last memory format (``channels_last_3d`` for
            clips), for a model converted with ``model.to(memory_format=torch.channels_last)``;
            the values are the same. The uint8 split is kept in that layout, so no batch is
            converted.

    Yields ``(x, y)``: x float32 ``(B, C, H, W)`` / ``(B, C, T, H, W)`` normalized with the
    dataset's per-channel mean/std, y int64 ``(B,)``.
    """

    def __init__(self, ds: ImageDataset, batch_size: int, *, shuffle: bool = True,
                 augment: bool = False, drop_last: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 pad: int = 4, flip: bool = True, channels_last: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                f"world_size={world_size}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if len(ds) == 0:
            raise ValueError(f"dataset {ds.name!r} is empty")
        self.ds = ds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.flip = flip
        self.channels_last = channels_last
        self.epoch = 0
        self.images = ds.images.to(self.device)  # uint8, resident for the loader's lifetime
        self._format = torch.contiguous_format
        if channels_last:
            self._format = torch.channels_last if ds.images.dim() == 4 else torch.channels_last_3d
            # gather, pad and the normalizing addcmul all keep this layout
            self.images = self.images.contiguous(memory_format=self._format)
        self.labels = ds.labels.to(self.device)
        shape = (1, -1) + (1,) * (ds.images.dim() - 2)  # broadcast over (N, C, *spatial)
        mean = torch.tensor(ds.mean, dtype=torch.float32)
        std = torch.tensor(ds.std, dtype=torch.float32)
        # x_norm = (u8 / 255 - mean) / std = u8 * scale + shift, one fused multiply-add per batch.
        self._scale = (1.0 / (255.0 * std)).view(shape).to(self.device)
        self._shift = (-mean / std).view(shape).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next iteration produces."""
        self.epoch = int(epoch)

    def _num_samples(self) -> int:
        n, w = len(self.ds), self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order (CPU int64)."""
        n = len(self.ds)
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = self._num_samples() * self.world_size
            if total > n:  # wrap around so that every rank gets the same count
                order = torch.cat([order] * math.ceil(total / n))
            order = order[:total][self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        m = self._num_samples()
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices().to(self.device)
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, self.rank, 1))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]  # uint8 gather, (B, C, *spatial)
            if self.augment:
                x = self._crop_flip(x, g).contiguous(memory_format=self._format)
            yield torch.addcmul(self._shift, x.to(torch.float32), self._scale), self.labels[idx]

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random crop from the zero-padded batch, optionally mirrored, in one gather."""
        b, h, w, p = x.shape[0], x.shape[-2], x.shape[-1], self.pad
        lead = x.shape[1:-2]  # (C,) or (C, T): one crop per sample across channels and frames
        # Draw on the CPU generator (device-independent streams), then move the few numbers.
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
        mirror = torch.rand(b, generator=g) < 0.5 if self.flip else torch.zeros(b, dtype=torch.bool)
        ar_h, ar_w = torch.arange(h), torch.arange(w)
        rows = dy[:, None] + ar_h  # (B, H) rows in the padded image
        cols = dx[:, None] + torch.where(mirror[:, None], w - 1 - ar_w, ar_w)  # (B, W)
        flat = x.reshape(b, -1, h, w)
        if p:
            flat = F.pad(flat, (p, p, p, p))  # zero padding, (B, K, H+2p, W+2p)
        k = flat.shape[1]
        dev = x.device
        out = flat[torch.arange(b, device=dev)[:, None, None, None],
                   torch.arange(k, device=dev)[None, :, None, None],
                   rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]
        return out.reshape(b, *lead, h, w)

    def __repr__(self) -> str:
        return (f"Loader({self.ds.name!r}, n={len(self.ds)}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, augment={self.augment}, drop_last={self.drop_last}, "
                f"seed={self.seed}, epoch={self.epoch}, rank={self.rank}/{self.world_size}, "
                f"device={self.device}" + (", channels_last=True" if self.channels_last else "")
                + ")")
