"""`python -m resist_mpi.check`: the entry point only; the code is resist_mpi.tools.check."""
import sys

from .tools.check import main

if __name__ == "__main__":
    sys.exit(main())
