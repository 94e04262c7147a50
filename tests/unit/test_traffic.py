"""Unit tests for resist_mpi.traffic: byte counts checked against numbers worked out by hand.

The expected element counts come from the layer shapes written out below (BN: weight, bias,
running mean, running var; convs without bias; a 1x1 shortcut conv when shape changes), not from
the package's own counting, and every byte total is derived from them in the test.
"""
import json
from pathlib import Path

import pytest

from helpers import requires
from resist_mpi.tools import traffic as T

F32 = 4


# -- sizes by hand ---------------------------------------------------------------------------------------
def bn(c):
    return 2 * c, 2 * c  # (parameters, float buffers)


def conv(i, o, k):
    return i * o * k * k


def basic_block(i, o, stride):
    """(params, buffers) of a pre-activation basic block i -> o channels."""
    p = bn(i)[0] + conv(i, o, 3) + bn(o)[0] + conv(o, o, 3)
    if stride != 1 or i != o:
        p += conv(i, o, 1)
    return p, bn(i)[1] + bn(o)[1]


def resnet(stages, width, classes):
    """(params, buffers, [params+buffers of every partitionable stage-3 block]) of a CIFAR basic ResNet."""
    params, buffers, part = conv(3, width, 3), 0, []
    cin = width
    for s, n in enumerate(stages):
        cout = width * 2 ** s
        for j in range(n):
            p, b = basic_block(cin, cout, 2 if (j == 0 and s > 0) else 1)
            params, buffers = params + p, buffers + b
            if s == 2 and j > 0:
                part.append(p + b)
            cin = cout
    p, b = bn(cin)
    params, buffers = params + p + cin * classes + classes, buffers + b
    return params, buffers, part


def test_hand_model_matches_worked_example():
    # preact_resnet18, width 2, 3 classes, worked out on paper:
    # stem 54; stage1 2x80; stage2 236+304; stage3 920+1184; stage4 3632+4672; bn 32; linear 51
    params, buffers, part = resnet([2, 2, 2, 2], 2, 3)
    assert params == 54 + 160 + 540 + 2104 + 8304 + 32 + 51 == 11245
    assert buffers == 16 + 28 + 56 + 112 + 32 == 244
    assert part == [1184 + 32]


@pytest.mark.parametrize("name, stages, width, classes", [
    ("preact_resnet18", [2, 2, 2, 2], 2, 3),
    ("preact_resnet34", [3, 4, 6, 3], 2, 5),
    ("preact_resnet101", [3, 4, 23, 3], 64, 100),
])
def test_model_sizes(name, stages, width, classes):
    params, buffers, part = resnet(stages, width, classes)
    sizes = T.build_sizes(name, classes, width)
    assert sizes.params == params and sizes.buffers == buffers
    assert list(sizes.blocks) == part
    assert list(sizes.block_params) == [n - 2 * bn(width * 4)[1] for n in part]  # two BNs of width*4 channels
    assert sizes.shared_params == params - sum(sizes.block_params)
    assert sizes.shared == params + buffers - sum(part)
    if name == "preact_resnet101":
        assert params == 41_397_924  # "about 41.4 M parameters with 100 classes"


def test_resnet18_two_ranks_full_overlap():
    # One partitionable block, S=2, min depth 1: both ranks train it every round. From round 1 on each
    # rank sends its trained copy to the other (averaged on arrival); round 0 only rank 0 has it.
    S, l = 2, 3
    params, buffers = 11245, 244
    block = 1216
    shared = params + buffers - block  # 10273
    sizes = T.build_sizes("preact_resnet18", 3, 2)
    report = T.traffic(sizes, S, min_depth=1, local_steps=l, rounds=4)
    # paper (parameters only): each of 2 workers uploads and downloads shared + the block
    assert report["resist"]["paper_bytes"] == 2 * 2 * F32 * params == 179920  # shared + the block: every parameter
    # wire: exchange 2 x 1216 floats; ring allreduce with S=2 sends n and receives n per rank
    exchange = 2 * block * F32
    shared_ar = S * 2 * (shared * F32)
    assert report["resist"]["exchange_sent"] == exchange == 9728
    assert report["resist"]["shared_allreduce"] == shared_ar
    assert report["resist"]["wire_bytes"] == 2 * exchange + shared_ar == 183824
    assert report["resist"]["wire_sent"] == exchange + shared_ar // 2
    # local SGD: full model (params + buffers)
    assert report["local_sgd"]["paper_bytes"] == 2 * S * F32 * params == 179920
    assert report["local_sgd"]["wire_bytes"] == S * 2 * F32 * (params + buffers)
    # data parallel: l gradient allreduces (params only) + one BN buffer allreduce
    assert report["data_parallel"]["paper_bytes"] == 2 * S * F32 * params * l == 539760
    assert report["data_parallel"]["wire_bytes"] == l * S * 2 * F32 * params + S * 2 * F32 * buffers == 543664
    # round 0 (excluded from the mean above) moves one copy only: rank 0 -> rank 1
    rounds = T.resist_wire_rounds(sizes, S, [((0,), (0,)), ((0,), (0,))])
    assert [r["exchange_sent"] for r in rounds] == [block * F32, 2 * block * F32]


def test_resnet34_four_ranks_no_overlap():
    S = 4
    params, buffers, part = resnet([3, 4, 6, 3], 2, 5)
    assert part == [1216] * 5
    shared = params + buffers - 5 * 1216
    sizes = T.build_sizes("preact_resnet34", 5, 2)
    report = T.traffic(sizes, S, min_depth=0, local_steps=2, rounds=10, seed=7)
    # without overlap every block is uploaded once and downloaded once, whatever the draw; the
    # paper counts parameters only (a block: 1184 parameters + 32 BN buffer elements)
    assert report["resist"]["paper_bytes"] == F32 * (2 * S * (params - 5 * 1184) + 2 * 5 * 1184)
    assert report["local_sgd"]["paper_bytes"] == 2 * S * F32 * params
    ring = 2 * (S - 1) * (shared * F32) // S  # per rank, each direction
    assert report["resist"]["shared_allreduce"] == 2 * S * ring
    assert report["local_sgd"]["wire_bytes"] == 2 * S * (2 * (S - 1) * F32 * (params + buffers) // S)
    l = 2
    assert report["data_parallel"]["wire_bytes"] == l * 2 * S * (6 * F32 * params // 4) + 2 * S * (6 * F32 * buffers // 4)


def test_wire_rounds_for_given_assignments():
    S, blk = 4, 1216 * F32
    sizes = T.build_sizes("preact_resnet34", 5, 2)
    a0 = ((0, 1), (2,), (3,), (4,))
    a1 = ((0,), (1, 2), (3,), (4,))
    a2 = ((3, 4), (0,), (1,), (2,))
    rounds = T.resist_wire_rounds(sizes, S, [a0, a1, a2])
    # round 0: rank 0 holds all; blocks 2, 3, 4 leave it. round 1: block 1 goes 0 -> 1.
    # round 2: every block changes owner: 5 blocks move.
    assert [r["exchange_sent"] for r in rounds] == [3 * blk, 1 * blk, 5 * blk]
    for r in rounds:
        assert r["sent"] == r["recv"] == r["exchange_sent"] + r["shared_allreduce"] // 2
        assert r["total"] == 2 * r["sent"]


def test_wire_rounds_with_overlap_average_where_needed():
    S, blk = 2, 1216 * F32
    sizes = T.build_sizes("preact_resnet34", 5, 2)
    a0 = ((0, 1, 2), (2, 3, 4))
    a1 = ((0, 2), (1, 3, 4))
    a2 = ((0, 2), (1, 3, 4))
    holders = [(0,), (0,), (0, 1), (1,), (1,)]  # as after round a0's exchange
    rounds = T.resist_wire_rounds(sizes, S, [a1, a2], holders=holders)
    # block 2 is held by both but its copies are identical (no training yet): rank 1's copy is
    # dropped, nothing moves for it; block 1 goes 0 -> 1.
    assert rounds[0]["exchange_sent"] == 1 * blk
    # after a1 no block is shared: a2 == a1 moves nothing
    assert rounds[1]["exchange_sent"] == 0
    # from the fresh start (rank 0 holds all): a0 then a1. a0: blocks 2, 3, 4 go to rank 1.
    # a1: block 2 was trained by both (divergent): rank 1 sends its copy to rank 0, block 1 goes 0 -> 1.
    rounds = T.resist_wire_rounds(sizes, S, [a0, a1])
    assert [r["exchange_sent"] for r in rounds] == [3 * blk, 2 * blk]


def test_cli_json_and_table(capsys):
    assert T.main(["--model", "preact_resnet18", "--num-classes", "3", "--width", "2", "--world-size", "2",
                   "--min-depth", "1", "--local-steps", "3", "--rounds", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resist"]["wire_bytes"] == 183824
    assert report["data_parallel"]["paper_bytes"] == 539760
    assert report["ratios"]["local_sgd_over_resist"]["paper_bytes"] == 1.0
    assert T.main(["--model", "preact_resnet18", "--num-classes", "3", "--width", "2", "--world-size", "2",
                   "--min-depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "resist" in out and "local_sgd" in out and "data_parallel" in out


def test_cli_impossible_partition_is_one_line(capsys):
    assert T.main(["--model", "preact_resnet18", "--num-classes", "3", "--width", "2", "--world-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resist_mpi.traffic: error:") and "\n" not in err



@pytest.mark.parametrize("flag, value", [("--group-size", "0"), ("--local-steps", "-3"), ("--ranks-per-node", "-1"),
                                         ("--ranks-per-node", "0"), ("--group-size", "-2"), ("--seed", "-1")])
def test_cli_numbers_out_of_range_are_one_line_naming_the_flag(capsys, flag, value):
    """--group-size 0 ended in a ZeroDivisionError traceback; --local-steps -3 printed negative
    megabytes; --ranks-per-node -1 "-2 node(s)", 0 one node; others named no flag."""
    with pytest.raises(SystemExit) as e:
        T.main(["--model", "preact_resnet18", "--width", "2", "--world-size", "2", flag, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.endswith(f"error: {flag} {value}: must be at least {0 if flag == '--seed' else 1}")


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
OPTIONS = ("model", "num_classes", "width", "partition_stages", "world_size", "group_size", "ranks_per_node",
           "wire_dtype", "min_depth", "local_steps", "rounds", "seed")


@requires("slow")
@pytest.mark.parametrize("name", ["traffic_resnet101_c100_S4_int8.json", "traffic_resnet101_c100_S16_G4.json"])
def test_committed_traffic_results_are_what_the_code_counts(capsys, name):
    """The committed results (one compressed wire, one grouped 16-rank world with nodes) are what
    `python -m resist_mpi.traffic` prints today, to the byte: the count comes from running the
    strategies, so a change to what a round sends shows here."""
    committed = json.loads((RESULTS / name).read_text())
    argv = [a for k in OPTIONS for a in (f"--{k.replace('_', '-')}", str(committed[k]))] + ["--json"]
    assert T.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == committed
