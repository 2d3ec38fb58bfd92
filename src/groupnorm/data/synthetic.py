"""Generated data: a seeded, learnable image task and moving Fashion-MNIST video clips.

Both are pure functions of their options and seed, so a test or a smoke run gets the same
tensors on every machine without any file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["make_synthetic", "make_moving_clips", "SPLIT_SEED_OFFSET"]

#: Added to the seed per split so train and test draw different samples of the same task.
SPLIT_SEED_OFFSET = {"train": 0, "test": 1_000_003}


def make_synthetic(n: int, num_classes: int, image_size: int, channels: int, seed: int,
                   split: str, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images (n, C, S, S) and balanced labels of a class-template-plus-noise task.

    Each class owns a smooth random template (a 4x4 Gaussian field upsampled bilinearly, fixed by
    ``seed`` alone so that splits share it). A sample is its class template, circularly shifted by
    up to S/8 pixels, plus i.i.d. Gaussian pixel noise of ``noise`` times the template's scale:
    linearly separable enough for a few epochs of SGD, not so easy that every norm ties at 100%.
    """
    g_task = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=g_task)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                              align_corners=False)
    templates = templates / templates.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None]

    g = torch.Generator().manual_seed(seed + SPLIT_SEED_OFFSET[split])
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    max_shift = max(1, image_size // 8)
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    ar = torch.arange(image_size)
    rows = (ar[None, :] - dy[:, None]) % image_size  # (n, S): circular shift by dy
    cols = (ar[None, :] - dx[:, None]) % image_size  # (n, S)
    t = templates[labels]  # (n, C, S, S)
    shifted = t[torch.arange(n)[:, None, None, None], torch.arange(channels)[None, :, None, None],
                rows[:, None, :, None], cols[:, None, None, :]]
    x = shifted + noise * torch.randn(shifted.shape, generator=g)
    images = (128.0 + 40.0 * x).round().clamp(0, 255).to(torch.uint8)
    return images, labels.to(torch.int64)


def _bounce(p: torch.Tensor, span: int) -> torch.Tensor:
    """Reflect positions into [0, span] (an object bouncing off the canvas walls)."""
    if span == 0:
        return torch.zeros_like(p)
    q = torch.remainder(p, 2 * span)
    return torch.where(q > span, 2 * span - q, q)


def make_moving_clips(items: torch.Tensor, labels: torch.Tensor, n: int, frames: int, size: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (n, 1, T, size, size) of one item each moving at constant speed, bouncing off walls.

    ``items`` is a uint8 (N, 1, h, w) image set (Fashion-MNIST). Item choice, start position and
    velocity come from ``seed``; the label of a clip is its item's class. Items are drawn as a
    seeded permutation of the source (cycled when ``n`` exceeds it), so classes stay as balanced
    as the source. Frames are built with one advanced-indexing write per frame for all clips.
    """
    n_src, _, h, w = items.shape
    if size < max(h, w):
        raise ValueError(f"size ({size}) must be at least the item size ({h}x{w})")
    g = torch.Generator().manual_seed(seed)
    reps = -(-n // n_src)
    pick = torch.cat([torch.randperm(n_src, generator=g) for _ in range(reps)])[:n]
    src = items[pick, 0]  # (n, h, w)
    span_y, span_x = size - h, size - w
    # Speed scales with the free space so that an item crosses a good part of it within T frames.
    vmax = max(1.0, 2.0 * max(span_x, span_y) / max(1, frames - 1))
    y0 = torch.rand(n, generator=g) * span_y
    x0 = torch.rand(n, generator=g) * span_x
    vy = (torch.rand(n, generator=g) * 2 - 1) * vmax
    vx = (torch.rand(n, generator=g) * 2 - 1) * vmax
    t = torch.arange(frames, dtype=torch.float32)
    ys = _bounce(y0[:, None] + vy[:, None] * t, span_y).round().long()  # (n, T)
    xs = _bounce(x0[:, None] + vx[:, None] * t, span_x).round().long()  # (n, T)
    clips = torch.zeros(n, frames, size, size, dtype=torch.uint8)
    idx = torch.arange(n)[:, None, None]
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    for f in range(frames):
        rows = (ys[:, f, None] + ar_h)[:, :, None]  # (n, h, 1)
        cols = (xs[:, f, None] + ar_w)[:, None, :]  # (n, 1, w)
        clips[:, f][idx, rows, cols] = src
    return clips.unsqueeze(1), labels[pick].to(torch.int64)
