"""The torch backend's exit: _destroy waits until torch's worker threads have let go of the last
collectives' tensors (letting go after the interpreter began to exit aborts the process). The
worker's reference is stood in for by a view, which holds one on its base, dropped by a thread."""
import threading
import time

import pytest
import torch

T = pytest.importorskip("resist_mpi.comm.torch_dist")


def test_settle_waits_for_the_last_reference_a_thread_holds():
    t = torch.zeros(4)
    T._RECENT.clear()
    T._held(t)  # as a collective remembers its tensor, before it runs
    held = [t.view(-1)]  # the worker thread's reference
    assert t._use_count() > T._RECENT[-1][0][1]

    def let_go():
        time.sleep(0.05)
        held.clear()
    threading.Thread(target=let_go).start()
    T._settle(timeout_s=5.0)
    assert held == [] and t._use_count() == T._RECENT[-1][0][1]


def test_settle_gives_up_on_a_reference_kept_for_good():
    t = torch.zeros(4)
    T._RECENT.clear()
    T._held(t)
    kept = t.view(-1)  # referenced by something else since: the count stays higher
    T._settle(timeout_s=0.05)  # returns all the same (the exit is held up at most that long)
    assert kept._base is t and t._use_count() > T._RECENT[-1][0][1]
    T._RECENT.clear()
