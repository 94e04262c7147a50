"""Preemption: a signal asks the job to stop at the next safe point, save, and ask to be requeued.

SLURM warns a job before its time limit (``#SBATCH --signal=B:USR1@300``: the batch script gets
SIGUSR1 300 s before the end and forwards it to the ranks) and sends SIGTERM when it preempts one.
Either signal only sets a flag here. The ranks agree on it at the end of the round, inside the
metrics reduction every round already makes (no extra collective), so every rank stops after the
same round; the trainer then writes a checkpoint and exits with REQUEUE_EXIT, which the job
scripts turn into a requeue (``scontrol requeue``; PBS Pro requeues a job that exits with 99).

Why the end of a round and not the current step: a round's end is where every rank holds a
consistent model (blocks averaged, shared layers averaged), so the checkpoint is the ordinary,
world-size independent one and the resumed run continues bit for bit. Within a round the ranks'
sub-models differ and no collective runs, so stopping mid-round would need one collective per step
(which ResIST's local steps are free of) and per-rank checkpoints. The cost is latency: the stop
comes at most one round after the signal, so ask for the warning at least a few rounds ahead.
"""
from __future__ import annotations

import signal
import threading
from typing import Iterable, Optional

REQUEUE_EXIT = 99  # "checkpoint written, requeue me" (PBS Pro's requeue status; job scripts map it)
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequest:
    """Catches stop signals; `requested` tells whether one arrived (on this rank).

    Args:
        signals: names of the signals that ask for a stop (default SIGTERM and SIGUSR1).
    Handlers are installed only from the main thread (Python's rule) and restored by close().
    """

    def __init__(self, signals: Iterable[str] = STOP_SIGNALS):
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in signals:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Only a flag: the training loop decides when to act, so no collective is ever interrupted.
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
