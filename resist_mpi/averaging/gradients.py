"""The per-backward gradient average (GradientAverager): data-parallel training and warm-up."""
from __future__ import annotations

import time
from typing import List, Optional, Sequence

import torch

from ..comm import Comm, pack, unpack_
from .compression import Codec, compressed_mean
from ..errors import NonFiniteError
from .tensors import _check_finite


class GradientAverager:
    """Averages the gradients of parameters over ranks at the end of every backward pass.

    Data-parallel SGD without touching the user's loop: a hook on each parameter fires when its
    gradient is accumulated; the first one of a backward pass queues a callback that runs when the
    whole backward is done, and that callback averages every gradient with one fused allreduce
    (what DDP does, without bucketing). So `loss.backward(); opt.step()` steps on averaged gradients.
    Every rank must produce gradients for the same parameters (replicas of one model do). A backward
    that raised before its end leaves no trace: the next one averages as usual. An average that is
    not finite raises NonFiniteError from backward() on every rank (they all see the same average).

    Args:
        comm: the Comm to average over.
        params: the parameters whose gradients are averaged (attach() replaces them).
        wire_dtype: float32, or float16 / bfloat16 / int8 to move them compressed (resist_mpi.averaging.compression).
        check_finite: raise NonFiniteError on an average that is not finite (False with a loss
            scaler, which skips such a step and lowers its scale).
    Attributes:
        comm_time: seconds spent in the averages, cumulative.
    """

    def __init__(self, comm: Comm, params: Sequence[torch.nn.Parameter] = (), wire_dtype: str = "float32",
                 check_finite: bool = True):
        self.comm, self.check_finite = comm, check_finite
        self.codec = Codec(wire_dtype) if wire_dtype != "float32" else None
        self.comm_time = 0.0
        self.failed = False  # an average was not finite (NonFiniteError raised) since the strategy's round began
        self._queued_in: Optional[int] = None  # the backward pass (graph task) whose average is queued
        self.params: List[torch.nn.Parameter] = []
        self._all: List[torch.nn.Parameter] = []
        self._handles: List = []
        self.attach(params)

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients of params from now on (ResIST's round parameters change). A
        parameter frozen now (requires_grad=False) and unfrozen later is averaged from then on."""
        self.remove()
        self._all = list(params)
        self.params = [p for p in self._all if p.requires_grad]
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, _param) -> None:
        task = torch._C._current_graph_task_id()
        if self._queued_in != task:  # the first gradient of this backward (a failed one never ran its callback)
            self._queued_in = task
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self._queued_in = None
        if [id(p) for p in self._all if p.requires_grad] != [id(p) for p in self.params]:
            self.attach(self._all)  # a parameter was unfrozen (or frozen): hooks on the trainable ones now
        t0 = time.perf_counter()
        # every gradient, also of a parameter unfrozen since the hooks were put on (all ranks alike)
        grads = [p.grad for p in self._all if p.grad is not None]
        if not grads:
            return
        flat = pack(grads)
        if self.codec is None:
            # ---- distributed step: one fused gradient allreduce per backward ----
            self.comm.allreduce_mean_(flat)
        else:
            # ---- distributed step: the gradients' compressed average (no error feedback, as Horovod's) ----
            flat = compressed_mean(self.comm, flat, self.codec)[0]
        unpack_(flat, grads)
        self.comm_time += time.perf_counter() - t0
        if self.check_finite:
            try:
                _check_finite(flat, "the gradient average")
            except NonFiniteError:
                self.failed = True
                raise

    def remove(self) -> None:
        """Take the hooks off (the parameters then train alone again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
