"""Data: the datasets (`datasets`: digits, synthetic, CIFAR, ImageFolder, HDF5), the per-rank
shard loader (`loader`) and `python -m resist_mpi.data pack` (`packing`: any dataset into one HDF5 file)."""
from .datasets import DATASETS, DataError, DataInfo, ImageDataset, check_compatible, load_dataset
from .loader import ShardLoader
from .packing import pack

__all__ = ["DATASETS", "DataError", "DataInfo", "ImageDataset", "check_compatible", "load_dataset", "ShardLoader",
           "pack"]
