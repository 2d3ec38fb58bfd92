"""GroupNorm operator benchmark: a thin wrapper around ``groupnorm bench`` (groupnorm.bench).

    python benchmarks/bench_gn.py --shapes 8x256x56x56 --csv out/bench_gn.csv
    python benchmarks/bench_gn.py --device cuda --csv out/bench_gn_cuda.csv
"""

from __future__ import annotations

import sys

from groupnorm.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
