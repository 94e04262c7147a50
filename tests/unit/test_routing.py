import pytest

from resist_mpi.plan.routing import everyone, needers_from_assignment, plan_exchange


def test_first_round_all_from_rank0():
    need = needers_from_assignment([(0, 3), (1,), (2,)], 4)
    plan = plan_exchange([(0,)] * 4, need, 3)
    assert plan.transfers == {(0, 1): (1,), (0, 2): (2,)}
    assert plan.sources[(0, 0)] == (0,) and plan.sources[(0, 3)] == (0,)  # rank 0 keeps, nothing moves
    assert plan.needed(0) == [0, 3] and plan.needed(1) == [1]


def test_kept_blocks_do_not_move():
    old = [(0, 1), (2, 3)]
    new = [(0, 2), (1, 3)]  # rank 0 keeps 0, rank 1 keeps 3
    plan = plan_exchange(needers_from_assignment(old, 4), needers_from_assignment(new, 4), 2)
    assert plan.transfers == {(0, 1): (1,), (1, 0): (2,)}
    assert plan.sources[(0, 0)] == (0,) and plan.sources[(1, 3)] == (1,)
    numel = [10, 20, 30, 40]
    assert plan.send_counts(0, numel) == [0, 20] and plan.recv_counts(0, numel) == [0, 30]
    assert plan.bytes_sent(1, numel) == 120 and plan.total_bytes(numel) == 200
    assert plan.busiest_bytes(numel) == 120  # rank 0 receives 30 elements, rank 1 sends them


def test_same_assignment_moves_nothing():
    a = [(0, 2), (1, 3)]
    plan = plan_exchange(needers_from_assignment(a, 4), needers_from_assignment(a, 4), 2)
    assert plan.transfers == {}


def test_divergent_block_averaged_where_needed():
    # block 0 trained by ranks 0 and 1 (overlap); next round rank 2 needs it, rank 1 too
    holders = [(0, 1), (2,), (2,)]
    need = [(1, 2), (0,), (1,)]
    plan = plan_exchange(holders, need, 3, divergent={0})
    assert plan.sources[(2, 0)] == (0, 1)  # both trained copies averaged on rank 2
    assert plan.sources[(1, 0)] == (0, 1)  # rank 1 averages its own copy with rank 0's
    assert plan.transfers[(0, 2)] == (0,) and plan.transfers[(1, 2)] == (0,)
    assert plan.transfers[(0, 1)] == (0,)
    assert (1, 1) not in plan.transfers  # own copy never crosses the wire


def test_synced_multi_holder_sends_one_copy_balanced():
    # every rank holds everything (after evaluation): nothing moves
    plan = plan_exchange(everyone(4, 2), [(0,), (1,), (0,), (1,)], 2)
    assert plan.transfers == {}
    # blocks held identically by ranks 0 and 1, needed by rank 2: the load is split between them
    plan = plan_exchange([(0, 1)] * 4, [(2,)] * 4, 3, block_numel=[5] * 4)
    assert plan.bytes_sent(0, [5] * 4) == plan.bytes_sent(1, [5] * 4) == 40
    assert all(len(plan.sources[(2, b)]) == 1 for b in range(4))


def test_plan_is_deterministic_and_send_recv_match():
    old = [(0, 5, 7), (1, 2), (3, 4, 6)]
    new = [(2, 3), (0, 4, 6), (1, 5, 7)]
    p1 = plan_exchange(needers_from_assignment(old, 8), needers_from_assignment(new, 8), 3)
    p2 = plan_exchange(needers_from_assignment(old, 8), needers_from_assignment(new, 8), 3)
    assert p1 == p2
    numel = list(range(1, 9))
    for r in range(3):
        for s in range(3):
            assert p1.send_counts(r, numel)[s] == p1.recv_counts(s, numel)[r]


def test_errors():
    with pytest.raises(ValueError, match="no holder"):
        plan_exchange([()], [(0,)], 1)
    with pytest.raises(ValueError, match="rank 3"):
        plan_exchange([(0,)], [(3,)], 2)


def test_a_gather_becomes_allgather_contributions_each_moved_copy_once():
    """gather_contributions: only for gathers; every block that moves goes in once (from the least
    loaded of its senders), a divergent one from each holder; nothing for a block every rank holds.
    ring_bytes: the ring's busiest rank (sends all but its successor's segment, receives all but its own)."""
    from resist_mpi.plan.routing import everyone, gather_contributions, ring_bytes
    numel = [10, 20, 30, 40, 50]
    holders = [(0,), (2,), (0, 1, 2), (0, 2), (1,)]
    assert gather_contributions(plan_exchange(holders, [(1,)] * 5, 3), numel) is None  # not a gather
    assert gather_contributions(plan_exchange(holders[2:3], everyone(1, 3), 3), [30]) is None  # nothing moves
    plan = plan_exchange(holders, everyone(5, 3), 3, {3}, numel)
    contributions = gather_contributions(plan, numel)
    assert contributions == [(0, 3), (4,), (1, 3)]
    counts = [10 + 40, 50, 20 + 40]
    assert ring_bytes(contributions, numel) == 4 * max(sum(counts) - min(counts[r], counts[(r + 1) % 3]) for r in range(3))
    assert ring_bytes(contributions, numel) == 4 * (160 - 50)
    # identical copies on two ranks, which the all-to-all sends from both (to one rank each): one goes in
    plan = plan_exchange([(0, 1), (1,)], everyone(2, 4), 4, set(), [7, 3])
    assert plan.transfers[(0, 2)] == (0,) and plan.transfers[(1, 3)] == (0, 1)
    assert gather_contributions(plan, [7, 3]) == [(0,), (1,), (), ()]
