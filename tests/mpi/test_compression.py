"""--wire-dtype on real ranks: a compressed round equals its single-process computation, the
error-feedback residual carries over, every rank ends with the same bits, and the bytes counted are
the compressed bytes, scales included (traffic.py's model). Any backend (RESIST_TEST_BACKEND).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from resist_mpi import comm as C
from resist_mpi.tools import traffic as T
from resist_mpi.averaging.compression import Codec, ErrorFeedback
from resist_mpi.plan.groups import slice_counts
from resist_mpi.models import create_model
from resist_mpi.strategies import DataParallel, LocalSGD, ResIST
from helpers import seeded

WIRES = ("float16", "bfloat16", "int8")


@pytest.fixture(scope="module")
def c():
    return C.init(os.environ.get("RESIST_TEST_BACKEND", "mpi"), fail_fast=False, device="cpu")


def trained(rank, n, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, generator=g) * 1e-2


def reference_round(x0, updates, residuals, codec):
    """One compressed round computed in one process: (new value, every rank's new residual)."""
    S, n = len(updates), x0.numel()
    counts = slice_counts(n, S)
    starts = [sum(counts[:d]) for d in range(S)]
    u = [updates[r] + residuals[r] for r in range(S)]
    dec = [[codec.decode(codec.encode(u[r][starts[d]:starts[d] + counts[d]]), counts[d]) for d in range(S)]
           for r in range(S)]
    err = [torch.cat([u[r][starts[d]:starts[d] + counts[d]] - dec[r][d] for d in range(S)]) for r in range(S)]
    own = []
    for d in range(S):  # the owner of chunk d sums every rank's decoded chunk in rank order
        total = torch.zeros(counts[d])
        for r in range(S):
            total.add_(dec[r][d])
        own.append(total.div_(S))
    mean = torch.cat([codec.decode(codec.encode(own[d]), counts[d]) for d in range(S)])
    for d in range(S):
        err[d][starts[d]:starts[d] + counts[d]] += S * (own[d] - mean[starts[d]:starts[d] + counts[d]])
    return x0 + mean, err


@pytest.mark.parametrize("wire", WIRES)
def test_two_compressed_rounds_equal_the_single_process_computation(c, wire):
    S, r, n = c.size, c.rank, 10_000  # int8: three chunks of 4096, the last one short
    codec = Codec(wire)
    x = torch.linspace(-1, 1, n)  # the same start on every rank
    fb = ErrorFeedback(c, wire)
    ref_x, ref_res = x.clone(), [torch.zeros(n) for _ in range(S)]
    for step in range(2):
        fb.mark(x)
        x += trained(r, n, step)
        before = c.counters()
        fb.average(x)
        updates = [(ref_x + trained(s, n, step)) - ref_x for s in range(S)]  # as each rank computes it
        ref_x, ref_res = reference_round(ref_x, updates, ref_res, codec)
        assert torch.equal(x, ref_x)
        assert torch.equal(fb.residual, ref_res[r])  # what this rank owes to the next round
        sizes = [codec.size(k) for k in slice_counts(n, S)]
        total = 4 * sum(sizes)
        want = (0, 0) if S == 1 else (4 * (sum(sizes) - sizes[r]) * 1 + total - 4 * sizes[(r + 1) % S],
                                      4 * (S - 1) * sizes[r] + total - 4 * sizes[r])
        assert (c.bytes_sent - before[0], c.bytes_recv - before[1]) == want


def factory():
    with seeded(7):
        return create_model("preact_resnet34", 10, width=4)


def step(model, params, rank, k):
    g = torch.Generator().manual_seed(100 * rank + k)
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)), torch.randint(0, 10, (4,), generator=g)).backward()
    opt.step()


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("strategy", ["resist", "local_sgd"])
def test_strategies_end_rounds_with_identical_bits_and_compressed_bytes(c, strategy, wire):
    model = factory()
    s = ResIST(model, c, wire_dtype=wire) if strategy == "resist" else LocalSGD(model, c, wire_dtype=wire)
    tensors = s.shared_tensors if strategy == "resist" else (lambda: list(model.parameters()) +
                                                             [b for b in model.buffers() if b.is_floating_point()])
    sizes = T.model_sizes(factory())
    for k in range(3):
        s.begin_round()
        step(model, s.parameters(), c.rank, k)
        before = c.counters()
        s.end_round()  # the round's average (all that end_round moves without groups), counted alone
        moved = c.reduce_stats([c.bytes_sent - before[0]], "sum")[0]
        flat = torch.cat([t.reshape(-1) for t in tensors()])
        other = flat.clone()
        c.bcast_(other, root=0)
        assert torch.equal(flat, other)  # every rank, the same bits
        numel = sizes.shared if strategy == "resist" else sizes.full
        assert moved == T.average_wire(numel, c.size, wire)  # the traffic model: the same average, counted


def test_data_parallel_compressed_gradients_are_the_mean_of_the_cast_gradients(c):
    model = factory()
    dp = DataParallel(model, c, wire_dtype="float16")
    ref = factory()
    grads = []
    for r in range(c.size):
        ref.zero_grad()
        g = torch.Generator().manual_seed(100 * r)
        F.cross_entropy(ref(torch.randn(4, 3, 32, 32, generator=g)), torch.randint(0, 10, (4,), generator=g)).backward()
        grads.append([p.grad.clone() for p in ref.parameters()])
    model.zero_grad()
    g = torch.Generator().manual_seed(100 * c.rank)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)), torch.randint(0, 10, (4,), generator=g)).backward()
    for k, p in enumerate(model.parameters()):
        mean = sum(gr[k].half().float() for gr in grads) / c.size
        assert torch.allclose(p.grad, mean.half().float(), rtol=2e-3, atol=1e-6)
    assert dp.comm_time > 0
