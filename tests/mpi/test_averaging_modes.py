"""--overlap and --outer-optimizer on real ranks (RESIST_TEST_BACKEND), to the bit against the
single-process computation of tests/cases/averaging.py (exact sums: any allreduce order agrees).

    mpirun -np 4 python -m pytest tests/mpi/test_averaging_modes.py
"""
import itertools
import os

import pytest
import torch

from cases import averaging as A
from resist_mpi import comm as C

MODES = [dict(overlap=o, outer=out) for o, out in itertools.product((False, True), (None, (0.5, 0.5)))]
IDS = ["plain", "outer", "overlap", "overlap+outer"]


@pytest.fixture(scope="module")
def c():
    torch.set_num_threads(1)
    return C.init(os.environ.get("RESIST_TEST_BACKEND", "mpi"), fail_fast=False, device="cpu")


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("wire", ["float32", "int8"])
@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("strategy", ["local_sgd", "resist"])
def test_rounds_equal_the_single_process_computation(c, strategy, group_size, wire, mode):
    if group_size > 1 and (c.size % group_size or c.size // group_size < 2):
        pytest.skip("groups need 4 ranks")
    got, _ = A.run(c, A.make_model(), strategy=strategy, wire=wire, group_size=group_size, **mode)
    want = A.reference(c.size, strategy=strategy, wire=wire, group_size=group_size, **mode)
    for r, per_rank in enumerate(want):
        assert torch.equal(got[r], per_rank[c.rank]), r


@pytest.mark.parametrize("mode", MODES[2:], ids=IDS[2:])
@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("strategy", ["local_sgd", "resist"])
def test_an_average_landing_after_some_steps_equals_the_single_process_computation(c, strategy, group_size, mode):
    """overlap_steps=1 of 2 (int8 wire): the values after every step, to the bit."""
    if group_size > 1 and (c.size % group_size or c.size // group_size < 2):
        pytest.skip("groups need 4 ranks")
    seen, want_seen = [], []
    got, _ = A.run(c, A.make_model(), strategy=strategy, wire="int8", group_size=group_size, settle=1, seen=seen,
                   **mode)
    want = A.reference(c.size, strategy=strategy, wire="int8", group_size=group_size, settle=1, seen=want_seen, **mode)
    for r, per_rank in enumerate(want):
        assert torch.equal(got[r], per_rank[c.rank]), r
    for k, per_rank in enumerate(want_seen):
        assert torch.equal(seen[k], per_rank[c.rank]), k


@pytest.mark.parametrize("settle", [None, 1], ids=["at-the-rounds-end", "after-a-step"])
@pytest.mark.parametrize("mode", MODES[1:], ids=IDS[1:])
def test_state_dict_and_load_continue_bit_for_bit(c, mode, settle):
    if settle and not mode["overlap"]:
        pytest.skip("overlap_steps needs overlap")
    mode = dict(mode, settle=settle)
    a = A.run(c, A.make_model(), strategy="resist", wire="int8", checkpoint_at=1, **mode)
    b = A.run(c, A.make_model(), strategy="resist", wire="int8", checkpoint_at=1, resume=True, **mode)
    assert all(torch.equal(u, v) for u, v in zip(a[0], b[0]))
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
