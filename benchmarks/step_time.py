"""Step time of the paper's CIFAR model on this CPU, and its factor against the published GPU step time.

    python benchmarks/step_time.py                                   # 1 and 2 threads, 1 warm-up + 3 steps
    python benchmarks/step_time.py --threads 1 --steps 2 --json benchmarks/results/step_time_cpu.json

Times one SGD step (forward, cross-entropy, backward, SGD with momentum) of pre-activation ResNet-101,
width 64, 100 classes, batch 128 of random 32x32 inputs: the model and batch of the ResIST paper's
CIFAR runs. Median of --steps steps after --warmup steps, per thread count. Also times the demo
config's model (width 8, 10 classes, batch 32) the same way, and counts both steps' FLOPs
(torch.utils.flop_counter, on the meta device).

factor = CPU step time / published GPU step time (gpu_scale.published_step_s(): 351 ms, local SGD's
wall-clock per step in the paper, communication included). The published time is an upper bound on
the GPU's compute step, so the factor is a lower bound: a CPU rank here is at least that much slower.
How this turns a link rate here into one beside GPUs: see gpu_scale.py (cluster_bench prints it).

A width-64 ResNet-101 step at batch 128 is ~1.9 TFLOP: tens of seconds on one core. Keep --steps small.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # run from a checkout: the package and gpu_scale

from resist_mpi.models import create_model  # noqa: E402
import gpu_scale  # noqa: E402

PAPER = {"model": "preact_resnet101", "width": 64, "num_classes": 100, "batch": 128}
DEMO = {"model": "preact_resnet101", "width": 8, "num_classes": 10, "batch": 32}


def _batch(spec: Dict, device=None):
    x = torch.randn(spec["batch"], 3, 32, 32, device=device)
    y = torch.randint(0, spec["num_classes"], (spec["batch"],), device=device)
    return x, y


def step_flops(spec: Dict) -> int:
    """FLOPs of one forward + backward (shapes only: built on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = create_model(spec["model"], spec["num_classes"], spec["width"])
        x, y = _batch(spec)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def step_times(spec: Dict, threads: int, steps: int = 3, warmup: int = 1, seed: int = 0) -> List[float]:
    """Seconds of each timed SGD step of spec's model on the CPU with `threads` intra-op threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = create_model(spec["model"], spec["num_classes"], spec["width"])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = _batch(spec)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def measure(threads=(1, 2), steps: int = 3, warmup: int = 1, demo_steps: int = 5) -> Dict:
    """Step times of the paper's model and the demo's, per thread count, and the factors."""
    gpu_s = gpu_scale.published_step_s()
    load_before = os.getloadavg()
    out = {"benchmark": "step_time", "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "published": {**gpu_scale.PUBLISHED, "step_s": gpu_s}, "paper_model": PAPER, "demo_model": DEMO,
           "flops": {"paper_model": step_flops(PAPER), "demo_model": step_flops(DEMO)},
           "steps": steps, "warmup": warmup, "threads": {}}
    out["published"]["implied_tflop_s"] = out["flops"]["paper_model"] / gpu_s / 1e12
    for n in threads:
        paper = step_times(PAPER, n, steps, warmup)
        demo = step_times(DEMO, n, demo_steps, warmup)
        med = statistics.median(paper)
        out["threads"][str(n)] = {
            "paper_model_s": paper, "paper_model_median_s": med, "factor_vs_published_gpu": med / gpu_s,
            "cpu_gflop_s": out["flops"]["paper_model"] / med / 1e9,
            "demo_model_s": demo, "demo_model_median_s": statistics.median(demo)}
    out["loadavg_before_after"] = [load_before, os.getloadavg()]  # the machine may be shared
    return out


def format_report(r: Dict) -> str:
    p = r["published"]
    lines = [f"step_time: {PAPER['model']} width {PAPER['width']}, {PAPER['num_classes']} classes, batch "
             f"{PAPER['batch']}, 32x32: {r['flops']['paper_model'] / 1e12:.2f} TFLOP per step (fwd+bwd); "
             f"median of {r['steps']} steps after {r['warmup']} warm-up",
             f"published GPU step (upper bound): {p['local_sgd_wallclock_s']:.0f} s / ({p['epochs']} x "
             f"{p['steps_per_epoch']}) = {1e3 * p['step_s']:.1f} ms, i.e. >= {p['implied_tflop_s']:.1f} TFLOP/s"]
    for n, t in r["threads"].items():
        lines.append(f"  {n} thread(s): {t['paper_model_median_s']:7.2f} s per step ({t['cpu_gflop_s']:.0f} GFLOP/s) "
                     f"-> CPU/GPU factor >= {t['factor_vs_published_gpu']:.0f}x | demo model (width 8, batch 32): "
                     f"{1e3 * t['demo_model_median_s']:.0f} ms per step")
    lines.append(f"load average before/after: {r['loadavg_before_after'][0][0]:.1f} / {r['loadavg_before_after'][1][0]:.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="intra-op thread counts to time (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of the paper model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    p.add_argument("--demo-steps", type=int, default=5, help="timed steps of the demo model (default: %(default)s)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    r = measure([int(t) for t in a.threads.split(",") if t.strip()], a.steps, a.warmup, a.demo_steps)
    r["argv"] = sys.argv
    print(format_report(r), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
