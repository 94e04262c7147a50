"""Training strategies, by --strategy name: resist, local_sgd, data_parallel."""
from .base import Strategy, allreduce_tensors_, bcast_tensors_
from .data_parallel import DataParallel
from .local_sgd import LocalSGD
from .resist import ResIST

STRATEGIES = {cls.name: cls for cls in (ResIST, LocalSGD, DataParallel)}


def create_strategy(name, comm, cfg, device) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](comm, cfg, device)


__all__ = ["Strategy", "ResIST", "LocalSGD", "DataParallel", "STRATEGIES", "create_strategy",
           "allreduce_tensors_", "bcast_tensors_"]
