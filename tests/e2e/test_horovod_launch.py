"""The Horovod backend under horovodrun, both controllers (MPI and Gloo).

Skipped when Horovod (make horovod) or horovodrun is missing.

- test_horovod_backend_under_horovodrun: runs the comm contract (tests/mpi/test_comm_contract.py,
  RESIST_TEST_BACKEND=horovod) on every rank, with the library and the averaging modes on 2 ranks
  (Gloo controller) and groups and compression on 4. Each case starts a fresh job and passes only if every
  rank's pytest passed: horovodrun's exit status is non-zero when any rank fails, and each rank
  must report its own "N passed" line.
- test_train_matches_mpi_backend: every strategy trained under horovodrun with --backend horovod,
  MPI and Gloo controllers, on 2 ranks, checked against the same
  settings under `mpirun --backend mpi`: same seed, same ranks, so the same per-round train loss
  and final test loss (rel 1e-4) and the same bytes_sent/bytes_recv, to the byte.
- test_auto_backend_under_horovodrun: --backend auto picks mpi under the MPI controller (its ranks
  are MPI processes) and torch under the Gloo controller (no MPI there).

Why 2 ranks: a sum of two addends does not depend on the reduction algorithm, so the two
backends agree bit for bit. On 4 ranks Gloo's allreduce adds in another order than Open MPI's,
and data-parallel training on these thin nets amplifies last-bit differences within a few
steps: there, the mpi backend itself differs from itself by up to 4e-3 in train loss when Open
MPI is made to use another allreduce algorithm (coll_tuned_allreduce_algorithm), as much as
horovodrun --gloo differs from it.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import (BACKEND_STRATEGIES, BACKEND_TRAIN, ROOT, have_mpirun, horovodrun_path, mpi_env, passed_on_every_rank,
                     requires, run_documented, trainings_args)

TEST = "tests/mpi/test_comm_contract.py"


pytestmark = requires("horovod", "slow")


def _horovodrun_cmd(np_, controller, args, **extra_env):
    """(command, environment) of `horovodrun -np np_ [--gloo|--mpi] python args...`.

    The environment is helpers.mpi_env's (Open MPI behind the MPI controller refuses root and more
    ranks than cores otherwise; mpi_yield_when_idle matters most here: horovodrun tells mpirun there
    are np_ slots on localhost, so Open MPI would busy-poll even when the ranks outnumber the cores,
    which on 2 cores doubled the MPI controller's run time), plus the repo on PYTHONPATH.
    """
    env = mpi_env(**extra_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [horovodrun_path(), "-np", str(np_), "-H", f"localhost:{np_}"]
    cmd += ["--gloo"] if controller == "gloo" else ["--mpi"]
    return cmd + [sys.executable] + list(args), env


def horovodrun(np_, controller, args, timeout=300, **extra_env):
    """Run _horovodrun_cmd(...) from the repo root; returns CompletedProcess (text)."""
    cmd, env = _horovodrun_cmd(np_, controller, args, **extra_env)
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s (a rank hung?):\n{out[-6000:]}")


@pytest.mark.parametrize("np_, controller", [(2, "mpi"), (2, "gloo"), (4, "mpi")],
                         ids=["np2-mpi", "np2-gloo", "np4-mpi"])
def test_horovod_backend_under_horovodrun(np_, controller):
    # No cache plugin: N ranks writing one .pytest_cache at once would race. The contract under
    # every controller; on 2 ranks under Gloo the library and the averaging modes (the same Horovod
    # ops as under MPI, which the contract checks there); on 4 the groups (--group-size: Horovod
    # process sets) and the compressed averages (--wire-dtype).
    tests = [TEST] + (["tests/mpi/test_groups.py", "tests/mpi/test_compression.py"] if np_ == 4 else
                      ["tests/mpi/test_library.py", "tests/mpi/test_averaging_modes.py"] if controller == "gloo" else [])
    proc = horovodrun(np_, controller, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                      RESIST_TEST_BACKEND="horovod")
    passed_on_every_rank(proc, np_)


# -- training end to end: horovod backend == mpi backend ------------------------------------------------
NP = 2
STRATEGIES, TRAIN = BACKEND_STRATEGIES, BACKEND_TRAIN  # short on purpose: the backends' equality, not what is learnt
REL = 1e-4
# One job per controller trains every strategy in turn (helpers.TRAININGS), each into OUT/<strategy>;
# the mpi backend's run is the session's (`mpi_backend_trainings`, also test_backends.py's reference).


def _read(out):
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    config = json.load(open(os.path.join(out, "config.json")))
    return config, [r for r in records if r["event"] == "round"], [r for r in records if r["event"] == "eval"]


class _Job:
    """A launch running in the background; result() waits for it (and kills it on timeout)."""

    def __init__(self, cmd, env, out, timeout=300):
        self.cmd, self.out, self.timeout = cmd, out, timeout
        self.log = open(out / "launch.log", "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.rc = None

    def result(self):
        if self.rc is None:
            try:
                self.rc = self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # this job's own process group only
                self.proc.wait()
                self.rc = "timeout"
        self.log.seek(0)
        return self.rc, self.log.read()


@pytest.fixture(scope="module")
def train_jobs(tmp_path_factory):
    """controller ("mpi" or "gloo") -> its horovodrun _Job, started when first asked for, one at a time."""
    base = tmp_path_factory.mktemp("train")
    jobs = {}

    def get(controller):
        if controller not in jobs:
            out = base / controller
            out.mkdir()
            # the Horovod collectives asked for by name (auto picks mpi or torch: see below)
            args = trainings_args([TRAIN + ["--strategy", s, "--out", out / s, "--backend", "horovod"] for s in STRATEGIES])
            cmd, env = _horovodrun_cmd(NP, controller, args)
            jobs[controller] = _Job(cmd, env, out)
        return jobs[controller]

    yield get
    for job in jobs.values():
        if job.rc is None and job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
        job.log.close()


def _finished(job, what):
    rc, log = job.result()
    assert rc == 0, f"{what}: {' '.join(job.cmd)} exited {rc}:\n{log[-6000:]}"
    return log


@pytest.mark.skipif(not have_mpirun(), reason="mpirun not found: no mpi backend run to compare with")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_train_matches_mpi_backend(train_jobs, mpi_backend_trainings, controller, strategy):
    hvd_job = train_jobs(controller)
    log = _finished(hvd_job, f"horovodrun ({controller} controller)")
    config, rounds, evals = _read(hvd_job.out / strategy)
    assert config["backend"] == "horovod" and config["world_size"] == NP
    assert config["config"]["strategy"] == strategy
    assert log.count("final test accuracy") == len(STRATEGIES)
    ref_base, ref = mpi_backend_trainings
    assert ref.returncode == 0, f"the mpi backend reference exited {ref.returncode}:\n{ref.stderr[-6000:]}"
    ref_config, ref_rounds, ref_evals = _read(ref_base / strategy)
    assert ref_config["backend"] == "mpi"

    assert [r["round"] for r in rounds] == [r["round"] for r in ref_rounds] and len(rounds) >= 2
    for got, ref in zip(rounds, ref_rounds):
        assert got["strategy"] == strategy
        assert math.isclose(got["train_loss"], ref["train_loss"], rel_tol=REL), (got, ref)
        assert (got["bytes_sent"], got["bytes_recv"]) == (ref["bytes_sent"], ref["bytes_recv"]), (got, ref)
        assert got["bytes_sent"] > 0
    got, ref = evals[-1], ref_evals[-1]
    assert got["round"] == ref["round"] == rounds[-1]["round"]
    assert math.isclose(got["test_loss"], ref["test_loss"], rel_tol=REL), (got, ref)
    assert abs(got["test_acc"] - ref["test_acc"]) <= 0.01, (got, ref)
    assert (got["bytes_sent"], got["bytes_recv"]) == (ref["bytes_sent"], ref["bytes_recv"]), (got, ref)


def readme_horovodrun(controller):
    """The README's horovodrun command for that controller, as written."""
    from test_docs import ALL  # every documented command, with where it is and how it is checked
    found = [command for where, command, _ in ALL if where.startswith("README.md:")
             and command.startswith(".venv/bin/horovodrun ") and ("--gloo" in command.split()) == (controller == "gloo")]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("controller, expected", [("mpi", "mpi"), ("gloo", "torch")])
def test_auto_backend_under_horovodrun(controller, expected):
    """The README's horovodrun commands, run as written (here, not in test_docs.py): a run of the
    demo config under each controller, where --backend auto (the default) picks the fastest correct
    backend: mpi under the MPI controller (its ranks are MPI processes), torch under the Gloo one (no
    MPI there) (docs/backends.md, "Horovod": launcher_bench)."""
    command = readme_horovodrun(controller)
    p = run_documented(command)
    assert p.returncode == 0, f"`{command}` exited {p.returncode}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
    out = ROOT / re.search(r"--out (\S+)", command).group(1)
    config = json.load(open(out / "config.json"))
    assert (config["backend"], config["world_size"], config["config"]["epochs"]) == (expected, 2, 1), config
    text = re.sub(r"\[[\d,]+\]<stdout>:", "", p.stdout)  # horovodrun's prefix on every chunk a rank writes
    assert len(re.findall(r"final test accuracy: [\d.]+%", text)) == 1, p.stdout[-2000:]
