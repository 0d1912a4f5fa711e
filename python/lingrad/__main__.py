"""`python -m lingrad`: the same command line as the `lingrad` script (see lingrad.cli)."""

import sys

from lingrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
