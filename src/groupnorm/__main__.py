"""`python -m groupnorm ...` (and `torchrun -m groupnorm train ...`): the `groupnorm` CLI."""

import sys

from groupnorm.cli import main

if __name__ == "__main__":
    sys.exit(main())
