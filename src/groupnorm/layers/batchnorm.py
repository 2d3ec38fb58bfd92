"""Batch-statistics norms: BatchNorm with virtual workers, Batch Renorm, and a CPU-capable SyncBN.

Why these exist beside torch's classes:

* The paper's batch-size study runs BN on 8 GPUs with n images each, statistics per GPU. On one
  process we reproduce that with *virtual workers*: ``virtual_batch = n`` makes a training-mode
  forward compute the statistics per chunk of n samples (vectorized, no Python loop when n divides
  the batch). Running statistics are updated once per step with the chunk averages, as if the
  workers' buffers were averaged.
* ``BatchNorm`` accepts 2-5 D input (it is BatchNorm1d/2d/3d picked by the input rank at call
  time), so a model can take the norm kind as a plain string.
* Batch Renormalization (Ioffe, 2017) is not in torch.
* ``torch.nn.SyncBatchNorm`` refuses CPU tensors; ours all-reduces with autograd-aware
  collectives, so it works with gloo on CPU as well as NCCL on GPU.

The state_dict keys are those of ``torch.nn.BatchNorm2d`` (weight, bias, running_mean,
running_var, num_batches_tracked), so checkpoints move between the two.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNorm", "BatchRenorm", "SyncBatchNorm", "set_virtual_batch", "uses_batch_stats"]


# dim -> the input ranks of torch's BatchNorm{dim}d: 1d takes (N, C) or (N, C, L)
_RANKS = {1: (2, 3), 2: (4,), 3: (5,)}


def _check_rank(x: torch.Tensor, num_features: int, dim: int | None = None) -> None:
    if dim is not None and x.dim() not in _RANKS[dim]:
        raise ValueError(
            f"BatchNorm with dim={dim} (BatchNorm{dim}d) expects input of ndim "
            f"{' or '.join(map(str, _RANKS[dim]))}, got ndim={x.dim()} with shape "
            f"{tuple(x.shape)}; pass dim=None to take any rank")
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"expected input of shape (N, C) or (N, C, *spatial) with ndim 2-5, got shape "
            f"{tuple(x.shape)}")
    if x.shape[1] != num_features:
        raise ValueError(
            f"expected input with {num_features} channels (dim 1), got shape {tuple(x.shape)}")


def _chunk_stats(x: torch.Tensor,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per-chunk mean and biased variance in fp32: returns (xc, mean, var, count per chunk).

    xc has shape (W, n, C, L) (a view of x when possible); mean/var have shape (W, 1, C, 1).
    """
    n_total, c = x.shape[0], x.shape[1]
    if chunk <= 0 or n_total % chunk:
        raise ValueError(f"batch size {n_total} is not a multiple of the virtual batch {chunk}")
    w = n_total // chunk
    xc = x.reshape(w, chunk, c, -1)
    xf = xc.float() if xc.dtype in (torch.float16, torch.bfloat16) else xc
    mean = xf.mean(dim=(1, 3), keepdim=True)
    var = (xf - mean).pow(2).mean(dim=(1, 3), keepdim=True)  # two-pass, biased
    return xf, mean, var, chunk * xc.shape[-1]


class BatchNorm(_BatchNorm):
    r"""Batch Normalization for any input rank (1d/2d/3d by the input), with virtual workers.

    Ioffe & Szegedy, `Batch Normalization <https://arxiv.org/abs/1502.03167>`__ (2015). In
    training mode the mean and biased variance are taken over (N, *spatial) per channel — or per
    chunk of ``virtual_batch`` samples when that is set, which is BN on ``N / virtual_batch``
    workers with ``virtual_batch`` samples each. Running statistics (unbiased variance) are used
    in eval mode.

    Args:
        num_features: C, the number of channels.
        eps, momentum, affine, track_running_stats: as in :class:`torch.nn.BatchNorm2d`.
        virtual_batch: per-worker batch n for the statistics (None: the whole batch).
        dim: 1, 2 or 3 to accept only the input ranks of ``BatchNorm1d/2d/3d`` (None: any).

    Shape:
        Input (N, C) or (N, C, *spatial) with 1-3 spatial dims; output the same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 virtual_batch: int | None = None, dim: int | None = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        if dim is not None and dim not in _RANKS:
            raise ValueError(f"dim must be None, 1, 2 or 3 (BatchNorm1d/2d/3d), got {dim!r}")
        self.virtual_batch = virtual_batch
        self.dim = dim

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_rank(input, self.num_features, self.dim)

    def _use_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _momentum(self) -> float:
        """The running-statistics factor for this step (counts the step)."""
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _affine(self, y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y

    def _update_running(self, stats: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Fold one step's batch statistics into the running buffers (and count the step once).

        ``stats`` holds (mean, biased var, samples per channel) per group of chunks of equal
        size; every chunk (worker) weighs the same, as if the workers' buffers were averaged.
        """
        if not (self.training and self.track_running_stats):
            return
        factor = self._momentum()
        c = self.num_features
        with torch.no_grad():
            means = torch.cat([m.reshape(-1, c) for m, _, _ in stats])
            unbiased = torch.cat([(v * (n / max(n - 1, 1))).reshape(-1, c) for _, v, n in stats])
            self.running_mean.lerp_(means.mean(0).to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased.mean(0).to(self.running_var.dtype), factor)

    def _normalize_chunks(self, xf: torch.Tensor, mean: torch.Tensor,
                          var: torch.Tensor) -> torch.Tensor:
        """Normalize (W, n, C, L) chunks with their own statistics; Batch Renorm overrides."""
        return (xf - mean) * torch.rsqrt(var + self.eps)

    def _chunked(self, x: torch.Tensor, chunk: int
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int]]:
        """Normalize x in chunks of ``chunk`` samples, each with its own statistics; returns y and
        the statistics (not yet folded into the running buffers)."""
        from ..layout import memory_format_of

        xf, mean, var, count = _chunk_stats(x, chunk)
        y = self._affine(self._normalize_chunks(xf, mean, var), (1, 1, self.num_features, 1))
        y = y.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format_of(x))
        return y, (mean, var, count)

    def _forward_workers(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """BN on ceil(N / n) workers of n samples (the last one smaller when n does not divide
        N, as in the last batch of an epoch); the running statistics are updated once."""
        if x.shape[0] % n == 0:
            y, stats = self._chunked(x, n)
            self._update_running([stats])
            return y
        parts = [self._chunked(p, p.shape[0]) for p in torch.split(x, n)]
        self._update_running([stats for _, stats in parts])
        return torch.cat([y for y, _ in parts])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        vb = self.virtual_batch
        if self._use_batch_stats() and vb is not None and input.shape[0] > vb:
            return self._forward_workers(input, vb)
        return super().forward(input)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", virtual_batch={self.virtual_batch}" if self.virtual_batch else ""
        return s + (f", dim={self.dim}" if self.dim is not None else "")


class BatchRenorm(BatchNorm):
    r"""Batch Renormalization (Ioffe, 2017, `arXiv:1702.03275 <https://arxiv.org/abs/1702.03275>`__).

    In training, :math:`\hat x = \frac{x - \mu_B}{\sigma_B} r + d` with
    :math:`r = \mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_B / \sigma)` and
    :math:`d = \mathrm{clip}_{[-d_{max}, d_{max}]}((\mu_B - \mu) / \sigma)`, where
    :math:`\mu, \sigma` are the running statistics and r, d are treated as constants in the
    gradient. Eval mode uses the running statistics, as BN. With r_max = 1 and d_max = 0 it is BN.

    The warm-up schedule is the paper's: r_max = 1 and d_max = 0 for ``warmup_steps`` training
    steps, then both relax linearly to their targets, reached at ``r_max_steps`` and
    ``d_max_steps`` (the paper: 5k, 40k and 25k steps for r_max = 3, d_max = 5). Steps are counted
    by ``num_batches_tracked``, so the schedule survives a checkpoint.

    Args:
        num_features: C.
        r_max, d_max: the clipping targets (the GN paper's comparison used 1.5 and 0.5).
        warmup_steps, r_max_steps, d_max_steps: the schedule above (0 = no warm-up).
        eps, momentum, affine, virtual_batch: as :class:`BatchNorm`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, *, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 5000, r_max_steps: int = 40000, d_max_steps: int = 25000,
                 virtual_batch: int | None = None, dim: int | None = None, device=None,
                 dtype=None) -> None:
        if r_max < 1 or d_max < 0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if not 0 <= warmup_steps <= min(r_max_steps, d_max_steps) and (r_max > 1 or d_max > 0):
            raise ValueError(
                f"need 0 <= warmup_steps ({warmup_steps}) <= r_max_steps ({r_max_steps}) and "
                f"d_max_steps ({d_max_steps})")
        super().__init__(num_features, eps, momentum, affine, True, virtual_batch=virtual_batch,
                         dim=dim, device=device, dtype=dtype)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps, self.d_max_steps = r_max_steps, d_max_steps

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) in force at the current step of the warm-up schedule."""
        t = int(self.num_batches_tracked)

        def ramp(target: float, rest: float, end: int) -> float:
            if end <= self.warmup_steps:
                return target if t >= self.warmup_steps else rest
            frac = min(max((t - self.warmup_steps) / (end - self.warmup_steps), 0.0), 1.0)
            return rest + (target - rest) * frac

        return ramp(self.r_max, 1.0, self.r_max_steps), ramp(self.d_max, 0.0, self.d_max_steps)

    def _normalize_chunks(self, xf: torch.Tensor, mean: torch.Tensor,
                          var: torch.Tensor) -> torch.Tensor:
        r_max, d_max = self._limits
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            running_std = torch.sqrt(self.running_var.float() + self.eps).reshape(mean.shape[1:])
            r = (std / running_std).clamp(1.0 / r_max, r_max)
            d = ((mean - self.running_mean.float().reshape(mean.shape[1:])) / running_std).clamp(
                -d_max, d_max)
        return (xf - mean) / std * r + d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        # r and d use the running statistics *before* this step's update (which comes after
        # every chunk is normalized) and the limits of this step of the warm-up schedule.
        self._limits = self.current_limits()
        vb = self.virtual_batch
        return self._forward_workers(input, input.shape[0] if vb is None else min(vb, len(input)))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with an exact backward: every rank's loss depends on every rank's input,
    so the gradient of the sum is the sum of the ranks' gradients (an all-reduce again)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(BatchNorm):
    r"""BatchNorm whose statistics are all-reduced across ``torch.distributed`` ranks.

    Unlike :class:`torch.nn.SyncBatchNorm` it runs on CPU (gloo) as well as GPU (NCCL): the
    statistics go through an autograd-aware all-reduce (its backward is an all-reduce of the
    gradient), so the backward pass is exact without a hand-written kernel. Mean and
    variance are two-pass (sum, then sum of squared deviations from the global mean). Outside an
    initialized process group (or with one rank) it is :class:`BatchNorm`.

    Args:
        num_features: C.
        process_group: the group to reduce over (default: the world).
        eps, momentum, affine, track_running_stats: as :class:`BatchNorm`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 process_group=None, virtual_batch: int | None = None, dim: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         virtual_batch=virtual_batch, dim=dim, device=device, dtype=dtype)
        self.process_group = process_group

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self._use_batch_stats() or self._world() == 1:
            return super().forward(input)
        from ..layout import memory_format_of

        c = self.num_features
        xf = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        xc = xf.transpose(0, 1).reshape(c, -1)  # (C, N * L)
        # Sums and the count travel in fp64: a float32 count is exact only up to 2**24.
        local = torch.cat([xc.sum(1).double(), xc.new_full((1,), xc.shape[1], dtype=torch.float64)])
        total = _AllReduceSum.apply(local, self.process_group)
        count = total[c]
        mean = (total[:c] / count).to(xc.dtype)
        sq = _AllReduceSum.apply((xc - mean[:, None]).pow(2).sum(1), self.process_group)
        var = sq / count.to(sq.dtype)
        shape = (1, c) + (1,) * (input.dim() - 2)
        y = (xf - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        self._update_running([(mean.detach(), var.detach(), int(count.item()))])
        y = self._affine(y, shape)
        return y.to(input.dtype).contiguous(memory_format=memory_format_of(input))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm in ``module`` by this class (like torch's classmethod)."""
        from .convert import convert_norms

        return convert_norms(module, to="syncbn", process_group=process_group)


def uses_batch_stats(module: nn.Module) -> bool:
    """True for norms whose training-mode output depends on the other samples of the batch."""
    return isinstance(module, _BatchNorm)


def set_virtual_batch(model: nn.Module, n: int | None) -> nn.Module:
    """Make every batch-statistics norm of ``model`` use chunks of ``n`` samples (None: off).

    This is BN on ``batch / n`` workers with n samples each, on one process. Norms that do not
    use batch statistics (GN, LN, IN) are untouched — they are independent of n by construction.
    Returns ``model``.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise ValueError(f"virtual batch must be a positive int or None, got {n!r}")
    for name, m in model.named_modules():
        if isinstance(m, BatchNorm):
            m.virtual_batch = n
        elif isinstance(m, _BatchNorm) and n is not None:
            raise TypeError(
                f"module {name or '<root>'} is {type(m).__name__}, which cannot compute per-chunk "
                "statistics; build the model with groupnorm.norm_layer('bn', ...) or convert it "
                "first: groupnorm.convert_norms(model, to='bn')")
    return model
