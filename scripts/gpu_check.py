"""`make gpu-check`: is the CUDA path right? One summary line, exit 0 only when every check passed.

    make gpu-check                                   # on a machine with a GPU
    python scripts/gpu_check.py --backends mpi --ranks 1,2
    RESIST_GPU_CHECK_DEVICE=cpu python scripts/gpu_check.py   # the checks' own plumbing, on the CPU

For each backend (mpi; torch, which is NCCL on a GPU; horovod when importable) and each rank count
(1 and 2 ranks sharing the one GPU, --device cuda; NCCL refuses two ranks on one GPU, so torch runs
only as many ranks as there are GPUs), two checks:

  exchange   tests/mpi/test_resist_exchange.py with RESIST_TEST_DEVICE=cuda: one ResIST round on
             the GPU equals its single-process reference computed on the GPU, blocks moved and
             averaged exactly, byte counters equal to the plan.
  training   a short demo run (demo config, 1 epoch, batch 256, 3 local steps) on cuda and the same
             run on cpu: every round's train loss and the final test loss within --rtol of the CPU
             run, and the bytes of every round equal to the byte.

Without CUDA it stops at once with one line and exit status 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["-m", "resist_mpi.train", "--config", "configs/demo.yaml", "--epochs", "1", "--batch-size", "256",
         "--local-steps", "3", "--bn-batches", "2", "--progress", "off", "--overwrite"]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    env.update(extra)
    return env


def _launcher(backend: str, np_: int) -> List[str]:
    if backend == "horovod":
        horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        return [horovodrun if os.path.exists(horovodrun) else "horovodrun", "-np", str(np_), "-H", f"localhost:{np_}"]
    return ["mpirun", "--oversubscribe", "-np", str(np_)]


def _run(cmd: List[str], timeout: float, **env) -> Tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-160:] if lines else "(no output)"


def check_exchange(backend: str, np_: int, device: str, timeout: float) -> Optional[str]:
    """None when the exchange test passed on device, else why not (one line)."""
    rc, out = _run(_launcher(backend, np_) + [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                              "tests/mpi/test_resist_exchange.py"], timeout,
                   RESIST_TEST_DEVICE=device, RESIST_TEST_BACKEND=backend, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    return None if rc == 0 else f"exit {rc}: {_last_line(out)}"


def _records(out: str):
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in recs if r["event"] == "round"], [r for r in recs if r["event"] == "eval"]


def compare_runs(got_dir: str, ref_dir: str, rtol: float) -> Optional[str]:
    """None when the run in got_dir matches the one in ref_dir (losses within rtol, bytes equal)."""
    (rounds, evals), (ref_rounds, ref_evals) = _records(got_dir), _records(ref_dir)
    if [r["round"] for r in rounds] != [r["round"] for r in ref_rounds] or not rounds or not evals:
        return f"rounds {[r['round'] for r in rounds]} vs reference {[r['round'] for r in ref_rounds]}"
    for got, ref in zip(rounds, ref_rounds):
        if not math.isclose(got["train_loss"], ref["train_loss"], rel_tol=rtol):
            return f"round {got['round']} train loss {got['train_loss']:.6g} vs reference {ref['train_loss']:.6g}"
        if (got["bytes_sent"], got["bytes_recv"]) != (ref["bytes_sent"], ref["bytes_recv"]):
            return f"round {got['round']} bytes {got['bytes_sent']} vs reference {ref['bytes_sent']}"
    if not math.isclose(evals[-1]["test_loss"], ref_evals[-1]["test_loss"], rel_tol=rtol):
        return f"test loss {evals[-1]['test_loss']:.6g} vs reference {ref_evals[-1]['test_loss']:.6g}"
    return None


def check_training(backend: str, np_: int, device: str, work: str, rtol: float, timeout: float) -> Optional[str]:
    """None when a short run on device matches the same run on the CPU, else why not (one line)."""
    outs = {}
    for role, dev in (("device", device), ("cpu", "cpu")):
        outs[role] = os.path.join(work, f"{backend}-np{np_}-{role}")
        rc, log = _run(_launcher(backend, np_) + [sys.executable] + TRAIN +
                       ["--backend", backend, "--device", dev, "--out", outs[role]], timeout)
        if rc != 0:
            return f"{dev} run exit {rc}: {_last_line(log)}"
    return compare_runs(outs["device"], outs["cpu"], rtol)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="mpi,torch,horovod", help="backends to check (default: %(default)s)")
    p.add_argument("--ranks", default="1,2", help="rank counts, all on one GPU (default: %(default)s)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance GPU vs CPU (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per launch (default: %(default)s)")
    args = p.parse_args(argv)
    device = os.environ.get("RESIST_GPU_CHECK_DEVICE", "cuda")
    where = "cpu (RESIST_GPU_CHECK_DEVICE=cpu: the checks' plumbing only)"
    if device != "cpu":
        import torch
        if not torch.cuda.is_available():
            print("gpu-check: FAIL: no CUDA device visible (torch.cuda.is_available() is False); "
                  "run it on a machine with a GPU", file=sys.stderr)
            return 1
        where = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    backends = [b for b in args.backends.split(",") if b]
    skipped = []
    if "horovod" in backends and importlib.util.find_spec("horovod") is None:
        backends.remove("horovod")
        skipped.append("horovod (not installed: make horovod)")
    gpus = None if device == "cpu" else torch.cuda.device_count()
    work = tempfile.mkdtemp(prefix="resist-gpu-check-")
    results = []
    try:
        for backend in backends:
            for np_ in [int(n) for n in args.ranks.split(",") if n]:
                if backend == "torch" and gpus is not None and np_ > gpus:
                    skipped.append(f"torch np{np_} (NCCL needs a GPU per rank; {gpus} visible)")
                    continue
                for what, fn in (("exchange", lambda: check_exchange(backend, np_, device, args.timeout)),
                                 ("training", lambda: check_training(backend, np_, device, work, args.rtol,
                                                                     args.timeout))):
                    why = fn()
                    results.append((f"{backend} np{np_} {what}", why))
                    print(f"gpu-check: {backend} np{np_} {what}: {'ok' if why is None else 'FAIL: ' + why}",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [(name, why) for name, why in results if why is not None]
    summary = (f"{len(results) - len(failed)}/{len(results)} checks passed on {where}"
               + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    if failed:
        print(f"gpu-check: FAIL: {summary}; first failure: {failed[0][0]}: {failed[0][1]}")
        return 1
    print(f"gpu-check: PASS: {summary} (exchange exact, training within rtol {args.rtol:g} of the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
