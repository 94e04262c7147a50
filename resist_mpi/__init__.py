"""resist_mpi: ResIST (ResNet Independent Subnetwork Training) over MPI and Horovod.

Dun, Wolfe, Jermaine, Kyrillidis, "ResIST: Layer-Wise Decomposition of ResNets for Distributed
Training", UAI 2022 (arXiv 2107.00961).
"""
__version__ = "0.1.0"
