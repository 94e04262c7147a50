"""The torch backend under its own launcher, and training on it equal to the mpi backend.

- the comm contract under `torchrun --nproc-per-node 2` (its own rendezvous, no MPI at all); under
  mpirun it runs in test_mpi_suites.py, under horovodrun (horovod backend) in test_horovod_launch.py.
- every strategy trained with --backend torch under mpirun (rank 0's address broadcast by MPI) gives
  the same per-round losses and the same bytes, to the byte, as --backend mpi. On 2 ranks a sum of
  two addends does not depend on the reduction algorithm, so the two agree bit for bit.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import BACKEND_STRATEGIES, BACKEND_TRAIN, ROOT, mpi_env, mpirun, passed_on_every_rank, requires, trainings_args

CONTRACT = "tests/mpi/test_comm_contract.py"


def test_contract_torch_under_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = mpi_env(RESIST_TEST_BACKEND="torch")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # --log-dir: torchrun's agent otherwise leaves a torchelastic_* folder in /tmp on every launch
    p = subprocess.run([torchrun, "--nproc-per-node", "2", "--log-dir", str(tmp_path),
                        "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", CONTRACT],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    passed_on_every_rank(p, 2)


def _records(out):
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    keep = ("round", "train_loss", "bytes_sent", "bytes_recv", "test_loss", "test_acc")
    return [{k: r[k] for k in keep if k in r} for r in recs if r["event"] in ("round", "eval")]


@requires("mpi")
def test_training_on_torch_backend_equals_mpi(tmp_path, mpi_backend_trainings):
    mpi_out, ref = mpi_backend_trainings  # the mpi backend's run, shared with test_horovod_launch.py
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    p = mpirun(2, trainings_args([BACKEND_TRAIN + ["--strategy", s, "--out", tmp_path / s, "--backend", "torch"]
                                  for s in BACKEND_STRATEGIES]), timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for strategy in BACKEND_STRATEGIES:
        assert json.load(open(tmp_path / strategy / "config.json"))["backend"] == "torch"
        assert json.load(open(mpi_out / strategy / "config.json"))["backend"] == "mpi"
        got, want = _records(tmp_path / strategy), _records(mpi_out / strategy)
        assert len(got) >= 3 and got == want, (strategy, got, want)
