"""ResIST on a torchvision ResNet-18, inside your own training loop (embedded digits, no download).

    mpirun -np 2 python examples/resnet18_digits.py

The loop is plain PyTorch; resist_mpi only says which blocks this rank trains each round and moves
them between rounds. Local SGD instead is one line: `job = rm.LocalSGD(model, c)`.
"""
import itertools

import torch
import torch.nn.functional as F
import torchvision

import resist_mpi as rm
from resist_mpi.data import ShardLoader, load_dataset

ROUNDS, LOCAL_STEPS = 24, 8


def batches(loader):
    """This rank's batches, epoch after epoch."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def main():
    c = rm.init()  # the backend from the launcher (mpirun, srun, horovodrun, torchrun)
    train, test, info = load_dataset("digits")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=info.num_classes)
    job = rm.ResIST(model, c, stages=(2, 3, 4))  # the non-downsampling blocks of layer2..layer4
    stream = batches(ShardLoader(train, c.rank, c.size, batch_size=32, seed=0))
    for r in job.rounds(ROUNDS):  # this rank's blocks arrive; at the end of the body: the averages
        opt = torch.optim.SGD(job.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for x, y in itertools.islice(stream, LOCAL_STEPS):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    with job.full_model() as full:  # every block, the evaluation scale applied
        rm.recalibrate_bn(full, c, stream, num_batches=20)
        loss, acc = rm.evaluate(full, c, ShardLoader(test, c.rank, c.size, 256, train=False).epoch(0))
    if c.rank == 0:
        print(f"{job.name}: test accuracy {100 * acc:.2f}% (test loss {loss:.4f}) after {ROUNDS} rounds", flush=True)


if __name__ == "__main__":
    main()
