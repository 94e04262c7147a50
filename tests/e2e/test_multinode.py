"""Training across nodes, on the simulated cluster of resist_mpi.cluster (4 network namespaces).

One cluster serves the module (prefix "rct-", unshaped links); every launch runs on node0 with the
cluster's environment, and ranks on other nodes talk to each other only over the nodes' veths.

- Each strategy trained with one rank per node over TCP (`--mca btl tcp,self`) gives exactly the
  metrics of the same run on one node with plain `mpirun -np 4` (shared memory): Open MPI picks
  its collective algorithms from the message size and the number of ranks, not from the
  transport, so every sum is done in the same order.
- Two ranks on each of two nodes: local_rank/local_size (MPI's shared-memory split) and the
  device each rank would pick.
- horovodrun across the nodes, MPI and Gloo controllers: the metrics of the mpi backend run.
- SLURM with one slurmd per node: `sbatch -N 4 jobs/slurm/train.sbatch` (srun) and the PBS script
  through qsub (mpirun) run one rank on each node.
- The package's byte counters against the kernel's counters of the nodes' interfaces.

Needs root and iproute2 (skipped with the reason otherwise); the scheduler tests also need SLURM
(`make scheduler-deps`), the horovodrun tests Horovod (`make horovod`).
"""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import ROOT, horovodrun_path, mpi_env, requires
from slurm_helpers import Slurm, tail, which, why_no_slurm
from resist_mpi.tools.cluster import Cluster, ClusterError

HOSTS = ["node0", "node1", "node2", "node3"]
STRATEGIES = ("resist", "local_sgd", "data_parallel")
# 2 rounds of 2 steps per strategy: a few MB move per run, enough for the counters to mean something.
TRAIN = ["--model", "preact_resnet34", "--width", "4", "--dataset", "synthetic", "--epochs", "1",
         "--batch-size", "64", "--local-steps", "2", "--bn-batches", "1", "--seed", "3", "--progress", "off"]
TIMEOUT = 300
# One job per launcher trains every strategy in turn (start-ups are most of the time on 2 cores),
# through the CLI's own entry point; each rank then writes the payload bytes of its comms to a file.
DRIVER = """\
import json, sys
from resist_mpi import comm
from resist_mpi.cli.train import main
made = []
_init = comm.init
def init(*args, **kw):  # remember each run's Comm, to read its counters at the end
    made.append(_init(*args, **kw))
    return made[-1]
comm.init = init
out, args = sys.argv[1], sys.argv[2:]
for strategy in {strategies!r}:
    rc = main(args + ["--strategy", strategy, "--out", out + "/" + strategy])
    if rc:
        sys.exit(rc)
with open(f"{{out}}/counters.{{made[0].rank}}.json", "w") as f:
    json.dump({{"rank": made[0].rank, "sent": sum(c.bytes_sent for c in made),
               "cross": sum(c.bytes_sent_cross for c in made), "control": sum(c.control_bytes for c in made)}}, f)
"""

pytestmark = requires("mpi", "root", "cluster", "slow")


@pytest.fixture(scope="module")
def cluster():
    state = tempfile.mkdtemp(prefix="rct-")
    with Cluster(nodes=len(HOSTS), prefix="rct-", state_dir=state, profile=_profile()) as cl:
        yield cl


def _profile():
    """What a login on every node gets besides PROFILE_KEYS: the settings mpi_env gives launches here."""
    keep = ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")
    return {k: v for k, v in mpi_env().items() if k in keep}


def _run(cl, cmd, timeout=TIMEOUT, **env):
    """Run cmd on node0 with the cluster's environment; CompletedProcess (text, stderr in stdout)."""
    try:
        return cl.run(cmd, env=cl.env(mpi_env(**env)), cwd=ROOT, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # the cluster's teardown kills what is left on the nodes
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-6000:]}")


def _delta(before, after, key="tx_bytes"):
    return {h: after[h][key] - before[h][key] for h in before}


def _read(out):
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return json.load(open(os.path.join(out, "config.json"))), records


def _counters(out):
    return [json.load(open(p)) for p in sorted(Path(out).glob("counters.*.json"))]


# -- the cluster itself ------------------------------------------------------------------------------
def test_nodes_resolve_each_other_by_name_with_their_own_hostnames(cluster):
    probe = "import socket; print(socket.gethostname(), *[socket.gethostbyname(h) for h in %r])" % HOSTS
    for host in HOSTS:
        p = cluster.run([sys.executable, "-c", probe], host=host, capture_output=True, text=True)
        assert p.stdout.split() == [host] + [cluster.address(h) for h in HOSTS], p.stderr
    assert [cluster.address(h) for h in HOSTS] == ["10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.4"]


def test_rate_changes_on_the_running_cluster_both_ends(cluster):
    try:
        cluster.set_rate("100mbit")
        assert cluster.shaping() == {h: {"node": 10 ** 8, "switch": 10 ** 8} for h in HOSTS}
    finally:
        cluster.set_rate("unshaped")
    assert cluster.shaping() == {h: {"node": None, "switch": None} for h in HOSTS}


def test_refuses_to_start_over_an_existing_cluster(cluster):
    with pytest.raises(ClusterError, match=r"^namespaces rct-node0, .*rct-sw exist .*: run .*down --prefix rct-"):
        Cluster(nodes=2, prefix="rct-", state_dir=cluster.state_dir).up()
    assert cluster.counters().keys() == set(HOSTS)  # and left the running one alone


# -- one rank per node vs one node ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_runs(cluster, tmp_path_factory):
    """The DRIVER on 4 nodes (one rank each, TCP) and, at the same time, on one node with plain
    `mpirun -np 4` (the reference); the nodes' interface counters around the cluster job."""
    base = tmp_path_factory.mktemp("train")
    driver = base / "driver.py"
    driver.write_text(DRIVER.format(strategies=STRATEGIES))
    args = [sys.executable, str(driver)]
    ref_log = open(base / "reference.log", "w+")
    ref = subprocess.Popen(["mpirun", "--oversubscribe", "-np", "4"] + args + [str(base / "reference")] + TRAIN,
                           cwd=ROOT, env=mpi_env(PYTHONPATH=str(ROOT)), stdout=ref_log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        before = cluster.counters()
        job = _run(cluster, ["mpirun", "-np", "4", "-H", ",".join(HOSTS), "--mca", "btl", "tcp,self"]
                   + args + [str(base / "nodes")] + TRAIN)
        after = cluster.counters()
        ref_rc = ref.wait(timeout=TIMEOUT)
    finally:
        if ref.poll() is None:
            os.killpg(ref.pid, signal.SIGKILL)  # the reference's own process group only
            ref.wait()
    ref_log.seek(0)
    assert job.returncode == 0, job.stdout[-6000:]
    assert ref_rc == 0, ref_log.read()[-6000:]
    return {"base": base, "job": job, "tx": _delta(before, after), "rx": _delta(before, after, "rx_bytes")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_rank_per_node_matches_one_node(train_runs, strategy):
    config, recs = _read(train_runs["base"] / "nodes" / strategy)
    ref_config, ref_recs = _read(train_runs["base"] / "reference" / strategy)
    assert config["world_size"] == ref_config["world_size"] == 4 and config["config"]["strategy"] == strategy
    keys = ("event", "round", "train_loss", "test_loss", "test_acc", "bytes_sent", "bytes_recv")
    assert [r["event"] for r in recs] == [r["event"] for r in ref_recs] == ["round", "round", "eval", "done"], recs
    for got, ref in zip(recs, ref_recs):
        assert {k: got.get(k) for k in keys} == {k: ref.get(k) for k in keys}
    assert all(r["bytes_sent"] > 0 for r in recs[:-1])
    # and it really crossed the network: every node sent (its rank's share) through its interface
    assert min(train_runs["tx"].values()) > 1_000_000, train_runs["tx"]


# Bound for the kernel's count of what the nodes sent (sum of tx_bytes of every node's net0) against
# the package's (each rank's bytes_sent + half its control_bytes, which count both directions):
#   package <= kernel: every payload byte crosses exactly one link, once (the ranks are on
#     different nodes; a rank's share for itself is never counted);
#   kernel <= 1.10 * package + 128 KiB: Ethernet+IP+TCP headers are 66 B per 1448 B segment at
#     most (4.6%; with GSO on veth, once per up-to-64 KiB packet), ACKs about 66 B per 2 segments
#     (2.3%), MPI's fragment headers and rendezvous messages well under 1%; the constant covers
#     Open MPI's start-up (orted wire-up, modex, stdout forwarding: 28 KB for a job that sends
#     nothing, measured here). Measured: 1.011 unshaped, 1.057 with links shaped to 100 Mbit/s
#     (tbf cuts GSO packets into segments). A counter off by 2x, either way, fails.
OVERHEAD, WIREUP = 1.10, 128 * 1024


def test_byte_counters_match_kernel_counters(train_runs):
    counters = _counters(train_runs["base"] / "nodes")
    assert sorted(c["rank"] for c in counters) == [0, 1, 2, 3], counters
    package = sum(c["sent"] + c["control"] / 2 for c in counters)
    kernel = sum(train_runs["tx"].values())
    recorded = sum(r["bytes_sent"] for s in STRATEGIES for r in _read(train_runs["base"] / "nodes" / s)[1]
                   if r["event"] != "done")
    # the records are a subset of the counters: the start-up broadcast of each model is in none of them
    assert 0 < recorded <= package
    assert package <= kernel <= OVERHEAD * package + WIREUP, \
        f"kernel {kernel} B vs package {package:.0f} B: ratio {kernel / package:.4f}; per node {train_runs['tx']}"
    # the switch neither lost nor made anything: what the nodes sent, the nodes received
    assert abs(sum(train_runs["rx"].values()) - kernel) <= 0.01 * kernel


# -- two ranks per node -------------------------------------------------------------------------------
# each rank writes a file of its own: lines printed by several ranks at once can interleave
LOCAL = """\
import json, socket, sys
from resist_mpi import comm
c = comm.init("mpi")
with open(f"{sys.argv[1]}/rank{c.rank}.json", "w") as f:
    json.dump({"rank": c.rank, "host": socket.gethostname(), "local_rank": c.local_rank,
               "local_size": c.local_size, "auto": comm.select_device(c.local_rank, "auto"),
               "two_gpus": comm.select_device(c.local_rank, "auto", cuda_count=2),
               "launcher_local_rank": comm.world_info_from_env().local_rank}, f)
"""


def test_two_ranks_per_node_local_rank_and_device(cluster, tmp_path):
    p = _run(cluster, ["mpirun", "-np", "4", "-H", "node0:2,node1:2", "--mca", "btl", "tcp,self",
                       sys.executable, "-c", LOCAL, str(tmp_path)])
    assert p.returncode == 0, p.stdout[-6000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(4)]
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = [("node0", 0), ("node0", 1), ("node1", 0), ("node1", 1)]  # mpirun fills node0's slots first
    assert [(r["host"], r["local_rank"]) for r in ranks] == expected, ranks
    for r in ranks:
        assert r["local_size"] == 2 and r["launcher_local_rank"] == r["local_rank"], r
        assert r["two_gpus"] == f"cuda:{r['local_rank']}", r
        assert r["auto"] == (f"cuda:{r['local_rank'] % gpus}" if gpus else "cpu"), r


# -- horovodrun --------------------------------------------------------------------------------------
@requires("horovod")
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_horovodrun_across_nodes(cluster, train_runs, tmp_path, controller):
    """horovodrun checks ssh to every host, finds the common interface (net0) and starts one rank
    per node; the Horovod backend then moves the same bytes as the mpi backend, to the byte."""
    before = cluster.counters()
    p = _run(cluster, [horovodrun_path(), "-np", "4", "-H", ",".join(f"{h}:1" for h in HOSTS), f"--{controller}",
                       sys.executable, "-m", "resist_mpi.train", *TRAIN, "--strategy", "resist", "--out", str(tmp_path),
                       "--backend", "horovod"])
    tx = _delta(before, cluster.counters())
    assert p.returncode == 0, p.stdout[-6000:]
    config, recs = _read(tmp_path)
    assert config["backend"] == "horovod" and config["world_size"] == 4
    _, ref = _read(train_runs["base"] / "reference" / "resist")
    assert [r["event"] for r in recs] == [r["event"] for r in ref] and recs[-1]["event"] == "done"
    for got, want in zip(recs[:-1], ref[:-1]):
        assert (got["bytes_sent"], got["bytes_recv"]) == (want["bytes_sent"], want["bytes_recv"]), (got, want)
        loss = "train_loss" if got["event"] == "round" else "test_loss"
        assert math.isclose(got[loss], want[loss], rel_tol=1e-4), (got, want)  # Gloo may add in another order
    assert min(tx.values()) > 200_000, tx  # each node's rank exchanged its share through net0


# -- SLURM and PBS -------------------------------------------------------------------------------------
TINY = " ".join(TRAIN[:-2])  # the job scripts pass --progress off themselves


@pytest.fixture(scope="module")
def slurm(cluster):
    """slurmctld on node0 and one slurmd on each node, each finding its node by its own hostname.

    `ip netns exec` mounts a /sys of the node's namespace, without /sys/fs/cgroup: slurmd's cgroup
    autodetection then fails ("No filesystem mounted on /sys/fs/cgroup"). Naming the v1 plugin skips
    the detection; proctrack/linuxproc and task/none never use cgroups.
    """
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="rct-slurm-"))  # short: the munge socket path must fit 108 bytes
    s = Slurm(d, nodes=[(h, cluster.address(h)) for h in HOSTS], on=cluster.on, env=cluster.env(mpi_env()),
              cgroup_plugin="cgroup/v1")
    try:
        s.start()
        yield s
    finally:
        s.stop()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def _job_env(out, launcher):
    return dict(RESIST_DATASET="synthetic", RESIST_EPOCHS="1", RESIST_OUT=str(out), RESIST_EXTRA_ARGS=TINY,
                RESIST_LAUNCHER=launcher)


def _check_job(slurm, cluster, job, out, log, launcher, before, reference):
    info = slurm.wait(job, log, timeout=TIMEOUT)
    tx = _delta(before, cluster.counters())
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
    assert info["NodeList"] == "node[0-3]" and info["NumNodes"] == "4", info
    assert f"resist: 4 ranks (4 nodes x 1, 0 GPUs/node) on {','.join(HOSTS)} via {launcher}" in log.read_text()
    config, recs = _read(out)
    assert recs[-1]["event"] == "done"  # the run's last record
    recs = [r for r in recs if r["event"] in ("round", "eval")]  # the job scripts also checkpoint
    assert config["world_size"] == 4 and [r["event"] for r in recs] == ["round", "round", "eval"]
    assert min(tx.values()) > 200_000, tx  # a rank on every node, each sending its share through net0
    # it trained what the one-node run trained (the job's checkpoint traffic aside)
    keys = ("round", "train_loss", "test_loss", "test_acc")
    reference = [r for r in reference if r["event"] in ("round", "eval")]
    assert [{k: r.get(k) for k in keys} for r in recs] == [{k: r.get(k) for k in keys} for r in reference]


def test_sbatch_runs_across_nodes(slurm, cluster, train_runs):
    out, log = slurm.dir / "out" / "sbatch", slurm.dir / "out" / "sbatch.log"
    before = cluster.counters()
    p = slurm.run(["sbatch", "--parsable", "--nodes=4", "--ntasks-per-node=1", f"--output={log}",
                   "jobs/slurm/train.sbatch"], env=_job_env(out, "srun"))
    job = p.stdout.strip().split(";")[0]
    _check_job(slurm, cluster, job, out, log, "srun", before, _read(train_runs["base"] / "reference" / "resist")[1])
    for host in HOSTS:  # each node's own slurmd started the job step's task there
        assert f"StepId={job}.0" in tail(slurm.dir / "log" / f"slurmd.{host}.log", 100_000), host


def test_qsub_runs_across_nodes(slurm, cluster, train_runs):
    if which("qsub") is None:
        pytest.skip("qsub not installed (Debian: slurm-wlm-torque)")
    out, log = slurm.dir / "out" / "pbs", slurm.dir / "out" / "pbs.log"
    before = cluster.counters()
    p = slurm.run(["qsub", "-l", "nodes=4:ppn=1", "-j", "oe", "-o", str(log), "jobs/pbs/train.pbs"],
                  env=_job_env(out, "mpirun"))
    job = p.stdout.strip().split(".")[0]
    assert job.isdigit(), p.stdout + p.stderr
    _check_job(slurm, cluster, job, out, log, "mpirun", before, _read(train_runs["base"] / "reference" / "resist")[1])


# -- a node lost mid-run ---------------------------------------------------------------------------------
def test_cut_link_ends_job_with_one_line_then_resume_continues(cluster, tmp_path):
    """node3's link goes down mid-run (after a checkpoint): the watchdog of the others finds rank 3
    unreachable and the job ends within 60 s with one line naming it; once the link is back,
    `--resume auto` continues from the checkpoint and finishes."""
    out = tmp_path / "run"
    cmd = (["mpirun", "-np", "4", "-H", ",".join(HOSTS), "--mca", "btl", "tcp,self", sys.executable, "-m",
            "resist_mpi.train", "--out", str(out), "--comm-timeout", "10", "--checkpoint-every", "1",
            "--local-steps", "4", "--batch-size", "32"] + TRAIN[:TRAIN.index("--epochs")] + ["--epochs", "6"]
           + ["--progress", "off"])
    log = open(tmp_path / "job.log", "w+")
    job = cluster.popen(cmd, env=cluster.env(mpi_env()), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True)
    link = ["ip", "-n", cluster.ns("node3"), "link", "set", "net0"]
    try:
        ckpts = out / "checkpoints"
        t0 = time.time()
        while not (ckpts.is_dir() and any(ckpts.glob("ckpt-*/manifest.json"))) and job.poll() is None:
            assert time.time() - t0 < TIMEOUT, "no checkpoint"
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before its link could be cut"
        subprocess.run(link + ["down"], check=True)
        t_cut = time.time()
        rc = job.wait(timeout=120)
        assert time.time() - t_cut < 60, f"ended {time.time() - t_cut:.0f} s after the cut"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        subprocess.run(link + ["up"], check=True)
    log.seek(0)
    text = log.read()
    assert rc != 0
    errors = [line for line in text.splitlines() if "resist_mpi: error:" in line]
    assert len(errors) == 1 and "lost rank 3 (node3)" in errors[0], text[-4000:]
    saved = int(sorted(ckpts.glob("ckpt-*/manifest.json"))[-1].parent.name.split("-")[1])
    p = _run(cluster, cmd + ["--resume", "auto"])
    assert p.returncode == 0, p.stdout[-4000:]
    _, records = _read(out)
    resume = [r for r in records if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["round"] == saved > 0, resume
    assert [r for r in records if r["event"] == "eval"][-1]["epoch"] == 6.0


# -- groups of a node's ranks --------------------------------------------------------------------------
def test_group_per_node_cross_node_bytes(cluster, tmp_path):
    """8 ranks on 4 nodes, --group-size node (2 ranks a group): ResIST between the nodes,
    data-parallel inside each. Every round's bytes across nodes equal traffic.py's model, and the
    kernel's interface counters agree with the package's cross-node counters (the bound above)."""
    from resist_mpi.tools import traffic as T
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(strategies=("resist",)))
    steps = 2
    args = TRAIN[:TRAIN.index("--local-steps")] + ["--local-steps", str(steps), "--group-size", "node",
                                                     "--eval-every", "0"] + TRAIN[TRAIN.index("--local-steps") + 2:]
    before = cluster.counters()
    job = _run(cluster, ["mpirun", "-np", "8", "-H", ",".join(f"{h}:2" for h in HOSTS), "--mca", "btl", "tcp,self",
                         sys.executable, str(driver), str(tmp_path)] + args)
    after = cluster.counters()
    assert job.returncode == 0, job.stdout[-6000:]
    config, recs = _read(tmp_path / "resist")
    assert config["world_size"] == 8 and config["config"]["group_size"] == "node"
    rounds = [r for r in recs if r["event"] == "round"]
    with tempfile.TemporaryDirectory():
        import torch
        from resist_mpi.models import create_model
        with torch.device("meta"):
            sizes = T.model_sizes(create_model("preact_resnet34", 10, 4))
    drawn = T.draw_rounds(len(sizes.blocks), 4, 0, 3, len(rounds))
    model = T.resist_wire_rounds(sizes, 8, drawn, group_size=2, ranks_per_node=2, local_steps=steps)
    assert [r["bytes_cross_node"] for r in rounds] == [m["sent_cross"] for m in model]
    assert [r["bytes_sent"] for r in rounds] == [m["sent"] for m in model]
    counters = _counters(tmp_path)
    package_cross = sum(c["cross"] for c in counters)
    control = sum(c["control"] for c in counters) / 2
    kernel = sum(_delta(before, after).values())
    assert 0 < sum(r["bytes_cross_node"] for r in rounds) <= package_cross
    assert package_cross <= kernel <= OVERHEAD * (package_cross + control) + WIREUP, \
        f"kernel {kernel} B vs package {package_cross} B across nodes (+ {control:.0f} B of control)"
