"""ResIST in the shape of a Horovod script: one optimizer and one LR scheduler built before the loop,
the plain batch loop, nothing per round (embedded digits, no download).

    mpirun -np 2 python examples/horovod_style.py
    torchrun --nproc-per-node 2 examples/horovod_style.py

Against the same script for Horovod, three lines differ (marked "Horovod:"): init, the strategy
in place of DistributedOptimizer (it counts the optimizer's steps: every LOCAL_STEPS-th step ends a
round, the shared layers are averaged and the next round's blocks arrive), and full_model() for
evaluation (each rank holds only its own blocks while training). Local SGD, DiLoCo and
data-parallel SGD are the same script with another strategy line.
"""

import torch
import torch.nn.functional as F
import torchvision

import resist_mpi as rm
from resist_mpi.data import ShardLoader, load_dataset

EPOCHS, LOCAL_STEPS = 4, 8


def main():
    c = rm.init()                                        # Horovod: hvd.init() (the backend from the launcher)
    train, test, info = load_dataset("digits")           # embedded: nothing to download
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=info.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)  # yours, built once
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[60, 80], gamma=0.1)
    job = rm.ResIST(model, c, optimizer=opt, scheduler=sched, local_steps=LOCAL_STEPS, stages=(2, 3, 4))
    #     Horovod: opt = hvd.DistributedOptimizer(opt, ...); or rm.LocalSGD(...) / rm.DataParallel(...)
    loader = ShardLoader(train, c.rank, c.size, batch_size=32, seed=0)  # each rank its own shard
    with job:                                            # round 0 begins; leaving ends the last round
        for epoch in range(EPOCHS):
            for x, y in loader.epoch(epoch):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()                               # every LOCAL_STEPS-th step: average, next blocks
                sched.step()
    with job.full_model() as full:                       # Horovod: the model is whole on every rank
        with rm.recalibrate_bn(full, c, loader.epoch(0), num_batches=4):  # BN statistics of the full model
            loss, acc = rm.evaluate(full, c, ShardLoader(test, c.rank, c.size, 256, train=False).epoch(0))
    state = job.state_dict()                             # collective; job.load_state_dict(state) resumes
    if c.rank == 0:
        print(f"{job.name}: test accuracy {100 * acc:.2f}% (test loss {loss:.4f}) after {job.round} rounds, "
              f"{len(state['model'])} tensors saved", flush=True)


if __name__ == "__main__":
    main()
