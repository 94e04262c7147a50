"""`python -m resist_mpi.train`: the entry point only; the code is resist_mpi.cli.train."""
import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
