"""``import groupnorm`` vs ``import torch``: fresh interpreters, interleaved, median of each.

Each round starts ``python -c "import torch"`` and ``python -c "import groupnorm"`` one after the
other (alternating which goes first), so both see the same machine load and the same warm page
cache; the figure is the ratio of the two medians (target: at most 1.2). ``--src`` points at
another source tree (e.g. an older checkout) to compare before and after in one run.

Usage::

    python benchmarks/bench_import.py [--rounds 7] [--src path/to/src ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"


def _time_import(module: str, src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--src", type=Path, nargs="*", default=[HERE],
                        help="source trees to time `import groupnorm` from (default: this one)")
    args = parser.parse_args(argv)
    import torch

    sys.path.insert(0, str(HERE))
    from groupnorm._sysinfo import cpu_model

    print(f"# {datetime.date.today()}  {cpu_model() or platform.machine()}  "
          f"{os.cpu_count()} cores  torch {torch.__version__}  python {platform.python_version()}")
    times: dict[str, list[float]] = {"torch": [], **{str(s): [] for s in args.src}}
    for i in range(args.rounds):
        order = ["torch", *map(str, args.src)]
        if i % 2:
            order.reverse()
        for name in order:
            module, src = ("torch", HERE) if name == "torch" else ("groupnorm", Path(name))
            times[name].append(_time_import(module, src))
    base = statistics.median(times["torch"])
    print(f"import torch: median {base:.2f} s over {args.rounds} runs "
          f"(min {min(times['torch']):.2f}, max {max(times['torch']):.2f})")
    for src in map(str, args.src):
        med = statistics.median(times[src])
        print(f"import groupnorm ({src}): median {med:.2f} s (min {min(times[src]):.2f}, "
              f"max {max(times[src]):.2f}); ratio to import torch {med / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
