"""A lost node costs a round, not the run: elastic restarts on the survivors, on the simulated
cluster of resist_mpi.cluster (4 network namespaces, one torchrun agent or slurmd in each).

- torchrun --nnodes 3:4 --max-restarts 3 --rdzv-backend c10d: one node's processes killed (the
  survivors' collectives fail at once), or its link cut (their watchdog finds it lost): the agents
  left restart their workers, the world of 3 resumes from the newest complete sharded checkpoint
  (written every round), redeals the blocks and trains on. The demo config finishes at most 1 point
  below the uninterrupted 4-node run, at most 1 round is trained twice, and a `membership` record
  says who left, when, and how long the recovery took.
- The SLURM job script (one slurmd per node, `sbatch --no-kill`): node3's slurmd and ranks killed;
  the script relaunches on the 3 nodes SLURM still sees and the run finishes the same way.
- The rendezvous host's loss (node0 runs the c10d store) is not survived: every surviving worker
  ends with one line, every agent with a non-zero exit, in bounded time.

Needs root and iproute2 (and SLURM for the job-script test); skipped with the reason otherwise.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import ROOT, mpi_env, requires
from resist_mpi.tools.cluster import Cluster

pytestmark = requires("mpi", "root", "cluster", "slow")

HOSTS = ["node0", "node1", "node2", "node3"]
EPOCHS = 12  # the demo's (at 6 the uninterrupted run reaches only 81%, and the comparison says little)
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
    """One torchrun agent per node, elastic between 3 and 4 nodes; {host: (Popen, log path)}."""
    procs = {}
    for h in HOSTS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "3:4", "--nproc-per-node", "1",
               "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", tag,
               "--rdzv-conf", "last_call_timeout=3,join_timeout=120", *TRAIN, "--backend", "torch",
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


def wait_for_checkpoints(out, n, procs):
    """Until the checkpoint after round n - 1 exists."""
    t0 = time.time()
    while newest_round(out) < n:
        assert time.time() - t0 < TIMEOUT, "no checkpoints"
        assert all(p.poll() is None for p, _ in procs.values()), "an agent ended before the node was lost"
        time.sleep(0.2)


def records(out, event):
    from resist_mpi.cli.metrics import read_metrics
    return read_metrics(str(out), event)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The uninterrupted run on 4 nodes: its final test accuracy."""
    d = tmp_path_factory.mktemp("reference")
    procs = torchrun(cluster, d / "run", "ref", d)
    try:
        codes = wait_all(procs, HOSTS)
    finally:
        stop_all(cluster, procs)
    assert codes == {h: 0 for h in HOSTS}, {h: log.read_text()[-3000:] for h, (_, log) in procs.items()}
    assert {r["world_size"] for r in records(d / "run", "round")} == {4}
    return records(d / "run", "eval")[-1]["test_acc"]


def check_recovered(out, reference_acc, lost="node3"):
    rounds = records(out, "round")
    member = records(out, "membership")
    assert len(member) == 1, member
    m = member[0]
    assert m["left"] == [lost] and m["joined"] == [] and m["previous_world_size"] == 4 and m["world_size"] == 3
    assert m["rounds_repeated"] <= 1, m
    assert m["t_recovery"] > 0
    epochs = [r["epoch"] for r in rounds]
    assert epochs == sorted(set(epochs))  # each stretch of training once in the record, in order
    sizes = [r["world_size"] for r in rounds]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 4 and sizes[-1] == 3
    final = records(out, "eval")[-1]
    assert final["epoch"] == EPOCHS
    # at most a point below the uninterrupted run; above it is no defect: the rounds after the loss
    # train sub-networks of 22/3 blocks instead of 22/4, deeper (measured: 98.89% against 97.50%)
    assert final["test_acc"] >= reference_acc - 0.01, (final["test_acc"], reference_acc)
    print(f"final accuracy {final['test_acc']:.4f} against {reference_acc:.4f} uninterrupted")
    return m


@pytest.mark.parametrize("how", ["kill", "cut"])
def test_torchrun_goes_on_without_a_lost_node(cluster, reference, tmp_path, how):
    out = tmp_path / "run"
    procs = torchrun(cluster, out, f"lost-{how}", tmp_path)
    link = ["ip", "-n", cluster.ns("node3"), "link", "set", "net0"]
    try:
        wait_for_checkpoints(out, 3, procs)
        if how == "kill":
            cluster.kill("node3")  # its agent and its worker
        else:
            subprocess.run(link + ["down"], check=True)
        codes = wait_all(procs, HOSTS[:3])
    finally:
        stop_all(cluster, procs)
        if how == "cut":
            subprocess.run(link + ["up"], check=True)
    assert codes == {h: 0 for h in HOSTS[:3]}, {h: procs[h][1].read_text()[-3000:] for h in HOSTS[:3]}
    m = check_recovered(out, reference)
    for h in HOSTS[:3]:  # each survivor's worker said in one line why it stopped, then carried on
        text = procs[h][1].read_text()
        errors = [line for line in text.splitlines() if "resist_mpi: error:" in line]
        assert len(errors) == 1 and ("a peer is gone" in errors[0] or "lost rank 3 (node3)" in errors[0]), text[-3000:]
        assert "Traceback" not in text.split("resist_mpi: error:")[0][-2000:] or how == "cut"
    print(f"recovery ({how}): {m['t_recovery']:.1f} s, {m['rounds_repeated']} round(s) trained again")


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
        assert len(errors) == 1 and ("a peer is gone" in errors[0] or "lost rank 0 (node0)" in errors[0]), text[-3000:]


def test_sbatch_relaunches_on_the_nodes_left(cluster, reference, tmp_path):
    from slurm_helpers import Slurm, tail, why_no_slurm
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="rce-slurm-"))
    s = Slurm(d, nodes=[(h, cluster.address(h)) for h in HOSTS], on=cluster.on, env=cluster.env(mpi_env()),
              cgroup_plugin="cgroup/v1", slurmd_timeout=10)
    out, log = tmp_path / "run", tmp_path / "job.log"
    try:
        s.start()
        env = dict(RESIST_DATASET="digits", RESIST_EPOCHS=str(EPOCHS), RESIST_OUT=str(out), RESIST_LAUNCHER="srun",
                   RESIST_CONFIG=os.path.join(ROOT, "configs", "demo.yaml"), RESIST_NODE_WAIT="120",
                   RESIST_EXTRA_ARGS="--comm-timeout 10")
        p = s.run(["sbatch", "--parsable", "--nodes=4", "--ntasks-per-node=1", "--no-kill", f"--output={log}",
                   "jobs/slurm/train.sbatch"], env=env)
        job = p.stdout.strip().split(";")[0]
        assert job.isdigit(), p.stdout + p.stderr
        t0 = time.time()
        while newest_round(out) < 3:
            assert time.time() - t0 < TIMEOUT, f"no checkpoints:\n{tail(log)}"
            time.sleep(0.5)
        cluster.kill("node3")  # its slurmd and its rank
        info = s.wait(job, log, timeout=TIMEOUT)
    finally:
        s.stop()
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    assert "resist: lost node3 (exit" in text and "relaunching on 3 nodes (node0,node1,node2)" in text, text[-4000:]
    check_recovered(out, reference)
