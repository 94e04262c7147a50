"""python -m resist_mpi.data pack ...: see resist_mpi.data.packing."""
import sys

from .packing import main

sys.exit(main())
