"""Builds and loads the C++ CPU extension (``cpu/gn_cpu.cpp``) once per process.

The source is compiled at first use with ``torch.utils.cpp_extension.load`` and cached by torch
in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later processes only
load the shared object. If there is no compiler or the build fails, :func:`load_cpu_ext` returns
``False`` once with a warning and the ``"cpu"`` backend falls back to torch ops.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

from groupnorm._sysinfo import cpu_flags

SOURCE = Path(__file__).with_name("cpu") / "gn_cpu.cpp"
# -march=native: the cache lives on the machine that built it; the kernel loops rely on AVX2/512.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]


def cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags, part of the extension's name.

    The build uses -march=native; a cache directory shared by different machines (an NFS home)
    then keeps one build per kind of CPU instead of loading one that may crash with SIGILL.
    """
    return hashlib.sha1((platform.machine() + cpu_flags()).encode()).hexdigest()[:8]


@functools.cache
def load_cpu_ext() -> bool:
    """Compile (or load the cached build of) the CPU extension; True when its ops are usable."""
    if os.environ.get("GROUPNORM_DISABLE_CPU_EXT"):
        return False
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=f"groupnorm_cpu_ext_{cpu_tag()}",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        torch.ops.groupnorm_cpu.fwd  # noqa: B018  (raises if the library did not register)
    except Exception as err:  # noqa: BLE001 - any build failure means "use torch instead"
        warnings.warn(
            f"groupnorm: could not build the C++ CPU kernels ({type(err).__name__}: "
            f"{str(err).strip()[:300]}); backend='cpu' falls back to torch ops. Install a C++ "
            "compiler (g++) and ninja to get the fast path.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
