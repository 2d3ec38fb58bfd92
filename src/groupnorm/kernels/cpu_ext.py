"""Builds and loads the C++ CPU extension (``cpu/gn_cpu.cpp``) once per process.

The source is compiled at first use with ``torch.utils.cpp_extension.load`` into
``$TORCH_EXTENSIONS_DIR/<name>`` (default root ``~/.cache/torch_extensions``), so later
processes only load the shared object. The name (:func:`ext_name`) holds a hash of the source,
the torch and Python versions and a hash of the CPU's flags: two installs, two torch versions
or two kinds of CPU sharing a cache directory each keep their own build instead of rebuilding
each other's. A build prints one line to stderr first (it takes a minute or two). If there is no
compiler or the build fails, :func:`load_cpu_ext` returns ``False`` once with a warning and the
``"cpu"`` backend falls back to torch ops.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from groupnorm._sysinfo import cpu_flags

SOURCE = Path(__file__).with_name("cpu") / "gn_cpu.cpp"
# -march=native: the cache lives on the machine that built it; the kernel loops rely on AVX2/512.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]
#: seconds the last load_cpu_ext() spent in cpp_extension.load (the build, or loading the cache)
LOAD_SECONDS: float | None = None


def cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags, part of the extension's name.

    The build uses -march=native; a cache directory shared by different machines (an NFS home)
    then keeps one build per kind of CPU instead of loading one that may crash with SIGILL.
    """
    return hashlib.sha1((platform.machine() + cpu_flags()).encode()).hexdigest()[:8]


def ext_name() -> str:
    """The extension's build name: source hash, torch and Python versions, CPU flags hash.

    e.g. ``groupnorm_cpu_3f9a01c2_torch2_13_0_cpu_py311_5be0e1aa``; a C identifier, since torch
    uses it as the library's symbol prefix.
    """
    src = hashlib.sha1(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:8]
    torch_version = re.sub(r"\W", "_", torch.__version__)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"groupnorm_cpu_{src}_torch{torch_version}_{py}_{cpu_tag()}"


def build_directory(name: str) -> str:
    """Where the extension called ``name`` is built and cached."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return os.path.join(root, name)


@functools.cache
def load_cpu_ext() -> bool:
    """Compile (or load the cached build of) the CPU extension; True when its ops are usable."""
    global LOAD_SECONDS
    if os.environ.get("GROUPNORM_DISABLE_CPU_EXT"):
        return False
    try:
        from torch.utils import cpp_extension

        name = ext_name()
        build_dir = build_directory(name)
        if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
            # the only output of a build: compiling takes 1-3 minutes on 2 cores, and a silent
            # first call that long looks like a hang
            print(f"groupnorm: compiling the C++ CPU kernels for this CPU and torch "
                  f"{torch.__version__} (once, 1-3 min) into {build_dir}", file=sys.stderr,
                  flush=True)
        os.makedirs(build_dir, exist_ok=True)
        start = time.perf_counter()
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            is_python_module=False,
            verbose=False,
        )
        LOAD_SECONDS = time.perf_counter() - start
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
