"""The batch scripts in jobs/ under a real scheduler: a one-node SLURM started on localhost.

The fixture starts a private munged (own key and socket), slurmctld and slurmd from a generated
slurm.conf in a temp dir (free ports, state/spool/logs inside it), waits for the node to be idle,
and stops everything afterwards. The tests then submit jobs/slurm/*.sbatch with sbatch (srun and
mpirun launchers), jobs/pbs/train.pbs with the PBS qsub wrapper (slurm-wlm-torque), and requeue a
running job to check that it continues from its checkpoint. Each job trains a tiny model (2 ranks,
synthetic data, preact_resnet18 width 4, 1-2 epochs) and must leave a metrics.jsonl with an
evaluation and a config.json with world_size 2.

Needs root and the Debian packages slurmctld slurmd munge slurm-client slurm-wlm-torque
(`make scheduler-deps`); skipped with the reason otherwise. The launch logic itself is also checked
without a scheduler (RESIST_DRY_RUN=1: the scripts print the command they would run).
"""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
TINY = "--model preact_resnet18 --width 4 --batch-size 32 --local-steps 5 --min-depth 1 --bn-batches 2"
JOB_TIMEOUT = 150  # seconds per job; a tiny run takes ~10 s when the machine is quiet
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _which(name):
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _why_no_slurm():
    """Why a private SLURM cannot run here (None when it can)."""
    missing = [n for n in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo") if _which(n) is None]
    if missing:
        return (f"SLURM is not installed (missing: {', '.join(missing)}); `make scheduler-deps` installs "
                "slurmctld slurmd munge slurm-client slurm-wlm-torque")
    if os.geteuid() != 0:
        return "a private SLURM runs its daemons as root (SlurmUser=root); run as root"
    if shutil.which("mpirun") is None:
        return "mpirun is not on PATH"
    return None


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _munge_key(path: Path):
    if _which("mungekey"):
        subprocess.run([_which("mungekey"), "-c", "-k", str(path)], check=True, capture_output=True)
    else:  # create-munge-key only writes /etc/munge; any 32+ random bytes make a key
        path.write_bytes(os.urandom(1024))
    path.chmod(0o600)


SLURM_CONF = """\
ClusterName=resisttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
# config_overrides: trust CPUs= even on a one-core machine (2 ranks per job, oversubscribed)
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """A running private SLURM: env for its clients, and helpers to submit and wait."""

    def __init__(self, d: Path):
        self.dir = d
        self.procs = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "RESIST_"))}
        self.env.update(SLURM_CONF=str(d / "slurm.conf"), OMPI_ALLOW_RUN_AS_ROOT="1",
                        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", "")] + list(SBIN))
        self.env.pop("CUDA_VISIBLE_DEVICES", None)

    def start(self):
        d = self.dir
        for sub in ("munge", "state", "spool", "log", "out"):
            (d / sub).mkdir(mode=0o700 if sub == "munge" else 0o755)
        _munge_key(d / "munge" / "munge.key")
        ctld_port, d_port = _free_ports(2)
        host = socket.gethostname().split(".")[0]
        (d / "slurm.conf").write_text(SLURM_CONF.format(host=host, d=d, ctld_port=ctld_port, d_port=d_port,
                                                        cpus=max(2, os.cpu_count() or 1)))
        # srun --mpi=pmix keeps a directory per step, /tmp/spmix_appdir_<uid>_<job>.<step> by default:
        # another private SLURM (an earlier run, a parallel test) numbers its jobs from 1 too, and a
        # left-over directory of its step 1.0 made our step 1.0 fail to launch. Keep them in ours.
        (d / "pmix").mkdir()
        (d / "mpi.conf").write_text(f"PMIxCliTmpDirBase={d}/pmix\n")
        m = d / "munge"
        self._daemon([_which("munged"), "--foreground", "--force", f"--socket={m}/sock", f"--key-file={m}/munge.key",
                      f"--log-file={m}/log", f"--pid-file={m}/pid", f"--seed-file={m}/seed"], "munged")
        self._wait(lambda: (m / "sock").exists(), 15, "munged did not create its socket", m / "log")
        conf = str(d / "slurm.conf")
        self._daemon([_which("slurmctld"), "-D", "-i", "-f", conf], "slurmctld")
        self._daemon([_which("slurmd"), "-D", "-f", conf], "slurmd")
        self._wait(lambda: self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip() == "idle", 60,
                   "the node did not become idle", d / "log" / "slurmctld.log", d / "log" / "slurmd.log")

    def _daemon(self, cmd, name):
        log = open(self.dir / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _wait(self, ok, timeout, what, *logs):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if ok():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        tails = "\n".join(f"--- {p}:\n{_tail(p)}" for p in list(logs) + sorted((self.dir / "log").glob("*.stdout")))
        raise RuntimeError(f"{what} within {timeout} s (exited: {dead or 'none'})\n{tails}")

    def stop(self):
        # Cancel jobs first: a job step outlives slurmd, and only this cluster's jobs are seen here.
        self.run(["scancel", "--user", "root"], check=False)
        time.sleep(0.5)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged: by the pids started here
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run(self, cmd, check=True, **kw):
        proc = subprocess.run(cmd, cwd=ROOT, env={**self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id):
        """scontrol's fields of a job as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id, log: Path, timeout=JOB_TIMEOUT):
        t0 = time.time()
        while time.time() - t0 < timeout:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        pytest.fail(f"job {job_id} not done after {timeout} s: {self.job(job_id)}\n{_tail(log)}")


def _tail(path, n=4000):
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError as e:
        return f"({e})"


@pytest.fixture(scope="module")
def cluster():
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="resist-slurm-"))  # short: the munge socket path must fit 108 bytes
    c = Cluster(d)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


def _settings(out: Path, **extra):
    env = dict(RESIST_DATASET="synthetic", RESIST_EPOCHS="1", RESIST_OUT=str(out), RESIST_EXTRA_ARGS=TINY)
    env.update(extra)
    return env


def _check_run(out: Path, log: Path, world_size=2):
    ctx = f"\n--- job output:\n{_tail(log)}"
    assert (out / "metrics.jsonl").is_file(), f"no {out}/metrics.jsonl{ctx}"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals, f"no eval record in {out}/metrics.jsonl{ctx}"
    acc = evals[-1]["test_acc"]
    assert isinstance(acc, (int, float)) and not isinstance(acc, bool), acc
    assert math.isfinite(acc) and 0.0 <= acc <= 1.0, acc
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == world_size, cfg
    return recs


def _sbatch(cluster, script, name, **env):
    out, log = cluster.dir / "out" / name, cluster.dir / "out" / f"{name}.log"
    proc = cluster.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={log}", script],
                       env=_settings(out, **env))
    return proc.stdout.strip().split(";")[0], out, log


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sbatch_train(cluster, launcher):
    job, out, log = _sbatch(cluster, "jobs/slurm/train.sbatch", f"train-{launcher}", RESIST_LAUNCHER=launcher)
    info = cluster.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    assert f"via {launcher}" in log.read_text()
    _check_run(out, log)


def test_qsub_pbs_train(cluster):
    if _which("qsub") is None:
        pytest.skip("qsub not installed (Debian: slurm-wlm-torque)")
    out, log = cluster.dir / "out" / "pbs", cluster.dir / "out" / "pbs.log"
    # The script's own "#PBS -l nodes=1:ppn=4" would ask for 4 cores; the command line overrides it.
    proc = cluster.run(["qsub", "-l", "nodes=1:ppn=2", "-j", "oe", "-o", str(log), "jobs/pbs/train.pbs"],
                       env=_settings(out, RESIST_LAUNCHER="mpirun"))
    job = proc.stdout.strip().split(".")[0]
    assert job.isdigit(), proc.stdout + proc.stderr
    info = cluster.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    _check_run(out, log)


def test_sbatch_baselines(cluster):
    job, out, log = _sbatch(cluster, "jobs/slurm/baselines.sbatch", "baselines")
    info = cluster.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    for strategy in ("local_sgd", "data_parallel"):
        recs = _check_run(out / strategy, log)
        assert {r["strategy"] for r in recs if r["event"] == "round"} == {strategy}


def test_sbatch_comm_bench(cluster):
    if not (ROOT / "benchmarks" / "comm_bench.py").is_file():
        pytest.skip("benchmarks/comm_bench.py does not exist yet")
    out, log = cluster.dir / "out" / "bench", cluster.dir / "out" / "bench.log"
    proc = cluster.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={log}",
                        "jobs/slurm/comm_bench.sbatch"],
                       env=dict(RESIST_OUT=str(out), RESIST_BENCH_ARGS="--sizes 1KB,64KB --iters 5"))
    info = cluster.wait(proc.stdout.strip().split(";")[0], log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    result = json.loads((out / "comm_bench.json").read_text())
    assert result["world_size"] == 2 and result["rows"], result


def test_requeued_job_resumes(cluster):
    """`scontrol requeue` kills the running job and starts it again: it must continue from its
    checkpoint, leaving each round in metrics.jsonl exactly once."""
    job, out, log = _sbatch(cluster, "jobs/slurm/train.sbatch", "requeue", RESIST_EPOCHS="3",
                            RESIST_EXTRA_ARGS=TINY + " --checkpoint-every 1")
    ckpts = out / "checkpoints"  # the first one: after epoch 1 of 3
    _wait_for(cluster, job, log, lambda: ckpts.is_dir() and any(ckpts.iterdir()), "no checkpoint")
    cluster.run(["scontrol", "requeue", job])
    _start_requeued_now(cluster, job, log)
    info = cluster.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    assert info["Restarts"] == "1", info
    recs = _check_run(out, log)
    rounds = [r["round"] for r in recs if r["event"] == "round"]
    assert rounds == list(range(len(rounds))), rounds  # nothing repeated, nothing missing
    # ... and the restarted job continued from its checkpoint: a run restarted from round 0 would
    # rewrite the log just as consistently, but without this record, or with it at round 0
    resumed = [i for i, r in enumerate(recs) if r["event"] == "resume"]
    assert len(resumed) == 1, recs
    resume = recs[resumed[0]]
    assert resume["round"] == int(Path(resume["path"]).stem.split("-")[1]) > 0, resume
    assert next(r for r in recs[resumed[0]:] if r["event"] == "round")["round"] == resume["round"]
    assert [r for r in recs if r["event"] == "eval"][-1]["epoch"] == 3.0
    assert log.read_text().count("resist: 2 ranks") == 2  # the script ran twice


def _wait_for(cluster, job, log, ready, what):
    t0 = time.time()
    while not ready():
        if time.time() - t0 > JOB_TIMEOUT or cluster.job(job).get("JobState") in FINAL_STATES:
            pytest.fail(f"{what} before the job ended: {cluster.job(job)}\n{_tail(log)}")
        time.sleep(0.2)


def _start_requeued_now(cluster, job, log):
    """A requeued job waits ~2 minutes before it may start again; once the node has finished
    killing the old run (starting earlier makes slurmd refuse: 'Job N already killed'), start it."""
    _wait_for(cluster, job, log, lambda: cluster.job(job).get("Restarts") == "1", "no requeue")
    t0 = time.time()
    while cluster.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip() != "idle" and time.time() - t0 < 60:
        time.sleep(0.2)
    time.sleep(5)  # slurmd remembers the killed run a little longer than the node shows busy
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)


def _has_round(out):
    path = out / "metrics.jsonl"
    return path.is_file() and '"event": "round"' in path.read_text()


def test_stop_signal_checkpoints_requeues_and_matches_uninterrupted(cluster):
    """SLURM's warning signal (what --signal=B:USR1@120 sends, here at once with scancel --batch)
    reaches the batch script, which passes it to the ranks: they stop after the round, checkpoint,
    exit 99, and the script requeues the job, which resumes. The result equals an uninterrupted run."""
    # 5 blocks and no overlap: the checkpoint's gather then averages nothing the next round would
    # have averaged, so even the bytes of the resumed rounds equal the uninterrupted run's
    settings = dict(RESIST_EPOCHS="3", RESIST_EXTRA_ARGS=TINY + " --model preact_resnet34 --min-depth 0")
    ref_job, ref_out, ref_log = _sbatch(cluster, "jobs/slurm/train.sbatch", "uninterrupted", **settings)
    info = cluster.wait(ref_job, ref_log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", f"{info}\n{_tail(ref_log)}"
    job, out, log = _sbatch(cluster, "jobs/slurm/train.sbatch", "preempted", **settings)
    _wait_for(cluster, job, log, lambda: _has_round(out), "no round record")
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    _start_requeued_now(cluster, job, log)
    info = cluster.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    assert info["Restarts"] == "1", info
    recs = _check_run(out, log)
    stops = [r for r in recs if r["event"] == "stop"]
    assert len(stops) == 1 and stops[0]["exit"] == 99, recs
    resume = next(r for r in recs if r["event"] == "resume")
    assert resume["round"] == stops[0]["round"] + 1  # continued right after the round it stopped at
    assert "requeueing job" in log.read_text()
    ref = _check_run(ref_out, ref_log)
    keys = ("round", "train_loss", "train_acc", "bytes_sent", "bytes_recv")
    rows = lambda rs, kind: [{k: r[k] for k in keys if k in r} for r in rs if r["event"] == kind]  # noqa: E731
    assert rows(recs, "round") == rows(ref, "round")
    final, ref_final = [r for r in recs if r["event"] == "eval"][-1], [r for r in ref if r["event"] == "eval"][-1]
    assert (final["test_loss"], final["test_acc"], final["epoch"]) == (ref_final["test_loss"], ref_final["test_acc"], 3.0)


# -- launch logic without a scheduler (bash only) ------------------------------------------------

def _dry(script, **env):
    """Run a job script (or `source common.sh; resist_launch ...`) with RESIST_DRY_RUN=1; its output."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "RESIST_DRY_RUN": "1"}
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=30)
    return proc.returncode, proc.stdout + proc.stderr


def _command(output):
    return next(line for line in output.splitlines() if line.startswith("resist: ") and " ranks " not in line)


def test_dry_run_slurm_gpu_nodes():
    rc, out = _dry("bash jobs/slurm/train.sbatch", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2",
                   SLURM_GPUS_ON_NODE="4", SLURM_JOB_NAME="resist-train", RESIST_LAUNCHER="srun",
                   RESIST_SRUN_MPI="pmix")
    assert rc == 0, out
    cmd = _command(out)
    assert "srun --nodes=2 --ntasks=8 --ntasks-per-node=4 --mpi=pmix" in cmd, cmd  # one rank per GPU
    for flag in ("--resume auto", "--dataset cifar10", f"--data-dir {ROOT}/data/cifar10",
                 "--out runs/resist-train-77", "--strategy resist"):
        assert flag in cmd, (flag, cmd)


def test_dry_run_pbs_nodefile_and_launchers(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn1\nn2\nn2\nn2\n")  # 2 nodes x 3 slots
    env = dict(PBS_NODEFILE=str(nodefile), PBS_JOBID="123.server", PBS_JOBNAME="resist-baselines",
               RESIST_DATASET="digits", RESIST_EXTRA_ARGS="--epochs 3")
    rc, out = _dry("bash jobs/pbs/baselines.pbs", RESIST_LAUNCHER="horovodrun", **env)
    assert rc == 0, out
    cmds = [line for line in out.splitlines() if line.startswith("resist: horovodrun")]
    assert len(cmds) == 2, out
    for cmd, strategy in zip(cmds, ("local_sgd", "data_parallel")):
        assert "horovodrun -np 6 -H n1:3,n2:3" in cmd
        assert f"--out runs/resist-baselines-123/{strategy} --strategy {strategy}" in cmd
        assert "--data-dir" not in cmd and cmd.endswith("--epochs 3")  # extra args last: they win
    rc, out = _dry("bash jobs/pbs/train.pbs", RESIST_LAUNCHER="mpirun", **env)
    assert rc == 0, out
    cmd = _command(out)  # Open MPI: --hostfile; MPICH/Intel MPI: -f
    assert cmd.startswith("resist: mpirun -np 6") and (f"--hostfile {nodefile}" in cmd or f"-f {nodefile}" in cmd), cmd


def test_dry_run_bad_launcher():
    rc, out = _dry("bash jobs/slurm/train.sbatch", RESIST_LAUNCHER="qrsh")
    assert rc == 2 and "RESIST_LAUNCHER=qrsh: choose srun, mpirun or horovodrun" in out, out
