"""Batch-statistics norms: BatchNorm with virtual workers, Batch Renorm, and a CPU-capable SyncBN.

Why these exist beside torch's classes:

* The paper's batch-size study runs BN on 8 GPUs with n images each, statistics per GPU. On one
  process we reproduce that with *virtual workers*: ``virtual_batch = n`` makes a training-mode
  forward normalize each chunk of n samples with its own statistics, through aten's batch-norm
  kernel (one call per chunk, written into one output). Running statistics are updated once per
  step with the chunk averages, as if the workers' buffers were averaged.
  :func:`per_chunk_batch_norm` is the same computation in plain tensor ops: the oracle.
* ``BatchNorm`` accepts 2-5 D input (it is BatchNorm1d/2d/3d picked by the input rank at call
  time), so a model can take the norm kind as a plain string.
* Batch Renormalization (Ioffe, 2017) is not in torch.
* ``torch.nn.SyncBatchNorm`` refuses CPU tensors; ours all-reduces with autograd-aware
  collectives, so it works with gloo on CPU as well as NCCL on GPU.

The state_dict keys are those of ``torch.nn.BatchNorm2d`` (weight, bias, running_mean,
running_var, num_batches_tracked), so checkpoints move between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNorm", "BatchRenorm", "SyncBatchNorm", "set_virtual_batch", "uses_batch_stats",
           "worker_batch_norm", "per_chunk_batch_norm"]


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


def _worker_sizes(n_total: int, n: int) -> list[int]:
    """Samples per virtual worker: n each, the last one smaller when n does not divide the batch
    (the last batch of an epoch)."""
    if n <= 0:
        raise ValueError(f"virtual batch must be a positive int, got {n}")
    return [n] * (n_total // n) + ([n_total % n] if n_total % n else [])


# normalize(x_part, mean_out, var_out) -> y_part: BN of one worker (see BatchNorm._normalize_worker)
_Normalize = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _run_workers(x: torch.Tensor, n: int, normalize: _Normalize, stats_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split x into workers of n samples, normalize each, and collect their statistics.

    One aten batch-norm call per worker, outputs concatenated: aten's forward and backward
    kernels do the work, and only the split/cat bookkeeping is added to the autograd graph.
    Folding the W workers into the channel dim of a single call would need a transposed copy of
    x, y and both gradients (W and C are not adjacent in memory in either layout); it measured
    slower (benchmarks/bench_bn.py). Returns (y, means, unbiased variances), one row per worker.
    """
    sizes = _worker_sizes(x.shape[0], n)
    c = x.shape[1]
    # Zeroed buffers that aten's running-statistics update with momentum 1 overwrites with the
    # worker's mean and unbiased variance, exactly (1·s + 0·0); rows of one tensor, one alloc.
    stats = torch.zeros((2, len(sizes), c), dtype=stats_dtype, device=x.device)
    ys = [normalize(part, mean, var)
          for part, mean, var in zip(x.split(sizes), stats[0], stats[1], strict=True)]
    unbiased = stats[1]
    if sizes[-1] == 1 and x[0].numel() == c:
        # One value per channel: aten's unbiased variance is 0/0; the per-chunk formula's is 0.
        # (A copy: autograd saved the buffers for the backward and checks their version.)
        unbiased = unbiased.clone()
        unbiased[-1] = 0.0
    return (ys[0] if len(ys) == 1 else torch.cat(ys)), stats[0], unbiased


def worker_batch_norm(x: torch.Tensor, n: int, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-5
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BN of x (N, C, *spatial) on virtual workers of ``n`` samples through aten's kernels.

    The function behind :class:`BatchNorm`'s ``virtual_batch``: each chunk of n samples (the
    last one smaller when n does not divide N) is normalized with its own mean and biased
    variance, then the affine. Returns ``(y, means, unbiased_vars)``, the last two of shape
    (chunks, C). Same results as :func:`per_chunk_batch_norm` up to the reduction order of the
    statistics (aten sums NCHW input sequentially in float64, channels-last input sequentially
    in float32; see ARCHITECTURE.md).
    """
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *spatial), got {tuple(x.shape)}")
    if weight is not None:
        dtype = weight.dtype
    else:
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

    def normalize(part: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(part, weight, bias, mean, var, True, 1.0, eps,
                                torch.backends.cudnn.enabled)

    return _run_workers(x, n, normalize, dtype)


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


def per_chunk_batch_norm(x: torch.Tensor, n: int, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BN with per-chunk statistics in plain tensor ops: the oracle for :class:`BatchNorm`'s
    virtual workers (float64 in, float64 out) and the path it took before it called aten.

    Splits x (N, C, *spatial) into chunks of ``n`` samples (the last one smaller when n does not
    divide N), normalizes each with its own mean and biased variance (two-pass, fp32 for
    fp16/bf16 input), applies the affine. Returns ``(y, means, unbiased_vars)``, the last two of
    shape (chunks, C): what the running statistics average.
    """
    from ..layout import memory_format_of

    c = x.shape[1]
    shape = (1, 1, c, 1)

    def chunked(part: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xf, mean, var, count = _chunk_stats(part, size)
        y = (xf - mean) * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.reshape(shape)
        if bias is not None:
            y = y + bias.reshape(shape)
        y = y.reshape(part.shape).to(part.dtype).contiguous(memory_format=memory_format_of(part))
        unbiased = var * (count / max(count - 1, 1))
        return y, mean.reshape(-1, c), unbiased.reshape(-1, c)

    if x.shape[0] % n == 0:
        return chunked(x, n)
    parts = [chunked(p, p.shape[0]) for p in torch.split(x, n)]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]))


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

    def _update_running(self, means: torch.Tensor, unbiased_vars: torch.Tensor) -> None:
        """Fold one step's batch statistics into the running buffers (and count the step once).

        ``means`` and ``unbiased_vars`` hold one row of C values per worker; every worker weighs
        the same, as if the workers' buffers were averaged.
        """
        if not (self.training and self.track_running_stats):
            return
        factor = self._momentum()
        with torch.no_grad():
            self.running_mean.lerp_(means.mean(0).to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased_vars.mean(0).to(self.running_var.dtype), factor)

    def _stats_dtype(self, x: torch.Tensor) -> torch.dtype:
        """dtype of the per-worker statistics: the parameters' (aten's mixed-precision rule), fp32
        for fp16/bf16 input without parameters, else the input's."""
        if self.weight is not None:
            return self.weight.dtype
        if self.running_mean is not None:
            return self.running_mean.dtype
        return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

    def _normalize_worker(self, x: torch.Tensor, mean_out: torch.Tensor,
                          var_out: torch.Tensor) -> torch.Tensor:
        """BN of one worker's samples by aten's kernel (see :func:`_run_workers` for the
        buffers); Batch Renorm overrides."""
        return torch.batch_norm(x, self.weight, self.bias, mean_out, var_out, True, 1.0, self.eps,
                                torch.backends.cudnn.enabled)

    def _forward_workers(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """BN on ceil(N / n) workers of n samples (the last one smaller when n does not divide
        N, as in the last batch of an epoch); the running statistics are updated once."""
        y, means, unbiased = _run_workers(x, n, self._normalize_worker, self._stats_dtype(x))
        self._update_running(means, unbiased)
        return y

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

    def _normalize_worker(self, x: torch.Tensor, mean_out: torch.Tensor,
                          var_out: torch.Tensor) -> torch.Tensor:
        """x̂ of one worker by aten's kernel (the gradient flows through its statistics, as in
        BN), then x̂·r + d and the affine as one per-channel scale and shift."""
        r_max, d_max = self._limits
        xhat, mean, invstd = torch.native_batch_norm(x, None, None, mean_out, var_out, True, 1.0,
                                                     self.eps)
        with torch.no_grad():
            running_std = torch.sqrt(self.running_var.float() + self.eps)
            r = (1.0 / (invstd.float() * running_std)).clamp(1.0 / r_max, r_max)
            d = ((mean.float() - self.running_mean.float()) / running_std).clamp(-d_max, d_max)
        scale, shift = r, d
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight
        if self.bias is not None:
            shift = shift + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.reshape(shape), xhat, scale.reshape(shape)).to(x.dtype)

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
        n = int(count.item())
        unbiased = var.detach() * (n / max(n - 1, 1))
        self._update_running(mean.detach()[None], unbiased[None])
        y = self._affine(y, shape)
        return y.to(input.dtype).contiguous(memory_format=memory_format_of(input))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm in ``module`` by this class (like torch's classmethod).

        torch's BatchNorm1d/2d/3d/SyncBatchNorm and this package's :class:`BatchNorm` become
        ``cls`` with their γ, β, running statistics, step count and options; Batch Renorm and
        other norms stay. Children are replaced in place; when ``module`` itself is a BN the new
        layer is returned, so always use the return value.
        """
        if isinstance(module, _BatchNorm) and not isinstance(module, cls | BatchRenorm):
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group=process_group,
                      virtual_batch=getattr(module, "virtual_batch", None),
                      dim=getattr(module, "dim", None))
            ref = module.weight if module.weight is not None else module.running_mean
            if ref is not None:
                new = new.to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var",
                             "num_batches_tracked"):
                    src, dst = getattr(module, name, None), getattr(new, name, None)
                    if src is not None and dst is not None:
                        dst.copy_(src)
            return new.train(module.training)
        for name, child in list(module.named_children()):
            new_child = cls.convert_sync_batchnorm(child, process_group)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


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
