"""Outer state for ResIST's blocks: an outer step on every block, its momentum travelling with the
block, against the shared layers' outer step alone (blocks averaged plainly, what is built).

`--outer-optimizer nesterov` applies DiLoCo's outer step to ResIST's shared layers, whose averager
every rank holds alike. A block is trained by one rank in a round and by another in the next, so an
outer step on it needs its momentum where it goes: a block's parameters' size more on every move.
This script measures what that would buy before it is built: the same runs, same seeds, with and
without the blocks' outer step, and the bytes their momenta would add.

    python benchmarks/block_outer.py --out runs/bench/block-outer --seeds 0,1,2 --np 4 \\
        --json runs/bench/block-outer/block_outer.json

Each run is `python -m resist_mpi.train` (the demo config unless --train-args says otherwise) on
--np ranks of this machine under mpirun, with `--outer-optimizer nesterov` (outer lr 0.7, momentum
0.9, for the blocks too). The variant "blocks" emulates the travelling state: the rank that trained
a block takes the outer step on it at the round's end, from the values the block started the round
with; every block is trained by exactly one rank in these runs (checked), so that is where the
outer step of a travelling momentum would be taken, on the same values. The momenta are summed
across ranks each round (each rank contributes its own blocks', zeros elsewhere), which leaves the
next trainer of each block with the momentum that would have travelled to it; that sum runs as
control traffic, and the bytes a travelling momentum would add are counted instead: a block's
parameters (float32) each time its trainer changes. Accuracy and time per round are what the runs
print; on one machine the time says nothing about links, the bytes say what a link would carry.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

VARIANTS = ("shared", "blocks")  # both: --outer-optimizer nesterov; "blocks" adds the blocks' step
OUTER = ["--outer-optimizer", "nesterov"]


def travelling_resist(outer_lr: float, outer_momentum: float):
    """ResIST with an outer step on each block by the rank that trained it (see the module docstring)."""
    import torch

    from resist_mpi.strategies.resist import ResIST

    class TravellingOuter(ResIST):
        instances: List["TravellingOuter"] = []

        def __init__(self, model, *args, **kw):
            shapes = {id(p): p.shape for p in model.parameters()}  # the blocks this rank does not hold lose them
            super().__init__(model, *args, **kw)
            TravellingOuter.instances.append(self)
            self._start: Dict[int, List[torch.Tensor]] = {}
            self._momentum = [[torch.zeros(shapes[id(p)], device=self.device) for p in b.parameters()]
                              for b in self.blocks]
            self._param_bytes = [4 * sum(m.numel() for m in ms) for ms in self._momentum]
            self._trainer: Dict[int, int] = {}  # block -> the group that trained it last
            self.momentum_bytes = 0  # what travelling momenta would have added to the exchanges so far

        def _begin(self):
            super()._begin()
            if sorted(b for a in self.assignment for b in a) != list(range(len(self.blocks))):
                raise SystemExit("block_outer: a block is trained by several ranks (or none) in a round: "
                                 "the emulation needs one trainer per block")
            for g, blocks in enumerate(self.assignment):
                for b in blocks:
                    if self._trainer.get(b, g) != g:
                        self.momentum_bytes += self._param_bytes[b]
                    self._trainer[b] = g
            self._start = {b: [p.detach().clone() for p in self.blocks[b].parameters()] for b in self.mine()}

        def _end(self):
            lr, mu = outer_lr, outer_momentum
            with torch.no_grad():
                for b in self.mine():  # SGD with Nesterov momentum on the pseudo-gradient start - trained
                    for p, start, m in zip(self.blocks[b].parameters(), self._start[b], self._momentum[b]):
                        g = start - p
                        m.mul_(mu).add_(g)
                        p.copy_(start - lr * (g + mu * m))
                mine = set(self.mine())
                flat = torch.cat([m.reshape(-1) if b in mine else torch.zeros_like(m).reshape(-1)
                                  for b, ms in enumerate(self._momentum) for m in ms])
                with self.comm.as_control():  # one non-zero term per element: the mean times S is it (S = 4: exactly)
                    self.comm.allreduce_mean_(flat).mul_(self.comm.size)
                k = 0
                for ms in self._momentum:
                    for m in ms:
                        m.copy_(flat[k:k + m.numel()].view_as(m))
                        k += m.numel()
            super()._end()

    return TravellingOuter


def rank_main(argv: List[str]) -> int:
    """One rank of one run: `block_outer.py --rank VARIANT TRAIN_ARGS...`."""
    variant, train_args = argv[0], argv[1:]
    from resist_mpi.cli import train, trainer
    from resist_mpi.cli.config import parse_config
    cfg = parse_config(train_args)
    if variant == "blocks":
        cls = travelling_resist(cfg.outer_lr, cfg.outer_momentum)
        trainer.ResIST = cls
        code = train.main(train_args)
        job = cls.instances[-1] if cls.instances else None
        if job is not None and job.comm.rank == 0:
            with open(os.path.join(cfg.out, "momentum_bytes.json"), "w") as f:
                json.dump({"momentum_bytes": job.momentum_bytes}, f)
        return code
    return train.main(train_args)


def run_numbers(out: str) -> Dict:
    from resist_mpi.cli.metrics import read_metrics, training_rounds
    recs = read_metrics(out)
    rounds = training_rounds(recs)
    evals = [r for r in recs if r.get("event") == "eval"]
    extra = os.path.join(out, "momentum_bytes.json")
    numbers = {"final_acc": evals[-1]["test_acc"], "rounds": len(rounds),
               "bytes": sum(r["bytes_sent"] for r in rounds),
               "t_round": statistics.median(r["t_compute"] + r["t_comm"] for r in rounds[1:])}
    if os.path.exists(extra):
        with open(extra) as f:
            numbers["momentum_bytes"] = json.load(f)["momentum_bytes"]
    return numbers


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:
        return rank_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a directory for the runs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--np", type=int, default=4)
    ap.add_argument("--train-args", default="--config configs/demo.yaml",
                    help="resist_mpi.train flags of every run, paths from the repository root (default: the demo config)")
    ap.add_argument("--json", help="write the table here")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    results: Dict[str, List[Dict]] = {v: [] for v in VARIANTS}
    for seed in seeds:
        for variant in VARIANTS:
            out = os.path.join(os.path.abspath(a.out), f"{variant}-{seed}")
            args = [*shlex.split(a.train_args), "--strategy", "resist", *OUTER, "--seed", str(seed), "--out", out,
                    "--overwrite", "--progress", "off"]
            cmd = ["mpirun", "--oversubscribe", "-np", str(a.np), sys.executable, os.path.abspath(__file__), "--rank",
                   variant, *args]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if p.returncode != 0:
                sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
                raise SystemExit(f"block_outer: the run {out} failed (exit {p.returncode})")
            n = run_numbers(out)
            results[variant].append(dict(n, seed=seed))
            print(f"block_outer: {variant:6s} seed {seed}: {100 * n['final_acc']:.2f}%, round {n['t_round']:.2f} s, "
                  f"{n['bytes'] / 1e6:.1f} MB" + (f" + momenta {n['momentum_bytes'] / 1e6:.1f} MB"
                                                 if "momentum_bytes" in n else ""), flush=True)
    print(f"{'outer step on':>16} | {'final acc (mean ± sd)':>22} | {'round':>7} | {'MB sent':>8} | {'+ momenta':>9}")
    table = {}
    for variant, runs in results.items():
        accs = [100 * r["final_acc"] for r in runs]
        mb = statistics.mean(r["bytes"] for r in runs) / 1e6
        extra = statistics.mean(r.get("momentum_bytes", 0) for r in runs) / 1e6
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        label = "shared layers" if variant == "shared" else "shared + blocks"
        print(f"{label:>16} | {statistics.mean(accs):13.2f}% ± {sd:.2f} | {statistics.median(r['t_round'] for r in runs):6.2f}s "
              f"| {mb:8.1f} | {extra:8.1f} ({100 * extra / mb:.0f}%)")
        table[variant] = {"runs": runs, "mean_acc": statistics.mean(accs) / 100, "sd_acc": sd / 100,
                          "mean_bytes": mb * 1e6, "mean_momentum_bytes": extra * 1e6}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"train_args": a.train_args, "np": a.np, "seeds": seeds, "variants": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
