"""Collectives in flight (Work, started by a background call) and the one background thread per
process that runs them in submission order."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional


class Work:
    """A collective (or a chain of them) in flight, started by a background call.

    done() tells, without blocking, whether it finished (and lets it progress where the library
    needs calls for that: MPI's nonblocking collectives); wait() blocks until it has. Attributes:
    t_start and t_done (perf_counter seconds; t_done when done() first saw it finished, or at
    the end of wait()).
    """

    def __init__(self):
        self.t_start, self.t_done = time.perf_counter(), None

    def _finished(self) -> bool:
        raise NotImplementedError

    def _complete(self) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        if self.t_done is None and self._finished():
            self.t_done = time.perf_counter()
        return self.t_done is not None

    def wait(self) -> None:
        self._complete()
        if self.t_done is None:
            self.t_done = time.perf_counter()

    @property
    def duration(self) -> float:
        """Seconds from the start to when it was seen done (so far, if still running)."""
        return (self.t_done or time.perf_counter()) - self.t_start


class DoneWork(Work):
    """Work that ran to completion when it was started (no background to run it in). error: what
    it raised, raised again by wait() (where a background job's error comes out on every backend).
    Its duration is 0 unless t_start is given: its time was the caller's, nothing hidden."""

    def __init__(self, t_start: Optional[float] = None, error: Optional[BaseException] = None):
        super().__init__()
        self.t_done = time.perf_counter()
        self.t_start = self.t_done if t_start is None else t_start
        self.error = error

    def _finished(self) -> bool:
        return True

    def _complete(self) -> None:
        if self.error is not None:
            raise self.error


class ThreadWork(Work):
    """Work run by the process's background thread (a Future's result)."""

    def __init__(self, future: Future):
        super().__init__()
        self.future = future

    def _finished(self) -> bool:
        return self.future.done()

    def _complete(self) -> None:
        self.future.result()


class _Process:
    """What every communicator of one process (or one thread rank) shares: the background thread.

    One worker runs every background job in the order they were submitted, so every rank issues
    its background collectives in the same order, on communicators that no other thread uses.
    """

    def __init__(self):
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any]) -> Future:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="resist-comm")
            return self._executor.submit(fn)
