"""Drawing a ResIST assignment: which partitionable blocks each of the S ranks trains this round.

Pure functions, no communication: rank 0 calls draw_assignment and broadcasts the result (the other
ranks never rely on sharing its random stream).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

Assignment = Tuple[Tuple[int, ...], ...]  # assignment[rank] = sorted block ids 0..P-1


class PartitionError(ValueError):
    """An impossible partition request (one-line message)."""


def check_partition(num_blocks: int, world_size: int, min_depth: int = 0) -> None:
    """Raise PartitionError unless num_blocks can be split among world_size ranks with min_depth."""
    if world_size < 1:
        raise PartitionError(f"world size must be at least 1, got {world_size}")
    if num_blocks < 1:
        raise PartitionError("the model has no partitionable blocks (choose a deeper model or other partition stages)")
    if min_depth < 0:
        raise PartitionError(f"--min-depth must be >= 0, got {min_depth}")
    if min_depth > num_blocks:
        raise PartitionError(f"--min-depth {min_depth} exceeds the {num_blocks} partitionable blocks of the model")
    if world_size > num_blocks and min_depth == 0:
        raise PartitionError(f"{world_size} ranks but only {num_blocks} partitionable blocks: some ranks would train "
                             f"no block; use fewer ranks, a deeper model, or --min-depth >= 1 to allow overlap")


def draw_assignment(num_blocks: int, world_size: int, min_depth: int = 0,
                    rng: np.random.Generator = None) -> Assignment:
    """Randomly deal num_blocks blocks to world_size ranks.

    A random permutation is dealt round-robin, so sizes differ by at most one and every block goes
    to exactly one rank. With a minimum depth m, ranks left with fewer than m blocks are topped up
    from further permutations (blocks they do not already hold), so blocks are shared by several
    ranks only when world_size * m > num_blocks, i.e. only when needed.

    Args:
        num_blocks: P, the number of partitionable blocks (ids 0..P-1).
        world_size: S, the number of ranks.
        min_depth: m, the minimum number of blocks per rank (0: no minimum).
        rng: numpy Generator (rank 0's); a fresh unseeded one when None.
    Returns:
        A tuple of S sorted tuples of block ids.
    """
    check_partition(num_blocks, world_size, min_depth)
    rng = np.random.default_rng() if rng is None else rng
    perm = rng.permutation(num_blocks)
    owned: List[List[int]] = [list(perm[k::world_size]) for k in range(world_size)]
    if min_depth and min(len(o) for o in owned) < min_depth:
        # Top up round-robin from a stream of fresh permutations, so extra copies spread evenly
        # over blocks; a rank skips blocks it already holds.
        stream: List[int] = []
        for k in range(world_size):
            while len(owned[k]) < min_depth:
                if not stream:
                    stream = list(rng.permutation(num_blocks))
                pick = next((b for b in stream if b not in owned[k]), None)
                if pick is None:  # everything left in the stream is already held: refill
                    stream = list(rng.permutation(num_blocks))
                    continue
                stream.remove(pick)
                owned[k].append(pick)
    return tuple(tuple(sorted(int(b) for b in o)) for o in owned)


def round_rng(seed: int, round_index: int) -> np.random.Generator:
    """The generator rank 0 draws round round_index's assignment from (reproducible, resumable).
    Any integer seed (numpy takes non-negative ones: a negative seed crashed rank 0 alone, in the
    first round, while the others waited for its broadcast), as the data's generators take it."""
    return np.random.default_rng([int(seed) % 2**64, int(round_index)])


def eval_residual_scale(num_blocks: int, world_size: int, min_depth: int = 0) -> float:
    """Residual scale of partitioned blocks at test time: 1/S, or max(1/S, m/P) with a min depth.

    Each block's branch was trained inside a sub-ResNet holding about 1/S of the blocks; running
    them all at once would add S times the expected residual mass, so each branch is scaled down.
    """
    scale = 1.0 / world_size
    if min_depth:
        scale = max(scale, min_depth / num_blocks)
    return min(scale, 1.0)
