"""`python -m minitune plan ...`: the same as the `minitune` command."""

import sys

from minitune.cli import main

if __name__ == "__main__":
    sys.exit(main())
