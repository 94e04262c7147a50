"""resist_mpi: ResIST (ResNet Independent Subnetwork Training) over MPI, Horovod and torch.distributed.

Dun, Wolfe, Jermaine, Kyrillidis, "ResIST: Layer-Wise Decomposition of ResNets for Distributed
Training", UAI 2022 (arXiv 2107.00961).

    import resist_mpi as rm
    c = rm.init()                                    # the backend from the launcher
    job = rm.ResIST(model, c, blocks="auto")         # or rm.LocalSGD(model, c), rm.DataParallel(model, c)
    for r in job.rounds(num_rounds):
        opt = torch.optim.SGD(job.parameters(), lr=0.1, momentum=0.9)
        ...                                          # the user's own local steps
    with job.full_model() as full:
        evaluate(full)
"""
from .blocks import BlockError, find_blocks, register_block
from .comm import Comm, init
from .evaluation import evaluate, recalibrate_bn
from .models import create_model, list_models
from .strategies import DataParallel, LocalSGD, ResIST, Strategy, Warmup

__version__ = "0.2.0"

__all__ = ["init", "Comm", "ResIST", "LocalSGD", "DataParallel", "Warmup", "Strategy", "find_blocks",
           "register_block", "BlockError", "create_model", "list_models", "evaluate", "recalibrate_bn"]
