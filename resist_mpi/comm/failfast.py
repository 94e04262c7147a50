"""Ending a process so that the launcher ends the whole job (a backend without an abort of its own)."""
from __future__ import annotations

import sys


def abort_process(code: int) -> None:
    """End this process so that the launcher ends the job: MPI_Abort when MPI is running here (it
    takes every rank down), else a plain exit (horovodrun, torchrun and srun --kill-on-bad-exit
    then stop the others). For backends that have no abort of their own."""
    import os
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import mpi4py
        if "mpi4py.MPI" not in sys.modules:
            mpi4py.rc.initialize = False  # only look: never start MPI just to abort
        from mpi4py import MPI
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(code)
    except Exception:  # noqa: BLE001 - nothing may stop the exit below
        pass
    os._exit(code)
