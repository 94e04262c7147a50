"""`python -m resist_mpi.plot`: the entry point only; the code is resist_mpi.tools.plot."""
import sys

from .tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
