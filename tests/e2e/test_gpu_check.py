"""`make gpu-check` (scripts/gpu_check.py): one clean line without CUDA; its comparisons checked on
the CPU (RESIST_GPU_CHECK_DEVICE=cpu runs the same launches with --device cpu)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, mpi_env, requires

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _check(*args, **env):
    return subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=ROOT, env=mpi_env(**env),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: make gpu-check really runs here")
def test_without_cuda_one_line_and_failure():
    p = _check()
    assert p.returncode == 1
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert lines == ["gpu-check: FAIL: no CUDA device visible (torch.cuda.is_available() is False); "
                     "run it on a machine with a GPU"]


def _write(out, rounds, test_loss):
    os.makedirs(out)
    with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
        for i, (loss, nbytes) in enumerate(rounds):
            fh.write(json.dumps({"event": "round", "round": i, "train_loss": loss, "bytes_sent": nbytes,
                                 "bytes_recv": nbytes}) + "\n")
        fh.write(json.dumps({"event": "eval", "round": len(rounds) - 1, "test_loss": test_loss}) + "\n")


def test_compare_runs_finds_each_kind_of_difference(tmp_path):
    ref = [(2.0, 100), (1.5, 120)]
    _write(tmp_path / "ref", ref, 1.2)
    _write(tmp_path / "same", [(2.0005, 100), (1.5, 120)], 1.2001)  # within rtol 1e-3
    _write(tmp_path / "loss", [(2.0, 100), (1.52, 120)], 1.2)
    _write(tmp_path / "bytes", [(2.0, 100), (1.5, 124)], 1.2)
    _write(tmp_path / "test", ref, 1.3)
    _write(tmp_path / "short", ref[:1], 1.2)
    cmp = lambda name: gpu_check.compare_runs(str(tmp_path / name), str(tmp_path / "ref"), 1e-3)  # noqa: E731
    assert cmp("same") is None
    assert cmp("loss").startswith("round 1 train loss")
    assert cmp("bytes").startswith("round 1 bytes 124")
    assert cmp("test").startswith("test loss")
    assert cmp("short").startswith("rounds [0]")


@requires("mpi")
def test_checks_run_end_to_end_on_the_cpu():
    p = _check("--backends", "torch", "--ranks", "2", RESIST_GPU_CHECK_DEVICE="cpu")  # mpirun + gloo
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert p.stdout.strip().splitlines() == [
        "gpu-check: PASS: 2/2 checks passed on cpu (RESIST_GPU_CHECK_DEVICE=cpu: the checks' plumbing only) "
        "(exchange exact, training within rtol 0.001 of the CPU)"]
