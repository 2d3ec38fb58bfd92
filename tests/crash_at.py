"""Run the `groupnorm` command with a simulated SIGKILL at one point of a run's bookkeeping.

Usage: ``python tests/crash_at.py POINT[:K] ARGS...`` runs ``groupnorm ARGS...`` in this process
and exits with status 137 (``os._exit``: no cleanup, as a SIGKILL) the K-th time (default 1) it
reaches POINT:

- ``epoch_row``: an epoch's row is recorded, its checkpoint not yet written;
- ``checkpoint_write``: halfway through writing a checkpoint's temp file;
- ``finish``: a run is marked done, its checkpoint not yet deleted.

The crash-safety tests use it to hit the windows that a random kill rarely finds. It wraps the
store and the file system from outside; the package has no hooks for it.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    spec, args = sys.argv[1], sys.argv[2:]
    point, _, k = spec.partition(":")
    want, seen = int(k or 1), [0]

    def reached() -> bool:
        seen[0] += 1
        return seen[0] == want

    from groupnorm.cli import main as groupnorm_main
    from groupnorm.experiments.store import Store

    if point in ("epoch_row", "finish"):
        name = "add_epoch" if point == "epoch_row" else "finish"
        original = getattr(Store, name)

        def wrapped(self, *a, **kw):
            original(self, *a, **kw)
            if reached():
                os._exit(137)

        setattr(Store, name, wrapped)
    elif point == "checkpoint_write":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:  # checkpoints are the only files fsynced from Python
            if reached():
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os._exit(137)
            real_fsync(fd)

        os.fsync = fsync
    else:
        raise SystemExit(f"unknown crash point {point!r}")
    sys.exit(groupnorm_main(args))


if __name__ == "__main__":
    main()
