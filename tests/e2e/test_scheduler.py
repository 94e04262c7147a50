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
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import ROOT, requires

from slurm_helpers import FINAL_STATES, Slurm
from slurm_helpers import tail as _tail, which as _which, why_no_slurm as _why_no_slurm

TINY = "--model preact_resnet18 --width 4 --batch-size 32 --local-steps 5 --min-depth 1 --bn-batches 2"
SLURM = requires("slurm", "root", "slow")  # the tests that start the one-node SLURM
JOB_TIMEOUT = 150  # seconds per job; a tiny run takes ~10 s when the machine is quiet


@pytest.fixture(scope="module")
def cluster():
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="resist-slurm-"))  # short: the munge socket path must fit 108 bytes
    c = Slurm(d)
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


@SLURM
def test_sbatch_train(cluster):
    """The SLURM script with RESIST_LAUNCHER=mpirun. With its default, srun: the requeue tests below
    (one node) and tests/e2e/test_multinode.py::test_sbatch_runs_across_nodes (four)."""
    job, out, log = _sbatch(cluster, "jobs/slurm/train.sbatch", "train-mpirun", RESIST_LAUNCHER="mpirun")
    info = cluster.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    assert "via mpirun" in log.read_text()
    _check_run(out, log)


@SLURM
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


@SLURM
def test_sbatch_baselines(cluster):
    job, out, log = _sbatch(cluster, "jobs/slurm/baselines.sbatch", "baselines")
    info = cluster.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    for strategy in ("local_sgd", "data_parallel"):
        recs = _check_run(out / strategy, log)
        assert {r["strategy"] for r in recs if r["event"] == "round"} == {strategy}


@SLURM
def test_sbatch_comm_bench(cluster):
    out, log = cluster.dir / "out" / "bench", cluster.dir / "out" / "bench.log"
    proc = cluster.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={log}",
                        "jobs/slurm/comm_bench.sbatch"],
                       env=dict(RESIST_OUT=str(out), RESIST_BENCH_ARGS="--sizes 1KB,64KB --iters 5"))
    info = cluster.wait(proc.stdout.strip().split(";")[0], log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    result = json.loads((out / "comm_bench.json").read_text())
    assert result["world_size"] == 2 and result["rows"], result


@SLURM
def test_requeued_job_resumes(cluster):
    """`scontrol requeue` kills the running job and starts it again: it must continue from its
    checkpoint, leaving each round in metrics.jsonl exactly once."""
    job, out, log = _sbatch(cluster, "jobs/slurm/train.sbatch", "requeue", RESIST_EPOCHS="3",
                            RESIST_EXTRA_ARGS=TINY + " --checkpoint-every 1")
    ckpts = out / "checkpoints"  # the first one: after epoch 1 of 3
    _wait_for(cluster, job, log, lambda: ckpts.is_dir() and any(ckpts.glob("ckpt-*/manifest.json")), "no checkpoint")
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
    # the script ran twice, and launched once more for each step srun failed to start but exited 0
    # for (seen right after the requeue, while slurmd still ended the old run)
    text = log.read_text()
    unlaunched = text.count("resist: the launch exited 0 but")
    assert text.count("resist: 2 ranks") == text.count("via srun") == 2 + unlaunched, text  # srun: the default


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


@SLURM
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
