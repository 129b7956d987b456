"""``python -m seqfuse.bench``: see :mod:`seqfuse.bench.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
