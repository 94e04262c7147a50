"""How a link rate on this CPU machine maps to a link rate beside GPUs (pure arithmetic, no I/O).

What decides how much a strategy gains from sending fewer bytes is the ratio of its communication
time to its compute time per round, not the link rate by itself:

    comm / compute = (B / R) / (l * t)

with B the bytes one node sends per round (its link carries them at rate R; links are full duplex
and a bandwidth-optimal allreduce receives as much as it sends), l the SGD steps per round and t
the compute time of one step. Two settings are equivalent when this ratio is equal, so the rate
R_gpu beside GPUs that gives local SGD the communication fraction it had at rate R here is

    R_gpu = R * (B_gpu / l_gpu) / (B_here / l_here) * t_here / t_gpu

  B_gpu / B_here   local SGD averages the whole model every round (ring allreduce: each node sends
                   2 (S-1)/S of it), so for the same S the bytes scale with the model's element
                   count (parameters + BN buffers): ResNet-101 width 64 has ~64x the demo's width 8
                   (conv weights grow with width^2).
  l_here, l_gpu    steps per round: 10 in the demo config, 50 in the paper's runs.
  t_here           the demo's step time *measured in the run* (median t_compute per round / l of
                   local SGD): 4 ranks sharing 2 cores, width 8, batch 32.
  t_gpu            the published step time of ResNet-101 width 64, batch 128 (below).

Why not scale by FLOPs: FLOPs per sample also grow with width^2, so bytes per FLOP are about the
same at width 8 and 64, and with the batch (32 vs 128) the demo's step has ~255x fewer FLOPs
(7.4 GFLOP vs 1.88 TFLOP forward+backward). But a thin network runs far below the CPU's peak, so its
step takes much more than 1/255 of the wide one's: only measured step times say what the ratio is.

The published anchor (ResIST paper, 4 workers, CIFAR-10, /work/shared/RESIST.md): local SGD took
5486 s of wall-clock. The authors' released script (github.com/dunchen/ResIST_release,
cifar100_local_iteration_test.py) runs 40 epochs in which every one of the 4 workers passes over
all 50,000 training images at batch 128 (391 steps an epoch): 15,640 steps per worker, 160 passes
over the data in all (the paper's "160 epochs"). One step therefore took 5486 / (40 * 391) = 351 ms
*including* local SGD's communication: an upper bound on the GPU's compute step time, so every
factor derived from it (CPU/GPU step-time factor, R_gpu) is a lower bound: the GPUs were at least
that fast, a rate here stands for at least that rate there. (1.88 TFLOP in 351 ms is 5.4 TFLOP/s,
about a third of a V100's fp32 peak: a believable rate for ResNet-101 on 32x32 images.)
"""
from __future__ import annotations

from typing import Dict, Optional

PUBLISHED = {
    "source": "ResIST paper (Dun et al., UAI 2022), wall-clock table: 4 workers, CIFAR-10 (/work/shared/RESIST.md); "
              "steps from the authors' released script (40 epochs, every worker a full pass at batch 128)",
    "model": "preact_resnet101", "width": 64, "batch": 128,
    "local_sgd_wallclock_s": 5486.0, "resist_wallclock_s": 1532.0,
    "epochs": 40, "steps_per_epoch": 391,  # ceil(50,000 / 128): every worker passes over all images
    "local_steps": 50,  # the paper's l
}


def published_step_s(anchor: Dict = PUBLISHED) -> float:
    """Local SGD's wall-clock per step in the published run (0.351 s): compute + its communication,
    an upper bound on the GPU's compute time per step."""
    return anchor["local_sgd_wallclock_s"] / (anchor["epochs"] * anchor["steps_per_epoch"])


def equivalent_rate(rate_bits: float, *, here_elements: int, here_local_steps: int, here_step_s: float,
                    gpu_elements: int, gpu_local_steps: int = PUBLISHED["local_steps"],
                    gpu_step_s: Optional[float] = None) -> float:
    """The link rate (bit/s) beside GPUs at which local SGD has the comm/compute ratio it had here at
    rate_bits (module docstring). A lower bound when gpu_step_s is the published upper bound.

    Args:
        rate_bits: the link rate here.
        here_elements, gpu_elements: elements local SGD averages per round (model params + BN buffers).
        here_local_steps, gpu_local_steps: SGD steps per round.
        here_step_s: measured compute seconds per step here; gpu_step_s: default published_step_s().
    """
    gpu_step_s = published_step_s() if gpu_step_s is None else gpu_step_s
    bytes_per_step = (gpu_elements / gpu_local_steps) / (here_elements / here_local_steps)
    return rate_bits * bytes_per_step * here_step_s / gpu_step_s


def format_rate(bits: Optional[float]) -> str:
    """1.23e9 -> '1.23 Gbit/s'; None -> 'unshaped'."""
    if bits is None:
        return "unshaped"
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"
