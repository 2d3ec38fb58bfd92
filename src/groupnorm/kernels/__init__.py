"""Fast GroupNorm backends: Triton kernels for CUDA, a C++ fast path for the CPU.

The core (:func:`groupnorm.group_norm`) dispatches through two functions defined here:

- :func:`group_norm_fast` runs y = act(GN(x)·γ + β + residual) on ``"triton"`` or ``"cpu"``;
- :func:`auto_backend` picks the backend that ``backend="auto"`` uses for an input.

Both backends are ``torch.library`` custom ops (``groupnorm::gn_{cpu,triton}_{fwd,bwd}``, see
:mod:`groupnorm.kernels.ops`), so they are differentiable and ``torch.compile(fullgraph=True)``
traces them without graph breaks; eager calls reach the same kernels through a cheaper
``autograd.Function``. Statistics are always fp32 (fp64 for fp64 inputs). The kernels compute
the forward and first-order gradients of plain tensors; every other mode is sent to the
composite path by :func:`groupnorm.group_norm` before it gets here, or, for a second derivative,
by the backward itself (:mod:`groupnorm.kernels.ops`).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from groupnorm.activations import ACT_CODES
from groupnorm.kernels.ops import run_backend
from groupnorm.layout import dense_layout, is_channels_last, strides_like

__all__ = ["BackendUnavailable", "auto_backend", "group_norm_fast", "triton_available",
           "cpu_ext_ready", "CPU_AUTO_TABLE", "CPU_COMPILE_TABLE", "CUDA_AUTO_TABLE"]


class BackendUnavailable(RuntimeError):
    """A fast backend cannot run this input (no device, no compiler, unsupported layout)."""


def _constant_under_compile(fn):
    """Mark fn as returning a constant to dynamo, without importing dynamo.

    This is what ``torch.compiler.assume_constant_result`` does (torch 2.0 to 2.13 set this
    attribute and nothing else), but that function imports ``torch._dynamo`` — seconds that
    ``import groupnorm`` must not pay (tests/test_import.py). If a later torch stops honouring
    the attribute, dynamo traces into fn and tests/test_compile.py's fullgraph cases fail.
    """
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def cpu_ext_ready() -> bool:
    """Whether the C++ extension is built (compiling it at first call); a constant to dynamo."""
    from groupnorm.kernels import cpu_ext

    return cpu_ext.load_cpu_ext()


# cached apart from triton_available: dynamo warns on assume_constant_result over a cache wrapper
@functools.cache
def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


@_constant_under_compile
def triton_available() -> bool:
    """True when ``import triton`` works (kernels also need CUDA or ``TRITON_INTERPRET=1``)."""
    return _import_triton()


@_constant_under_compile
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# backend="auto" on the CPU. Key: (channels_last, fused act/residual, training = grad enabled
# and x requires grad); value: the range [min, max) of x.numel() routed to the C++ path, or None
# (always torch). Rule: the C++ path from the smallest size of a ladder (benchmarks/
# bench_targets.py: (4, 64, H, H), 4K to 4M elements, G = 32, group_norm(backend="cpu") vs
# backend="torch", SiLU for "fused") from which every larger size ran >= 1.1x torch in the
# median of 3 repeats, at 1 thread and at 2 (the larger of the two crossovers; of two runs, the
# larger), else None. Measured 2026-11-30 on the 2-core AVX2 AMD EPYC (BENCHMARKS.md; load
# average 1-5, so the 2-thread ladder was often quantized by the 4 ms scheduler tick).
# Below the crossovers the per-call overhead (~10-20 us) outweighs the kernels' gain.
CPU_AUTO_TABLE: dict[tuple[bool, bool, bool], tuple[int, int] | None] = {
    (False, False, False): None,  # NCHW inference: 0.99-1.20x torch from 132K, 0.70-0.93x below
    (False, False, True): None,  # NCHW training: 1.01-1.10x from 506K, 0.61-0.93x below
    (False, True, False): (65536, 1 << 62),  # NCHW GN+SiLU inference: 1.22-1.72x from 64K
    (False, True, True): (518400, 1 << 62),  # NCHW GN+SiLU training: 1.16-2.0x from 506K
    # Channels-last: the "torch" backend copies to NCHW and back (aten's channels-last CPU
    # kernel takes E[x²]−E[x]² in fp32), which the C++ path beats from ~10K elements.
    (True, False, False): (9216, 1 << 62),  # 1.31-11x from 9K (1.00x at 4K)
    (True, False, True): (30976, 1 << 62),  # 1.23-5.3x from 30K (0.89-1.05x below)
    (True, True, False): (9216, 1 << 62),  # 1.32-6.7x from 9K
    (True, True, True): (9216, 1 << 62),  # 1.29-5.8x from 9K
}
# dtypes measured on the C++ path (fp16 shares bf16's code but has not been benchmarked).
CPU_AUTO_DTYPES = (torch.float32, torch.bfloat16)

# backend="auto" on CUDA, same keys and rule as CPU_AUTO_TABLE. Empty (always torch) until the
# Triton kernels have been measured on a GPU: they are tested under the interpreter and compile
# for sm_80/sm_90, but have never run on real CUDA in this project (BENCHMARKS.md), and "auto"
# must not pick a backend that was not measured at least as fast as torch. Fill it from
# `groupnorm bench --device cuda`; backend="triton" runs them explicitly.
CUDA_AUTO_TABLE: dict[tuple[bool, bool, bool], tuple[int, int] | None] = {
    key: None for key in CPU_AUTO_TABLE
}


# backend="auto" under torch.compile on the CPU, per CPU_AUTO_TABLE key: "torch" (aten's
# group_norm, which inductor decomposes — torch's own lowering of native_group_norm and of its
# backward — and fuses with the neighbouring ReLU / max-pool / residual add) or "cpu" (the C++
# kernels as opaque custom ops). Read while dynamo traces, so the choice is baked into the
# graph. Chosen by benchmarks/bench_compile.py (BENCHMARKS.md, "Compiled models", 2026-11-30,
# 1 thread): on SimpleNetV2 and ResNet-20 training steps and inference, NCHW and channels-last,
# GN+ReLU separate and fused, "torch" was the fastest compiled way or tied with it in every case,
# the opaque C++ op never ahead beyond the noise, and 0.65-0.76x of eager where a ReLU and a
# max-pool follow GN (opacity stops inductor fusing them with GN's elementwise pass; aten's own
# kernels wrapped as an opaque op lost the same way).
CPU_COMPILE_TABLE: dict[tuple[bool, bool, bool], str] = {key: "torch" for key in CPU_AUTO_TABLE}


def auto_backend(x: Tensor, num_groups: int, activation: str | None,
                 residual: Tensor | None) -> str:
    """The backend ``backend="auto"`` uses for this input: "triton", "cpu" or "torch".

    Eager calls follow ``CPU_AUTO_TABLE`` / ``CUDA_AUTO_TABLE``; on the CPU under
    ``torch.compile`` the choice is ``CPU_COMPILE_TABLE``'s, measured on compiled models, where
    what wins is not what wins in eager mode.
    """
    if x.dim() < 2 or x.numel() == 0:
        return "torch"
    training = torch.is_grad_enabled() and x.requires_grad
    key = (is_channels_last(x), activation is not None or residual is not None, training)
    if x.is_cuda:
        span = CUDA_AUTO_TABLE[key]
        ok = (span is not None and span[0] <= x.numel() < span[1] and triton_available()
              and x.dtype in (torch.float32, torch.float16, torch.bfloat16))
        return "triton" if ok else "torch"
    if x.device.type != "cpu" or x.dtype not in CPU_AUTO_DTYPES:
        return "torch"
    if torch.compiler.is_compiling():
        # read while dynamo traces: the choice is baked into the graph (guarded on the entry)
        choice = CPU_COMPILE_TABLE[key]
        return "cpu" if choice == "cpu" and cpu_ext_ready() else "torch"
    span = CPU_AUTO_TABLE[key]
    if span is None or not span[0] <= x.numel() < span[1] or not cpu_ext_ready():
        return "torch"
    return "cpu"


def group_norm_fast(backend: str, x: Tensor, num_groups: int, weight: Tensor | None,
                    bias: Tensor | None, eps: float, activation: str | None,
                    residual: Tensor | None) -> Tensor:
    """Run GroupNorm (+ residual + activation) on a fast backend (``"triton"`` or ``"cpu"``).

    The output keeps x's dtype and (dense) memory format. Raises :class:`BackendUnavailable`
    when the backend cannot run this input (:func:`groupnorm.group_norm` then falls back to
    the composite torch path where that is the documented behaviour). Callers have already sent
    transforms, forward AD and tracing to the composite path (:mod:`groupnorm.modes`).
    """
    if activation not in ACT_CODES:
        raise ValueError(f"activation {activation!r} is not one of None, 'relu', 'silu', 'gelu'")
    if x.dim() < 2:
        raise BackendUnavailable(f"x must be (N, C, *spatial); got shape {tuple(x.shape)}")
    if backend == "cpu":
        if x.device.type != "cpu":
            raise BackendUnavailable(f"backend 'cpu' needs a CPU tensor; x is on {x.device}; "
                                     "use backend='triton' or 'torch'")
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise BackendUnavailable(f"backend 'cpu' does not support dtype {x.dtype}")
        if not cpu_ext_ready():  # warned once inside load_cpu_ext
            raise BackendUnavailable("the C++ CPU extension could not be built (see the "
                                     "warning above); install g++ and ninja")
    elif backend == "triton":
        if not triton_available():
            raise BackendUnavailable("backend 'triton' needs the triton package: "
                                     "pip install 'torch==<your torch>' triton")
        if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
            raise BackendUnavailable(f"backend 'triton' needs a CUDA tensor (x is on {x.device}) "
                                     "or TRITON_INTERPRET=1 set before triton is imported")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise BackendUnavailable(f"backend 'triton' does not support dtype {x.dtype}")
    else:
        raise ValueError(f"unknown fast backend {backend!r}; expected 'triton' or 'cpu'")

    x = dense_layout(x)
    C = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # The kernels index γ and β as dense (C,) arrays: a strided or expanded weight is copied.
    w = weight.to(acc).contiguous() if weight is not None else x.new_ones(C, dtype=acc)
    b = bias.to(acc).contiguous() if bias is not None else x.new_zeros(C, dtype=acc)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape "
                             f"{tuple(x.shape)}; pass a residual of the same shape")
        residual = strides_like(residual.to(dtype=x.dtype), x)
    return run_backend(backend, x, w, b, residual, num_groups, float(eps), ACT_CODES[activation])

