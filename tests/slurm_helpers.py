"""A private SLURM for tests: munged (own key and socket), slurmctld and one slurmd per node.

Used by tests/e2e/test_scheduler.py (one node: this machine, on 127.0.0.1) and tests/e2e/test_multinode.py
(one slurmd in each node of a resist_mpi.tools.cluster.Cluster, slurmctld on node0). Everything lives in
one temp dir: slurm.conf (free ports), state, per-node spool/pid/log files (%n: the node name), job
output. SlurmUser=root, proctrack/linuxproc and task/none: no cgroups or slurm user needed.
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import pytest

from helpers import ROOT

SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def which(name):
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def why_no_slurm():
    """Why a private SLURM cannot run here (None when it can)."""
    missing = [n for n in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo") if which(n) is None]
    if missing:
        return (f"SLURM is not installed (missing: {', '.join(missing)}); `make scheduler-deps` installs "
                "slurmctld slurmd munge slurm-client slurm-wlm-torque")
    if os.geteuid() != 0:
        return "a private SLURM runs its daemons as root (SlurmUser=root); run as root"
    if shutil.which("mpirun") is None:
        return "mpirun is not on PATH"
    return None


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def munge_key(path: Path):
    if which("mungekey"):
        subprocess.run([which("mungekey"), "-c", "-k", str(path)], check=True, capture_output=True)
    else:  # create-munge-key only writes /etc/munge; any 32+ random bytes make a key
        path.write_bytes(os.urandom(1024))
    path.chmod(0o600)


SLURM_CONF = """\
ClusterName=resisttest
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
# per node: srun --mpi=pmix makes TmpFS/spmix_appdir_<uid>_<job>.<step> on each node, and the
# simulated nodes share one /tmp
TmpFS={d}/tmp/%n
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
SlurmdTimeout={slurmd_timeout}
InactiveLimit=0
KillWait=5
MinJobAge=600
# config_overrides: trust CPUs= even on a one-core machine (more ranks than cores, oversubscribed)
SlurmdParameters=config_overrides
{node_lines}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """A running private SLURM: env for its clients, and helpers to submit and wait.

    Args:
        d: an empty directory, short (the munge socket path must fit in 108 bytes).
        nodes: (name, address) of each compute node; default this machine on 127.0.0.1. slurmd
            finds its node by its hostname, so each name must be the hostname where its slurmd runs.
        on: node name -> argv prefix that runs a command there (default: run here); slurmctld and
            the clients (sbatch, scontrol, ...) run on the first node.
        env: the environment of daemons and clients (default os.environ); SLURM_/PBS_/RESIST_
            variables are dropped, SLURM_CONF and the Open MPI root settings are added.
        cgroup_plugin: CgroupPlugin of cgroup.conf; default: none written (slurmd autodetects).
        slurmd_timeout: seconds without an answer before slurmctld marks a node not responding.
    """

    def __init__(self, d: Path, nodes: Optional[Sequence[Tuple[str, str]]] = None,
                 on: Callable[[str], List[str]] = lambda node: [], env: Optional[dict] = None,
                 cgroup_plugin: Optional[str] = None, slurmd_timeout: int = 30):
        self.dir = d
        self.nodes = list(nodes or [(socket.gethostname().split(".")[0], "127.0.0.1")])
        self.on = on
        self.cgroup_plugin = cgroup_plugin
        self.slurmd_timeout = slurmd_timeout
        self.procs = []  # (name, Popen) of the daemons started here
        self.env = {k: v for k, v in (os.environ if env is None else env).items()
                    if not k.startswith(("SLURM_", "PBS_", "RESIST_"))}
        self.env.update(SLURM_CONF=str(d / "slurm.conf"), OMPI_ALLOW_RUN_AS_ROOT="1",
                        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", "")] + list(SBIN))
        self.env.pop("CUDA_VISIBLE_DEVICES", None)

    def start(self, cpus: Optional[int] = None):
        d = self.dir
        for sub in ("munge", "state", "spool", "tmp", "log", "out"):
            (d / sub).mkdir(mode=0o700 if sub == "munge" else 0o755)
        for name, _ in self.nodes:
            (d / "spool" / name).mkdir()
            (d / "tmp" / name).mkdir()
        munge_key(d / "munge" / "munge.key")
        ctld_port, d_port = free_ports(2)
        cpus = cpus or max(2, os.cpu_count() or 1)
        lines = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} State=UNKNOWN" for n, a in self.nodes)
        (d / "slurm.conf").write_text(SLURM_CONF.format(
            ctld_host=self.nodes[0][0], ctld_addr=self.nodes[0][1], d=d, ctld_port=ctld_port, d_port=d_port,
            node_lines=lines, node_list=",".join(n for n, _ in self.nodes), slurmd_timeout=self.slurmd_timeout))
        if self.cgroup_plugin:
            (d / "cgroup.conf").write_text(f"CgroupPlugin={self.cgroup_plugin}\n")
        m = d / "munge"  # one munged serves every node: its socket is a file, seen from every namespace
        self._daemon([which("munged"), "--foreground", "--force", f"--socket={m}/sock", f"--key-file={m}/munge.key",
                      f"--log-file={m}/log", f"--pid-file={m}/pid", f"--seed-file={m}/seed"], "munged")
        self._wait(lambda: (m / "sock").exists(), 15, "munged did not create its socket", m / "log")
        conf = str(d / "slurm.conf")
        self._daemon(self.on(self.nodes[0][0]) + [which("slurmctld"), "-D", "-i", "-f", conf], "slurmctld")
        for name, _ in self.nodes:
            self._daemon(self.on(name) + [which("slurmd"), "-D", "-f", conf], f"slurmd.{name}")
        self._wait(self._all_idle, 60, "the nodes did not become idle", d / "log" / "slurmctld.log",
                   *sorted((d / "log").glob("slurmd.*.log")))

    def _all_idle(self):
        states = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
        idle = {line.split()[0] for line in states if line.split()[1:] == ["idle"]}
        return idle == {n for n, _ in self.nodes}

    def _daemon(self, cmd, name):
        log = open(self.dir / "log" / f"{name}.stdout", "w")
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                  start_new_session=True)))

    def _wait(self, ok, timeout, what, *logs):
        t0 = time.time()
        dead = []
        while time.time() - t0 < timeout:
            if ok():
                return
            dead = [name for name, p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        tails = "\n".join(f"--- {p}:\n{tail(p)}" for p in list(logs) + sorted((self.dir / "log").glob("*.stdout")))
        raise RuntimeError(f"{what} within {timeout} s (exited: {dead or 'none'})\n{tails}")

    def stop(self):
        # Cancel jobs first: a job step outlives slurmd, and only this cluster's jobs are seen here.
        self.run(["scancel", "--user", "root"], check=False)
        time.sleep(0.5)
        for _, p in reversed(self.procs):  # slurmds, slurmctld, munged: by the pids started here
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run(self, cmd, check=True, **kw):
        """Run a client command (sbatch, scontrol, ...) on the first node; CompletedProcess (text)."""
        proc = subprocess.run(self.on(self.nodes[0][0]) + list(cmd), cwd=ROOT,
                              env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id):
        """scontrol's fields of a job as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id, log: Path, timeout=150):
        t0 = time.time()
        while time.time() - t0 < timeout:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        pytest.fail(f"job {job_id} not done after {timeout} s: {self.job(job_id)}\n{tail(log)}")


def tail(path, n=4000):
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError as e:
        return f"({e})"
