"""`python -m resist_mpi.cluster`: the entry point only; the code is resist_mpi.tools.cluster."""
import sys

from .tools.cluster import main

if __name__ == "__main__":
    sys.exit(main())
