"""resist_mpi: ResIST (ResNet Independent Subnetwork Training) over MPI, Horovod and torch.distributed.

Dun, Wolfe, Jermaine, Kyrillidis, "ResIST: Layer-Wise Decomposition of ResNets for Distributed
Training", UAI 2022 (arXiv 2107.00961).

    import resist_mpi as rm
    c = rm.init()                                    # the backend from the launcher, like hvd.init()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # the user's own, built once
    with rm.ResIST(model, c, optimizer=opt, local_steps=50) as job:   # or rm.LocalSGD, rm.DataParallel
        for x, y in batches:                         # the plain loop: every 50th step ends a round
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    with job.full_model() as full:                   # every block present, synchronised
        evaluate(full)
"""
from .blocks.find import find_blocks
from .blocks.kinds import BlockError, register_block
from .comm import Comm, init
from .errors import NONFINITE_EXIT, NonFiniteError, UsageError
from .evaluation import evaluate, recalibrate_bn
from .models import create_model, list_models
from .strategies import DataParallel, LocalSGD, ResIST, Strategy, Warmup

__version__ = "0.2.0"

__all__ = ["init", "Comm", "ResIST", "LocalSGD", "DataParallel", "Warmup", "Strategy", "find_blocks",
           "register_block", "BlockError", "create_model", "list_models", "evaluate", "recalibrate_bn", "NonFiniteError",
           "UsageError", "NONFINITE_EXIT"]
