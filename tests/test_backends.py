"""Drivers: the comm contract (tests/mpi/test_comm_contract.py) under every backend and launcher, and
training on the torch backend equal to the mpi backend.

- mpi and torch (gloo) under `mpirun -np 2` and `-np 4`; torch under `torchrun --nproc-per-node 2`
  (its own rendezvous, no MPI at all). Horovod's runs are in tests/test_horovod_launch.py.
- every strategy trained with --backend torch under mpirun (rank 0's address broadcast by MPI) gives
  the same per-round losses and the same bytes, to the byte, as --backend mpi. On 2 ranks a sum of
  two addends does not depend on the reduction algorithm, so the two agree bit for bit.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, have_mpirun, mpi_env, mpirun

CONTRACT = "tests/mpi/test_comm_contract.py"


def _passed_on_every_rank(p, np_):
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    passed = re.findall(r"(\d+) passed", out)
    assert len(passed) == np_ and all(int(n) > 0 for n in passed), out[-4000:]


@pytest.mark.skipif(not have_mpirun(), reason="mpirun not found (run `make setup`)")
@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_contract_under_mpirun(backend, np_):
    p = mpirun(np_, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", CONTRACT], timeout=300,
               RESIST_TEST_BACKEND=backend)
    _passed_on_every_rank(p, np_)


def test_contract_torch_under_torchrun():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = mpi_env(RESIST_TEST_BACKEND="torch")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    p = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        CONTRACT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _passed_on_every_rank(p, 2)


DRIVER = """\
import sys
from resist_mpi.train import main
out, args = sys.argv[1], sys.argv[2:]
for strategy in ("resist", "local_sgd", "data_parallel"):
    rc = main(args + ["--strategy", strategy, "--out", out + "/" + strategy])
    if rc:
        sys.exit(rc)
"""
TRAIN = ["--model", "preact_resnet34", "--width", "2", "--epochs", "1", "--batch-size", "256",
         "--local-steps", "2", "--bn-batches", "1", "--seed", "3", "--progress", "off"]


def _records(out):
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    keep = ("round", "train_loss", "bytes_sent", "bytes_recv", "test_loss", "test_acc")
    return [{k: r[k] for k in keep if k in r} for r in recs if r["event"] in ("round", "eval")]


@pytest.mark.skipif(not have_mpirun(), reason="mpirun not found (run `make setup`)")
def test_training_on_torch_backend_equals_mpi(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    for backend in ("mpi", "torch"):
        p = mpirun(2, [str(driver), str(tmp_path / backend)] + TRAIN + ["--backend", backend], timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for strategy in ("resist", "local_sgd", "data_parallel"):
        assert json.load(open(tmp_path / "torch" / strategy / "config.json"))["backend"] == "torch"
        got, want = _records(tmp_path / "torch" / strategy), _records(tmp_path / "mpi" / strategy)
        assert len(got) >= 3 and got == want, (strategy, got, want)
