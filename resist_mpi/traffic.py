"""`python -m resist_mpi.traffic`: the entry point only; the code is resist_mpi.tools.traffic."""
import sys

from .tools.traffic import main

if __name__ == "__main__":
    sys.exit(main())
