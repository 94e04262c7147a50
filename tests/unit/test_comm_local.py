"""Pure parts of the comm package: fusion, launch detection, device choice, the world of one, thread ranks on one CPU."""
import os
import time

import pytest
import torch

from resist_mpi import comm
from resist_mpi.comm import pack, ring_allreduce_bytes, select_device, unpack_, world_info_from_env
from resist_mpi.comm.thread import run_ranks


def test_pack_unpack_roundtrip_in_place():
    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    flat = pack(ts)
    assert flat.shape == (12 + 5 + 8,) and flat.dtype == torch.float32
    assert torch.equal(flat[:12], ts[0].reshape(-1)) and torch.equal(flat[17:], ts[2].reshape(-1))
    targets = [torch.zeros_like(t) for t in ts]
    ids = [t.data_ptr() for t in targets]
    unpack_(flat * 2, targets)
    assert all(torch.equal(a, 2 * b) for a, b in zip(targets, ts))
    assert ids == [t.data_ptr() for t in targets]
    out = torch.empty(25)
    assert pack(ts, out=out) is out
    with pytest.raises(ValueError):
        unpack_(torch.zeros(3), targets)


def test_pack_and_unpack_on_meta_tensors_check_sizes_and_copy_nothing():
    """The traffic model runs the strategies on meta tensors: pack gives a buffer of the right size
    on the meta device without copying values (there are none), unpack_ checks and returns."""
    ts = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta")]
    flat = pack(ts)
    assert flat.device.type == "meta" and flat.shape == (17,) and flat.dtype == torch.float32
    unpack_(flat, ts)
    assert all(t.device.type == "meta" for t in ts)
    with pytest.raises(ValueError):
        pack(ts, out=torch.empty(3, device="meta"))
    with pytest.raises(ValueError):
        unpack_(torch.empty(3, device="meta"), ts)


@pytest.mark.parametrize("env,expected", [
    ({}, (0, 1, 0, 1, "none")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (3, 8, 1, 2, "openmpi")),
    ({"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}, (5, 6, 2, 3, "pmi")),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_STEP_ID": "0",
      "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, (7, 8, 3, 4, "slurm")),
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "4"},
     (1, 4, 1, 4, "horovodrun")),
    ({"PMIX_RANK": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0"}, (2, 4, 0, 4, "pmix")),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"},
     (5, 8, 1, 4, "torchrun")),
])
def test_launch_detection(env, expected):
    w = world_info_from_env(env)
    assert (w.rank, w.size, w.local_rank, w.local_size, w.launcher) == expected


def test_sbatch_script_without_srun_is_one_process():
    # inside a batch script SLURM_NTASKS says 4, but a plain `python` there is a world of one
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "12"}
    assert world_info_from_env(env).size == 1


def test_device_selection():
    assert select_device(3, "auto", cuda_count=0) == "cpu"
    assert select_device(3, "auto", cuda_count=2) == "cuda:1"
    assert select_device(5, "cuda", cuda_count=4) == "cuda:1"
    assert select_device(0, "cpu", cuda_count=4) == "cpu"
    assert select_device(2, "cuda:0", cuda_count=1) == "cuda:0"
    with pytest.raises(ValueError, match="no GPU"):
        select_device(0, "cuda", cuda_count=0)
    with pytest.raises(ValueError, match="only 1"):
        select_device(0, "cuda:3", cuda_count=1)
    with pytest.raises(ValueError, match="unknown device"):
        select_device(0, "tpu", cuda_count=1)


def test_ring_bytes():
    assert ring_allreduce_bytes(400, 4) == 600
    assert ring_allreduce_bytes(400, 1) == 0
    assert ring_allreduce_bytes(10, 3) == 13


def test_world_of_one_is_identity():
    c = comm.init("self", fail_fast=False)
    t = torch.arange(5.0)
    assert torch.equal(c.allreduce_mean_(t), torch.arange(5.0))
    recv, counts = c.alltoallv(torch.arange(3.0), [3])
    assert torch.equal(recv, torch.arange(3.0)) and counts == [3]
    assert c.bcast_object({"a": 1}) == {"a": 1}
    assert (c.bytes_sent, c.bytes_recv) == (0, 0)
    with pytest.raises(ValueError, match="float32"):
        c.allreduce_mean_(torch.arange(3))
    with pytest.raises(ValueError, match="send_counts"):
        c.alltoallv(torch.arange(3.0), [2])
    with pytest.raises(ValueError, match="unknown backend"):
        comm.resolve_backend("nccl")


def test_flatten_makes_views_that_follow_in_place_updates():
    from resist_mpi.comm.fusion import empty_flat, flatten_, is_view_of
    lin, bn = torch.nn.Linear(3, 2), torch.nn.BatchNorm2d(3)
    ts = list(lin.parameters()) + list(bn.parameters()) + [bn.running_mean, bn.running_var]
    values = [t.detach().clone() for t in ts]
    flat = flatten_(ts)
    assert is_view_of(ts, flat) and all(torch.equal(a, b) for a, b in zip(ts, values))
    flat.mul_(2)  # a collective on flat acts on the tensors themselves
    assert torch.equal(lin.weight, 2 * values[0]) and torch.equal(bn.running_var, 2 * values[-1])
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert is_view_of(ts, flat)
    lin.weight.data = torch.zeros(2, 3)  # replaced, not updated in place: no longer a view
    assert not is_view_of(ts, flat)
    assert empty_flat(10).shape == (10,) and empty_flat(10).dtype == torch.float32


def test_large_flat_buffers_start_on_a_huge_page():
    """Buffers of 4 MB and more start on a 2 MiB boundary (whole transparent huge pages for MPI's
    single-copy transfers); each is its own memory, of exactly the size asked for."""
    from resist_mpi.comm.fusion import HUGE_PAGE, empty_flat
    bufs = [empty_flat(n) for n in (1_181_696, 1_181_697, 15_433_252, 1 << 20)]
    for b, n in zip(bufs, (1_181_696, 1_181_697, 15_433_252, 1 << 20)):
        assert b.shape == (n,) and b.dtype == torch.float32 and b.is_contiguous()
        assert b.data_ptr() % HUGE_PAGE == 0
    for k, b in enumerate(bufs):
        b.fill_(k)
    assert all(torch.all(b == k) for k, b in enumerate(bufs))  # no two overlap


class _Nodes(comm.Comm):
    """A comm that only counts: rank `rank` of 8 on nodes of 4 (ranks 0-3 on node 0, 4-7 on node 1)."""

    def __init__(self, rank, nodes=(0, 0, 0, 0, 1, 1, 1, 1)):
        super().__init__(rank, len(nodes), 0, 1)
        self.set_nodes(nodes)


def test_cross_node_bytes_of_a_ring():
    """A ring sends to the next rank and receives from the previous one: with nodes 0000 1111, rank 3
    sends across (to 4), rank 4 receives across (from 3), rank 7 sends to 0, rank 0 receives from 7."""
    expect = {0: (0, 1), 1: (0, 0), 3: (1, 0), 4: (0, 1), 7: (1, 0)}
    for r, (sends_across, recvs_across) in expect.items():
        c = _Nodes(r)
        assert c._ring_tally(100, 60) == (100, 60, 100 * sends_across, 60 * recvs_across)
    single = _Nodes(3, nodes=(0,) * 8)
    assert single._ring_tally(100, 60) == (100, 60, 0, 0)


def test_cross_node_bytes_of_an_exchange_and_a_broadcast():
    c = _Nodes(1)
    sent_to, recv_from = [10, 99, 20, 30, 40, 50, 0, 70], [1, 99, 2, 3, 4, 0, 6, 7]
    # its own segment never counts; ranks 4-7 are on the other node
    assert c._peer_tally(sent_to, recv_from) == (220, 23, 160, 17)
    c._count_bcast(1000, root=1)  # the root sends to 7 ranks, 4 of them on the other node
    assert c.counters() == (7000, 0) and c.cross_counters() == (4000, 0)
    receiver = _Nodes(6)
    receiver._count_bcast(1000, root=1)
    assert receiver.counters() == (0, 1000) and receiver.cross_counters() == (0, 1000)
    with receiver.as_control():
        receiver._count_bcast(5, root=1)
    assert receiver.cross_counters() == (0, 1000) and receiver.control_bytes == 5


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="thread affinity is Linux's")
def test_thread_ranks_on_one_cpu_pin_only_the_rank_threads():
    from resist_mpi.comm.thread import run_ranks
    mine = os.sched_getaffinity(0)

    def body(c):
        t = torch.full((3,), float(c.rank))
        c.allreduce_mean_(t)
        return os.sched_getaffinity(0), t.tolist()

    pinned = run_ranks(4, body, one_cpu=True)
    assert [a for a, _ in pinned] == [{min(mine)}] * 4
    assert [t for _, t in pinned] == [[1.5] * 3] * 4  # the same collectives, the same values
    assert os.sched_getaffinity(0) == mine  # the caller's thread keeps its CPUs
    assert [a for a, _ in run_ranks(2, body)] == [mine] * 2  # not asked: not pinned


def test_the_mpi_backend_starts_open_mpi_with_its_defaults_unless_the_user_chose():
    """Before it starts MPI, the mpi backend gives the environment OPEN_MPI_DEFAULTS (the ring for
    the background average's MPI_Iallreduce) where it has no value, and its rules file for the
    blocking collectives where no coll_tuned parameter is set (a rules file would override an
    algorithm the user forced); a value the user gave stays. (Starting MPI here would start a
    singleton: tests/mpi/test_comm.py checks the rules' effect on real ranks, the benchmark their speed.)"""
    import os
    from resist_mpi.comm.mpi import OPEN_MPI_DEFAULTS, OPEN_MPI_RULES, with_open_mpi_defaults
    assert OPEN_MPI_DEFAULTS == {"OMPI_MCA_coll_libnbc_iallreduce_algorithm": "1"}
    rules = {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1", "OMPI_MCA_coll_tuned_dynamic_rules_filename": OPEN_MPI_RULES}
    env = {"PATH": "/bin"}
    with_open_mpi_defaults(env)
    assert env == {"PATH": "/bin", "OMPI_MCA_coll_libnbc_iallreduce_algorithm": "1", **rules}
    env = {"OMPI_MCA_coll_libnbc_iallreduce_algorithm": "0"}
    with_open_mpi_defaults(env)
    assert env == {"OMPI_MCA_coll_libnbc_iallreduce_algorithm": "0", **rules}
    forced = {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1", "OMPI_MCA_coll_tuned_allreduce_algorithm": "3"}
    env = dict(forced)
    with_open_mpi_defaults(env)
    assert env == {**forced, "OMPI_MCA_coll_libnbc_iallreduce_algorithm": "1"}  # the user's choice, no rules file
    assert os.path.isfile(OPEN_MPI_RULES)
    import inspect
    from resist_mpi.comm import mpi
    source = inspect.getsource(mpi._mpi)
    assert source.index("with_open_mpi_defaults(os.environ)") < source.index("from mpi4py import MPI")


def test_the_torch_backend_turns_a_lost_peer_into_one_line_also_when_a_group_is_made(monkeypatch):
    """A peer or the store's host gone shows as PeerLost (the trainer's one line, exit 3), whether a
    collective or the creation of a group (dup, split: every rank connects through the store) finds
    it; seen under torchrun: a survivor making its background communicators when a node was killed
    got the store's "Connection was likely closed" and printed a traceback. Other errors pass."""
    import torch.distributed as dist
    from resist_mpi.comm import torch_dist
    from resist_mpi.errors import PeerLost

    store_gone = dist.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote "
                                       "server shutdown or crash?\nException raised from recvBytes at Utils.hpp:790")

    def fails(e):
        def raise_(*args, **kwargs):
            raise e
        return raise_
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    world = torch_dist.TorchComm.__new__(torch_dist.TorchComm)
    world.nccl, world.device, world.group, world.global_ranks = False, torch.device("cpu"), None, [0, 1]
    for error in (store_gone, RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection timed out")):
        monkeypatch.setattr(dist, "new_group", fails(error))
        for make in (world._dup, lambda: world._split(0, 0, {0: [0, 1]})):
            with pytest.raises(PeerLost) as e:
                make()
            assert str(e.value).startswith("a collective failed because a peer is gone: ") and "\n" not in str(e.value)
    monkeypatch.setattr(dist, "new_group", fails(RuntimeError("invalid argument: a bug, not a lost peer")))
    with pytest.raises(RuntimeError, match="a bug") as e:
        world._dup()
    assert not isinstance(e.value, PeerLost)


@pytest.mark.parametrize("case, message", [
    ("barrier_vs_bcast", r"ranks called different collectives: rank 0 \('barrier',\), rank 1 \('bcast_object', 1\)"),
    ("bcast_sizes", r"rank 0 \('bcast', 0, 1, torch.float32\), rank 1 \('bcast', 0, 3, torch.float32\)"),
    ("unmatched_recv", r"rank 0 sends rank 1 \[2\] element\(s\), rank 1 expects \[2, 3\]"),
    ("alltoallv_counts", r"rank 1 sends rank 0 2 element\(s\), rank 0 expects 3"),
    ("allreduce_sizes", r"rank 0 \('allreduce', 'mean', 4, torch.float32\), rank 1 \('allreduce', 'mean', 1,"),
])
def test_thread_ranks_refuse_collectives_that_real_ranks_could_not_match(case, message):
    """The thread world let ranks meet in different collectives, or with sizes that do not match
    (a barrier against a broadcast, a receive nobody sends, a 1-element broadcast into 3), and
    went on: a strategy's mismatch passed the unit tier and hung under mpirun. Every rank raises."""
    from resist_mpi.comm.thread import CollectiveMismatch, run_ranks

    def body(c):
        try:
            if case == "barrier_vs_bcast":
                c.barrier() if c.rank == 0 else c.bcast_object("payload", root=1)
            elif case == "bcast_sizes":
                c.bcast_(torch.ones(1 if c.rank == 0 else 3), root=0)
            elif case == "unmatched_recv":
                sends = [[], [torch.ones(2)]] if c.rank == 0 else [[], []]
                recvs = [[], []] if c.rank == 0 else [[torch.zeros(2), torch.zeros(3)], []]
                c.alltoallv_tensors(sends, recvs)
            elif case == "alltoallv_counts":
                c.alltoallv(torch.ones(5), [2, 3], [2, 3] if c.rank == 0 else [3, 3])
            else:
                c.allreduce_mean_(torch.ones(4 if c.rank == 0 else 1))
        except CollectiveMismatch as e:
            return str(e)
        return None
    said = run_ranks(2, body, timeout=20)
    assert said[0] == said[1] and __import__("re").search(message, said[0]), said


def test_a_torch_work_seen_done_holds_the_mean_not_the_sum():
    """done() said True while the buffer held the sum: the division ran only in wait() (the mpi
    backend's work divides as soon as it sees the sum arrive)."""
    from types import SimpleNamespace

    from resist_mpi.comm.torch_dist import _TorchWork
    staged, target = torch.full((3,), 8.0), torch.zeros(3)
    work = _TorchWork(SimpleNamespace(is_completed=lambda: True, wait=lambda: True), staged, target, 4)
    assert work.done() and target.tolist() == [2.0, 2.0, 2.0]
    work.wait()
    assert target.tolist() == [2.0, 2.0, 2.0]  # divided once


def test_mpi_without_thread_multiple_runs_a_background_job_inline_its_error_out_of_wait_and_nothing_hidden():
    """Without MPI_THREAD_MULTIPLE the mpi backend runs a background job at once, on the training
    thread: its error (a non-finite compressed mean) came out of submit(), inside begin_round(),
    where no caller handles it (a traceback instead of the diverged path), and its time counted as
    hidden though training waited for all of it."""
    from types import SimpleNamespace
    from resist_mpi.comm.mpi import MPIComm
    from resist_mpi.errors import NonFiniteError
    inline = SimpleNamespace(thread_multiple=False, rank=1)

    def slow_fail():
        time.sleep(0.05)
        raise NonFiniteError("the float16 average of a round's update is not finite")
    work = MPIComm.submit(inline, slow_fail)  # returns: the error waits for wait()
    assert work.done() and work.duration == 0.0
    with pytest.raises(NonFiniteError, match="not finite"):
        work.wait()
    ran = []
    work = MPIComm.submit(inline, lambda: (time.sleep(0.05), ran.append(1)))
    work.wait()
    assert ran == [1] and work.duration == 0.0


def test_the_bytes_of_a_failed_background_average_count_in_its_own_round():
    """A background average that raised at its wait left its bytes in the background counters, and
    the next average that succeeded counted them as its own."""
    from resist_mpi.averaging.rounds import Averager
    from resist_mpi.errors import NonFiniteError

    def body(c):
        p = torch.nn.Parameter(torch.ones(1000))
        a = Averager(c, lambda: [p], wire_dtype="float16", overlap=True)
        a.mark()
        with torch.no_grad():
            p.add_(float("nan") if c.rank == 0 else 1.0)
        a.average()
        a.mark()
        sent = c.bytes_sent
        with pytest.raises(NonFiniteError):
            a.average()
        failed = c.bytes_sent - sent
        a.load_state_dict(None, None)  # the roll-back: the failed average is forgotten
        with torch.no_grad():
            p.fill_(1.0)
        counts = []
        for _ in range(2):
            sent = c.bytes_sent
            a.mark()
            a.average()
            a.flush()
            counts.append(c.bytes_sent - sent)
        return failed, counts
    for failed, (first, second) in run_ranks(2, body):
        assert failed > 0 and first == second, (failed, first, second)
