"""`python -m resist_mpi.checkpoint`: the entry point only; the code is resist_mpi.cli.checkpoint."""
import sys

from .cli.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
