"""A lost node costs a round, not the run: elastic restarts on the survivors, on the simulated
cluster of resist_mpi.cluster (4 network namespaces, one torchrun agent or slurmd in each).

- The reference: the demo on 4 ranks, uninterrupted (`make demo`'s run, tests/conftest.py).
- torchrun --nnodes 2:4 --max-restarts 3 --rdzv-backend c10d, one run that loses two nodes, each its
  own way: node3's processes killed (the survivors' collectives fail at once), later node2's link
  cut (their watchdog finds it lost). Each time the agents left restart their workers, the smaller
  world resumes from the newest complete sharded checkpoint (written every round), redeals the
  blocks and trains on. The run finishes at most 1 point below the uninterrupted one, at most 1
  round is trained twice per loss, and a `membership` record per loss says who left, when, and how
  long the recovery took.
- The SLURM job script (one slurmd per node, `sbatch --no-kill`): node3's slurmd and ranks killed;
  the script relaunches on the 3 nodes SLURM still sees and the run finishes the same way: the same
  records, on a shorter run (SBATCH_EPOCHS). What it adds to the torchrun run is the script's
  relaunch; the trainer's resume on the survivors, and the accuracy it reaches, are the torchrun
  run's to check (the same code: the world's size and the newest checkpoint are all it reads).
- The rendezvous host's loss (node0 runs the c10d store) is not survived: every surviving worker
  ends with one line, every agent with a non-zero exit, in bounded time.

Needs root and iproute2 (and SLURM for the job-script test); skipped with the reason otherwise.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import ROOT, mpi_env, records, requires
from resist_mpi.tools.cluster import Cluster

pytestmark = requires("mpi", "root", "cluster", "slow")

HOSTS = ["node0", "node1", "node2", "node3"]
EPOCHS = 12  # the demo's (at 6 the uninterrupted run reaches only 81%, and the comparison says little)
SBATCH_EPOCHS = 5  # node3 lost after round 3's checkpoint, then 2 rounds or more on the 3 nodes left
TRAIN = ["-m", "resist_mpi.train", "--config", os.path.join(ROOT, "configs", "demo.yaml"), "--progress", "off",
         "--epochs", str(EPOCHS),
         "--resume", "auto", "--checkpoint-rounds", "1", "--comm-timeout", "10"]
TIMEOUT = 900


@pytest.fixture(scope="module")
def cluster():
    state = tempfile.mkdtemp(prefix="rce-")
    keep = ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")
    with Cluster(nodes=len(HOSTS), prefix="rce-", state_dir=state,
                 profile={k: v for k, v in mpi_env().items() if k in keep}) as cl:
        yield cl


def torchrun(cl, out, tag, log_dir, extra=()):
    """One torchrun agent per node, elastic between 2 and 4 nodes; {host: (Popen, log path)}. The
    first rendezvous closes once all 4 joined, or 10 s after the second did (agents start within
    a few seconds of each other, also on a busy machine)."""
    procs = {}
    for h in HOSTS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2:4", "--nproc-per-node", "1",
               "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", tag,
               "--rdzv-conf", "last_call_timeout=10,join_timeout=120",
               "--log-dir", str(log_dir),  # (else each agent leaves a torchelastic_* folder in /tmp)
               *TRAIN, "--backend", "torch",
               "--out", str(out), *extra]
        log = log_dir / f"{tag}-{h}.log"
        # a fresh rendezvous store for every restart (torchrun's shared one keeps the dead workers' keys)
        env = cl.env(mpi_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
        procs[h] = (cl.popen(cmd, host=h, env=env, cwd=ROOT, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True), log)
    return procs


def wait_all(procs, hosts, timeout=TIMEOUT):
    codes = {}
    t0 = time.time()
    for h in hosts:
        p, log = procs[h]
        try:
            codes[h] = p.wait(timeout=max(1, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{h}'s agent did not finish:\n{log.read_text()[-4000:]}")
    return codes


def stop_all(cl, procs):
    for h, (p, _) in procs.items():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def complete_checkpoints(out):
    d = Path(out) / "checkpoints"
    return sorted(p.name for p in d.glob("ckpt-*") if (p / "manifest.json").is_file()) if d.is_dir() else []


def newest_round(out):
    """The round of the newest complete checkpoint (0: none yet); rotation keeps only the newest few."""
    names = complete_checkpoints(out)
    return int(names[-1].split("-")[1]) if names else 0


def wait_for_checkpoints(out, n, procs, hosts=HOSTS):
    """Until the checkpoint after round n - 1 exists (the agents of hosts still running)."""
    t0 = time.time()
    while newest_round(out) < n:
        assert time.time() - t0 < TIMEOUT, "no checkpoints"
        assert all(procs[h][0].poll() is None for h in hosts), "an agent ended before the node was lost"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(demo_run):
    """The final test accuracy of the uninterrupted run: the demo on 4 ranks (tests/conftest.py's
    demo_run, run once for tests/e2e/test_demo.py too). It runs under mpirun on the mpi backend,
    which trains as the torch backend does (tests/e2e/test_backends.py), on this machine: where the
    ranks run does not change what they compute."""
    return records(demo_run[0], "eval")[-1]["test_acc"]


def check_recovered(out, lost, reference_acc=None, n_epochs=EPOCHS):
    """The run lost the nodes of `lost` in that order, one at a time, and finished its epochs; at
    most a point below the uninterrupted run where reference_acc is given."""
    rounds = records(out, "round")
    member = records(out, "membership")
    assert [m["left"] for m in member] == [[h] for h in lost] and all(m["joined"] == [] for m in member), member
    sizes = [4 - k for k in range(len(lost) + 1)]
    assert [(m["previous_world_size"], m["world_size"]) for m in member] == list(zip(sizes, sizes[1:])), member
    assert all(m["rounds_repeated"] <= 1 and m["t_recovery"] > 0 for m in member), member
    epochs = [r["epoch"] for r in rounds]
    assert epochs == sorted(set(epochs))  # each stretch of training once in the record, in order
    seen = [r["world_size"] for r in rounds]
    assert sorted(set(seen), reverse=True) == sizes and seen == sorted(seen, reverse=True)
    final = records(out, "eval")[-1]
    assert final["epoch"] == n_epochs
    if reference_acc is None:
        print(f"final accuracy {final['test_acc']:.4f} after {n_epochs} epochs")
        return member
    # at most a point below the uninterrupted run; above it is no defect: the rounds after a loss
    # train deeper sub-networks (22/3 or 22/2 blocks instead of 22/4; measured: 98.89% against 97.50%)
    assert final["test_acc"] >= reference_acc - 0.01, (final["test_acc"], reference_acc)
    print(f"final accuracy {final['test_acc']:.4f} against {reference_acc:.4f} uninterrupted")
    return member


def says_lost(line, host):
    """Whether a worker's error line gives a lost peer as the reason: its collective failed, or its
    watchdog found host gone. The watchdog names every peer that no longer answers, so it may name
    survivors too: those whose collective had failed stopped at once, and their listeners with them
    (seen: rank 0, busy evaluating when node3 was killed, named ranks 1, 2 and 3; their hosts refused
    the probe, as node3's did, so the line says "process ended" of all three)."""
    return "a peer is gone" in line or ("resist_mpi: error: lost " in line
                                        and re.search(rf"\brank \d+ \({host}\)", line) is not None)


def test_torchrun_goes_on_without_lost_nodes(cluster, reference, tmp_path):
    out = tmp_path / "run"
    procs = torchrun(cluster, out, "lost", tmp_path)
    link = ["ip", "-n", cluster.ns("node2"), "link", "set", "net0"]
    try:
        wait_for_checkpoints(out, 3, procs)
        cluster.kill("node3")  # its agent and its worker: the survivors' collectives fail at once
        t0 = time.time()
        while not any(r["world_size"] == 3 for r in records(out, "round")):
            assert time.time() - t0 < TIMEOUT, "the world of 3 did not train"
            assert all(procs[h][0].poll() is None for h in HOSTS[:3]), "an agent ended after node3's loss"
            time.sleep(0.2)
        wait_for_checkpoints(out, newest_round(out) + 2, procs, HOSTS[:3])
        subprocess.run(link + ["down"], check=True)  # node2 cut off: the survivors' watchdog finds it lost
        codes = wait_all(procs, HOSTS[:2])
    finally:
        stop_all(cluster, procs)
        subprocess.run(link + ["up"], check=True)
    assert codes == {h: 0 for h in HOSTS[:2]}, {h: procs[h][1].read_text()[-3000:] for h in HOSTS[:2]}
    member = check_recovered(out, ["node3", "node2"], reference)
    for h in HOSTS[:2]:  # each survivor's worker said in one line why it stopped, each time, then carried on
        text = procs[h][1].read_text()
        errors = [line for line in text.splitlines() if "resist_mpi: error:" in line]
        assert len(errors) == 2, text[-3000:]
        assert says_lost(errors[0], "node3") and says_lost(errors[1], "node2"), text[-3000:]
        assert "Traceback" not in text.split("resist_mpi: error:")[0][-2000:]  # the kill: one line, no traceback
    for m in member:
        print(f"recovery (left {m['left']}): {m['t_recovery']:.1f} s, {m['rounds_repeated']} round(s) trained again")


def test_the_rendezvous_hosts_loss_ends_the_job_with_one_line_per_worker(cluster, tmp_path):
    out = tmp_path / "run"
    procs = torchrun(cluster, out, "lost-host", tmp_path)
    try:
        wait_for_checkpoints(out, 2, procs)
        cluster.kill("node0")
        t0 = time.time()
        codes = wait_all(procs, HOSTS[1:], timeout=300)
        took = time.time() - t0
    finally:
        stop_all(cluster, procs)
    assert all(code != 0 for code in codes.values()), codes
    assert took < 240, took
    for h in HOSTS[1:]:
        text = procs[h][1].read_text()
        errors = [line for line in text.splitlines() if "resist_mpi: error:" in line]
        assert len(errors) == 1 and says_lost(errors[0], "node0"), text[-3000:]


def test_sbatch_relaunches_on_the_nodes_left(cluster, tmp_path):
    from slurm_helpers import Slurm, why_no_slurm
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="rce-slurm-"))  # short: the munge socket path must fit 108 bytes
    s = Slurm(d, nodes=[(h, cluster.address(h)) for h in HOSTS], on=cluster.on, env=cluster.env(mpi_env()),
              cgroup_plugin="cgroup/v1", slurmd_timeout=10)
    try:
        s.start()
        # (CI runs have lost a rank to a segmentation fault inside MPI_Init, Open MPI 4.1.4 under srun
        # --mpi=pmix, at the first launch and at the relaunch: the script launches such a step again,
        # tests/unit/test_job_relaunch.py)
        out, log = tmp_path / "run", tmp_path / "job.log"
        job = submit(s, out, log)
        ended = wait_for_round(s, job, out, log, 3)
        assert ended is None, f"the job ended before round 3:\n{ended}"
        cluster.kill("node3")  # its slurmd and its rank
        info = s.wait(job, log, timeout=TIMEOUT)
    finally:
        s.stop()
        shutil.rmtree(d, ignore_errors=True)  # the daemons' state (8 MB); the job's log and --out are in tmp_path
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    assert "resist: lost node3 (exit" in text and "relaunching on 3 nodes (node0,node1,node2)" in text, text[-4000:]
    check_recovered(out, ["node3"], n_epochs=SBATCH_EPOCHS)


def submit(s, out, log):
    """sbatch the job script on 4 nodes into out; the job's id."""
    env = dict(RESIST_DATASET="digits", RESIST_EPOCHS=str(SBATCH_EPOCHS), RESIST_OUT=str(out), RESIST_LAUNCHER="srun",
               RESIST_CONFIG=os.path.join(ROOT, "configs", "demo.yaml"),
               RESIST_EXTRA_ARGS="--comm-timeout 10")
    p = s.run(["sbatch", "--parsable", "--nodes=4", "--ntasks-per-node=1", "--no-kill", f"--output={log}",
               "jobs/slurm/train.sbatch"], env=env)
    job = p.stdout.strip().split(";")[0]
    assert job.isdigit(), p.stdout + p.stderr
    return job


def wait_for_round(s, job, out, log, n):
    """Until the checkpoint after round n - 1 exists: None, or the log's tail if the job ended first."""
    from slurm_helpers import FINAL_STATES, tail
    t0, polls = time.time(), 0
    while newest_round(out) < n:
        assert time.time() - t0 < TIMEOUT, f"no checkpoints:\n{tail(log)}"
        polls += 1
        if polls % 10 == 0 and s.job(job).get("JobState") in FINAL_STATES:
            return tail(log)
        time.sleep(0.5)
    return None
