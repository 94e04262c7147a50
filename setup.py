"""resist_mpi: ResIST (ResNet Independent Subnetwork Training) over MPI and Horovod."""
from setuptools import find_packages, setup

setup(
    name="resist_mpi",
    version="0.1.0",
    description="Distributed ResIST training of deep pre-activation ResNets over MPI / Horovod",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["resist_mpi", "resist_mpi.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "mpi4py>=3.1",
        "numpy",
        "h5py",
        "scikit-learn",  # ships the embedded default dataset (8x8 digits)
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "horovod": ["horovod==0.28.1"],  # build it with `make horovod` (see README)
    },
    entry_points={"console_scripts": [
        "resist-train=resist_mpi.train:main",
        "resist-traffic=resist_mpi.traffic:main",
    ]},
)
