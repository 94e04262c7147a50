"""Who launched us: rank, size and local rank from the launcher's environment, and device choice.

Pure functions of an environment mapping, so they are unit-tested without any launcher. The MPI
backend cross-checks them against MPI itself; the Horovod backend uses Horovod's own answers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str  # "horovodrun", "torchrun", "openmpi", "pmi", "pmix", "slurm" or "none"


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return None


def _slurm_local_size(env: Mapping[str, str], size: int) -> int:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3": the first entry is this node's count only on the
    # first node, so prefer SLURM_NTASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE when uniform.
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name)
        if value:
            first = value.split(",")[0].split("(")[0]
            if first.isdigit():
                return int(first)
    return size


def world_info_from_env(env: Optional[Mapping[str, str]] = None) -> WorldInfo:
    """Rank, world size and local rank as the launcher announced them.

    Checked in order: horovodrun's Gloo controller (HOROVOD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE),
    torchrun (TORCHELASTIC_RUN_ID with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE),
    Open MPI's mpirun (OMPI_COMM_WORLD_*; also what horovodrun's MPI controller provides),
    PMIx (PMIX_RANK), MPICH/Intel MPI hydra (PMI_RANK/PMI_SIZE, MPI_LOCALRANKID), SLURM srun
    (SLURM_PROCID/SLURM_NTASKS inside a job step only: a batch script run by plain python is one
    process even though SLURM_NTASKS says more). Anything else is a world of one.
    """
    env = os.environ if env is None else env
    if _int(env, "HOROVOD_RANK") is not None and _int(env, "HOROVOD_SIZE") is not None:
        rank, size = _int(env, "HOROVOD_RANK"), _int(env, "HOROVOD_SIZE")
        local_rank = _int(env, "HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
        local_size = _int(env, "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
        return WorldInfo(rank, size, local_rank if local_rank is not None else rank,
                         local_size if local_size is not None else size, "horovodrun")
    if env.get("TORCHELASTIC_RUN_ID") and _int(env, "RANK") is not None and _int(env, "WORLD_SIZE") is not None:
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank, local_size = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
        return WorldInfo(rank, size, rank if local_rank is None else local_rank,
                         size if local_size is None else local_size, "torchrun")
    if _int(env, "OMPI_COMM_WORLD_RANK") is not None:
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE") or 1
        launcher = "horovodrun" if launched_by_horovodrun(env) else "openmpi"
        return WorldInfo(rank, size, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0,
                         _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or size, launcher)
    if _int(env, "PMI_RANK") is not None and _int(env, "PMI_SIZE") is not None:
        rank, size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_rank = _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
        local_size = _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
        return WorldInfo(rank, size, rank if local_rank is None else local_rank,
                         size if local_size is None else local_size, "pmi")
    if _int(env, "PMIX_RANK") is not None:
        rank = _int(env, "PMIX_RANK")
        size = _int(env, "PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or rank + 1
        local_rank = _int(env, "PMIX_LOCAL_RANK", "SLURM_LOCALID")
        local_size = _int(env, "PMIX_LOCAL_SIZE")
        return WorldInfo(rank, size, rank if local_rank is None else local_rank,
                         size if local_size is None else local_size, "pmix")
    if _int(env, "SLURM_STEP_ID") is not None and _int(env, "SLURM_PROCID") is not None:
        size = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1
        if size > 1:
            return WorldInfo(_int(env, "SLURM_PROCID"), size, _int(env, "SLURM_LOCALID") or 0,
                             _slurm_local_size(env, size), "slurm")
    return WorldInfo(0, 1, 0, 1, "none")


# horovodrun's MPI controller sets no HOROVOD_* variable at all (checked with Horovod 0.28.1); it
# runs `mpirun --tag-output -mca pml ob1 -mca btl ^openib ...` with Open MPI, which ranks see as:
_HOROVODRUN_OMPI_MCA = {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "^openib", "OMPI_MCA_orte_tag_output": "1"}


def launched_by_horovodrun(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when horovodrun started this process (either controller).

    Gloo controller: HOROVOD_RANK, HOROVOD_HOSTNAME, HOROVOD_CONTROLLER=gloo, ... are set.
    MPI controller (Open MPI): only the MCA settings horovodrun always passes to mpirun tell. Under
    MPICH/Intel MPI the MPI controller is not recognised: ask for the backend by name there.
    """
    env = os.environ if env is None else env
    if any(k in env for k in ("HOROVOD_RANK", "HOROVOD_HOSTNAME", "HOROVOD_CONTROLLER")):
        return True
    return "OMPI_COMM_WORLD_RANK" in env and all(env.get(k) == v for k, v in _HOROVODRUN_OMPI_MCA.items())


def select_device(local_rank: int, requested: str = "auto", cuda_count: Optional[int] = None) -> str:
    """The torch device string for this rank.

    Args:
        local_rank: rank on this node; with several GPUs per node, rank i uses GPU i mod count.
        requested: "auto" (GPU when CUDA is available, else CPU), "cpu", "cuda" (one GPU per
            local rank) or an explicit "cuda:N" (every rank on that GPU).
        cuda_count: number of visible GPUs; queried from torch when None.
    """
    if requested == "cpu":
        return "cpu"
    if cuda_count is None:
        import torch
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        if index >= cuda_count:
            raise ValueError(f"device {requested} requested but only {cuda_count} GPU(s) are visible")
        return requested
    if requested == "cuda" and cuda_count == 0:
        raise ValueError("device cuda requested but no GPU is visible (use --device cpu)")
    if requested not in ("auto", "cuda"):
        raise ValueError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N")
    if cuda_count == 0:
        return "cpu"
    return f"cuda:{local_rank % cuda_count}"
