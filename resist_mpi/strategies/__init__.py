"""Training strategies: resist, local_sgd, data_parallel, and a warm-up composed of two of them."""
from .base import POLICIES, Strategy
from .data_parallel import DataParallel
from .local_sgd import LocalSGD
from .resist import ResIST
from .warmup import Warmup

STRATEGIES = {cls.name: cls for cls in (ResIST, LocalSGD, DataParallel)}

__all__ = ["Strategy", "ResIST", "LocalSGD", "DataParallel", "Warmup", "STRATEGIES", "POLICIES"]
