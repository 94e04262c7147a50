"""What a ResIST sub-network costs per step against the full model, and where the difference goes.

    python benchmarks/step_cost.py                    # ResNet-101, widths 8,16,32,64, batch 32, S=4
    python benchmarks/step_cost.py --widths 8 --batch 128 --reps 30

One process, one thread, interleaved repetitions (so a slow phase of the machine hits every
variant alike), median time of an SGD step (zero_grad, forward, backward, step) of:

  full     the whole model (what local SGD trains)
  resist   the same model wrapped by ResIST, this rank's sub-network active (ceil(P/S) blocks, every
           other block switched off: skipped by its patched forward, released, no gradient)
  lean     the sub-network built without the other blocks at all (what a switched-off block would
           cost if it cost nothing)
  shared   the model with no partitionable block at all (the shared layers alone)

resist / lean shows what switched-off blocks cost; (shared + ceil(P/S) x block) / (shared + P x block),
with block = (full - shared) / P, is the ratio the model's own layout allows; resist / full is what
ResIST's compute per round is against local SGD's. Writes --json when given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def variants(width: int, ranks: int, seed: int = 0):
    import resist_mpi as rm
    from resist_mpi.blocks.switch import activate
    from resist_mpi.models import create_model
    torch.manual_seed(seed)
    full = create_model("preact_resnet101", 10, width)
    model = create_model("preact_resnet101", 10, width)
    job = rm.ResIST(model, rm.init("self", fail_fast=False), seed=seed)
    P = len(job.blocks)
    mine = list(range(0, P, ranks))  # rank 0's share: ceil(P/S) blocks, the most any rank trains
    activate(job.blocks, mine)
    for b in range(P):
        if b not in mine:
            job.store.release(b)
    lean = create_model("preact_resnet101", 10, width)
    lean.stages[2] = torch.nn.Sequential(*[lean.stages[2][i] for i in [0] + [b + 1 for b in mine]])
    shared = create_model("preact_resnet101", 10, width)
    shared.stages[2] = torch.nn.Sequential(shared.stages[2][0])
    return {"full": full, "resist": model, "lean": lean, "shared": shared}, P, len(mine)


def measure(width: int, batch: int, ranks: int, reps: int) -> dict:
    models, P, mine = variants(width, ranks)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for k, m in models.items()}

    def step(k):
        opt, m = opts[k], models[k]
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for k in models:  # warm-up
        step(k)
        step(k)
    times = {k: [] for k in models}
    for _ in range(reps):
        for k in models:
            times[k].append(step(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    block = (med["full"] - med["shared"]) / P
    layout = (med["shared"] + mine * block) / (med["shared"] + P * block)
    return {"width": width, "batch": batch, "ranks": ranks, "blocks": P, "blocks_per_rank": mine, "step_s": med,
            "resist_over_full": med["resist"] / med["full"], "lean_over_full": med["lean"] / med["full"],
            "resist_over_lean": med["resist"] / med["lean"], "block_s": block, "shared_s": med["shared"],
            "layout_ratio": layout, "block_count_ratio": (33 - P + mine) / 33}


def machine() -> dict:
    """The CPU the steps ran on: the ratios depend on it (how fast small convolutions run against large ones)."""
    info = {"cpu": "unknown", "avx512": False, "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and info["cpu"] == "unknown":
                    info["cpu"] = value.strip()
                elif key.strip() == "flags":
                    info["avx512"] = "avx512f" in value.split()
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="8,16,32,64")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ranks", type=int, default=4, help="S: the sub-network holds P/S blocks")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, cpu = [], machine()
    print(f"step_cost: {cpu['cpu']} (AVX-512: {'yes' if cpu['avx512'] else 'no'}), torch {cpu['torch']}, one thread")
    print(f"{'width':>5} | {'full':>8} | {'resist':>8} | {'lean':>8} | {'shared':>8} | resist/full | lean/full | "
          f"resist/lean | layout | block count")
    for w in [int(v) for v in args.widths.split(",")]:
        r = measure(w, args.batch, args.ranks, args.reps)
        rows.append(r)
        t = r["step_s"]
        print(f"{w:5d} | {1e3 * t['full']:6.1f}ms | {1e3 * t['resist']:6.1f}ms | {1e3 * t['lean']:6.1f}ms | "
              f"{1e3 * t['shared']:6.1f}ms | {r['resist_over_full']:11.3f} | {r['lean_over_full']:9.3f} | "
              f"{r['resist_over_lean']:11.3f} | {r['layout_ratio']:6.3f} | {r['block_count_ratio']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "step_cost", "argv": sys.argv, "machine": cpu, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
