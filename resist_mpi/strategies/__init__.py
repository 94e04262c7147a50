"""Training strategies: resist, local_sgd, data_parallel, and a warm-up composed of two of them."""
from .base import Strategy
from .data_parallel import DataParallel
from .local_sgd import LocalSGD
from .resist import ResIST
from .warmup import Warmup

STRATEGIES = {cls.name: cls for cls in (ResIST, LocalSGD, DataParallel)}


def create_strategy(cfg, model, comm, steps_per_epoch: int, **kw) -> Strategy:
    """The strategy a Config asks for, on model (kw: device, optimizer, ...).

    With --warmup-epochs K: local SGD for the rounds of the first K epochs, then cfg.strategy
    taking over the synchronised model.
    """
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    main = STRATEGIES[cfg.strategy]
    if not cfg.warmup_epochs:
        return main.from_config(model, comm, cfg, **kw)
    switch_round = -(-cfg.warmup_epochs * steps_per_epoch // cfg.local_steps)  # first round at or after K epochs
    return Warmup(LocalSGD.from_config(model, comm, cfg, **kw),
                  lambda: main.from_config(model, comm, cfg, synchronized=True, **kw), switch_round)


__all__ = ["Strategy", "ResIST", "LocalSGD", "DataParallel", "Warmup", "STRATEGIES", "create_strategy"]
