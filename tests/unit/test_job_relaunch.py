"""The job scripts' relaunch after a lost node (jobs/common.sh, resist_train), with the launcher and
the node checks replaced by stubs on PATH: which nodes the second launch gets, how many times it
relaunches, and the line it ends with when a relaunch would not help. The real thing on the
simulated cluster (SLURM, slurmd killed) is tests/e2e/test_elastic.py; PBS has no such test there
(no PBS server here), so its path (PBS_NODEFILE, a ping of each node, mpirun -H) is tested here.
"""
import os
import stat
import subprocess

from helpers import ROOT

# Each call appends its arguments to $STUB_LOG; the exit codes of the launches come from $EXITS
# (one per launch, the last repeated); the launches numbered in $PROGRESS write a checkpoint of the
# run first; a launch that exits 0 ends the run's metrics.jsonl with its "done" record, except
# those numbered in $UNLAUNCHED (srun's exit 0 for a step it failed to start); `ping -c 1 -W 2 HOST`
# fails for the hosts in $DEAD.
LAUNCH = """echo "launch $*" >> "$STUB_LOG"
n=$(grep -c '^launch ' "$STUB_LOG")
for k in $PROGRESS; do
    if [ "$k" = "$n" ]; then
        c=$(printf '%s/checkpoints/ckpt-%06d' "$RESIST_OUT" "$n"); mkdir -p "$c"; touch "$c/manifest.json"
    fi
done
read -ra codes <<<"$EXITS"
i=$(( n <= ${#codes[@]} ? n - 1 : ${#codes[@]} - 1 ))
if [ "${codes[$i]}" = 0 ] && [[ " $UNLAUNCHED " != *" $n "* ]]; then
    mkdir -p "$RESIST_OUT"; echo '{"event": "done", "round": 9, "epoch": 3.0}' >> "$RESIST_OUT/metrics.jsonl"
fi
exit "${codes[$i]}"
"""
MPIRUN = """#!/bin/bash
if [ "$1" = --version ]; then echo "mpirun (Open MPI) 4.1.4"; exit 0; fi
""" + LAUNCH
PING = """#!/bin/bash
host=${@: -1}
echo "ping $host" >> "$STUB_LOG"
for d in $DEAD; do [ "$d" = "$host" ] && exit 1; done
exit 0
"""
# SLURM: scontrol expands the node list, sinfo says "idle*" (not responding) for the hosts in
# $MARKED (default: the dead ones); srun's probe of one node (a step running `true`) fails on the
# hosts in $DEAD, outlasts any timeout on those in $HANG, and is refused the first $REFUSED times.
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && tr , '\\n' <<<"$3"
"""
SINFO = """#!/bin/bash
host=""; while [ $# -gt 0 ]; do [ "$1" = -n ] && host=$2; shift; done
for d in ${MARKED-$DEAD}; do [ "$d" = "$host" ] && { echo "idle*"; exit 0; }; done
echo idle
"""
SRUN = """#!/bin/bash
if [ "$1" = --mpi=list ]; then echo "MPI plugin types are... pmix"; exit 0; fi
if [ "${@: -1}" = true ]; then
    for a in "$@"; do case $a in --nodelist=*) host=${a#--nodelist=} ;; esac; done
    echo "probe $* " >> "$STUB_LOG"
    [ "$(grep -c -- "--nodelist=$host --quiet true" "$STUB_LOG")" -le "${REFUSED:-0}" ] && exit 1
    for d in $HANG; do [ "$d" = "$host" ] && exec sleep 60; done
    for d in $DEAD; do [ "$d" = "$host" ] && exit 1; done
    exit 0
fi
""" + LAUNCH


def _fresh(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def _stubs(tmp_path, **scripts):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(tmp_path, script, bin_dir, exits, dead="", **env):
    log = tmp_path / "stub.log"
    log.touch()
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_LOG": str(log),
            "EXITS": exits, "DEAD": dead, "PROGRESS": "", "UNLAUNCHED": "", "RESIST_NODE_WAIT": "0", "RESIST_DATASET": "digits",
            "RESIST_PYTHON": "python3", "RESIST_OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", script], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=60)
    launches = [line[len("launch "):] for line in log.read_text().splitlines() if line.startswith("launch ")]
    return proc.returncode, proc.stdout + proc.stderr, launches


def _pbs(tmp_path, exits, dead="", **env):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("".join(f"node{k}\n" for k in range(4)))
    bin_dir = _stubs(tmp_path, mpirun=MPIRUN, ping=PING)
    return _run(tmp_path, "jobs/pbs/train.pbs", bin_dir, exits, dead, PBS_NODEFILE=str(nodefile),
                PBS_JOBID="42.server", RESIST_LAUNCHER="mpirun", **env)


def test_pbs_relaunches_on_the_nodes_that_answer(tmp_path):
    rc, out, launches = _pbs(tmp_path, "3 0", dead="node3")
    assert rc == 0, out
    assert len(launches) == 2, launches
    assert launches[0].startswith("-np 4 --map-by ppr:1:node --hostfile ") and " -H " not in launches[0]
    assert launches[1].startswith("-np 3 -H node0:1,node1:1,node2:1 --map-by ppr:1:node --hostfile "), launches[1]
    for cmd in launches:
        assert "--resume auto" in cmd and "-m resist_mpi.train" in cmd and "--strategy resist" in cmd
    # the relaunch waits for the lock on --out that the lost node may still hold (NFS: until its lease ends)
    assert "--lock-wait" not in launches[0] and "--strategy resist --lock-wait 180" in launches[1], launches[1]
    assert ("resist: lost node3 (exit 3); relaunching on 3 nodes (node0,node1,node2), restart 1 of 3, "
            "from the newest checkpoint") in out, out


def test_pbs_with_mpich_relaunches_with_a_host_list_hydra_reads(tmp_path):
    """Hydra (MPICH, Intel MPI) has no -H and refuses a host list beside a host file: the relaunch
    was `mpirun -np 3 -H ... -ppn 1 -f $PBS_NODEFILE`, refused every time."""
    nodefile = tmp_path / "nodes"
    nodefile.write_text("".join(f"node{k}\n" for k in range(4)))
    hydra = MPIRUN.replace('echo "mpirun (Open MPI) 4.1.4"', 'echo "HYDRA build details:"')
    bin_dir = _stubs(tmp_path, mpirun=hydra, ping=PING)
    rc, out, launches = _run(tmp_path, "jobs/pbs/train.pbs", bin_dir, "3 0", "node3", PBS_NODEFILE=str(nodefile),
                             PBS_JOBID="42.server", RESIST_LAUNCHER="mpirun")
    assert rc == 0 and len(launches) == 2, (out, launches)
    assert launches[0].startswith(f"-np 4 -ppn 1 -f {nodefile} "), launches[0]
    assert launches[1].startswith("-np 3 -ppn 1 -hosts node0,node1,node2 ") and " -f " not in launches[1], launches[1]


def test_a_stop_signal_while_the_nodes_are_probed_requeues_instead_of_killing_the_batch_shell(tmp_path):
    """The launch fails on a lost node and the time-limit warning (USR1) comes while the script
    asks the nodes: USR1's own action ended the batch shell (exit 138), and the job was not
    requeued. Now the script ends with the requeue status instead of launching again."""
    nodefile = tmp_path / "nodes"
    nodefile.write_text("".join(f"node{k}\n" for k in range(4)))
    signalling = MPIRUN.replace(LAUNCH, '(sleep 0.3; kill -USR1 "$PPID") &\n' + LAUNCH)
    slow_ping = PING.replace('host=${@: -1}', 'host=${@: -1}\nsleep 2')
    bin_dir = _stubs(tmp_path, mpirun=signalling, ping=slow_ping)
    rc, out, launches = _run(tmp_path, "jobs/pbs/train.pbs", bin_dir, "3 0", "node3", PBS_NODEFILE=str(nodefile),
                             PBS_JOBID="42.server", RESIST_LAUNCHER="mpirun")
    assert (rc, len(launches)) == (99, 1), (rc, out, launches)
    assert "resist: stop signal while no launch runs: the job requeues instead of launching" in out
    assert "resist: stopped with a checkpoint; exit 99 asks the scheduler for a requeue" in out


def test_pbs_relaunches_up_to_the_limit_then_says_why(tmp_path):
    rc, out, launches = _pbs(tmp_path, "3", dead="node2 node3", RESIST_MAX_RESTARTS="1")
    assert rc == 3 and len(launches) == 2, (out, launches)
    assert launches[1].startswith("-np 2 -H node0:1,node1:1 "), launches[1]
    assert out.rstrip().endswith("resist: the run failed (exit 3) and the restarts are used up "
                                 "(1 of RESIST_MAX_RESTARTS=1)"), out


def test_no_relaunch_when_every_node_answers_or_none_does(tmp_path):
    rc, out, launches = _pbs(_fresh(tmp_path, "a"), "3")
    assert rc == 3 and len(launches) == 1, (out, launches)
    assert "resist: the run failed (exit 3) and every node still answers: not a lost node, no relaunch" in out
    rc, out, launches = _pbs(_fresh(tmp_path, "b"), "3", dead="node0 node1 node2 node3")
    assert rc == 3 and len(launches) == 1, (out, launches)
    assert "resist: the run failed (exit 3) and no node of the job answers: nowhere to relaunch" in out


def test_what_a_relaunch_would_not_fix_ends_the_job(tmp_path):
    for code in ("2", "4", "0"):  # bad input, diverged, done: one launch, its status
        rc, out, launches = _pbs(_fresh(tmp_path, code), code, dead="node3")
        assert (rc, len(launches)) == (int(code), 1), out
        assert "relaunching" not in out
    rc, out, launches = _pbs(_fresh(tmp_path, "off"), "3", dead="node3", RESIST_MAX_RESTARTS="0")
    assert (rc, len(launches)) == (3, 1) and "restarts are used up (0 of RESIST_MAX_RESTARTS=0)" in out


def test_slurm_relaunch_asks_sinfo_and_names_the_nodes_left(tmp_path):
    bin_dir = _stubs(tmp_path, srun=SRUN, scontrol=SCONTROL, sinfo=SINFO, ping=PING)
    rc, out, launches = _run(tmp_path, "jobs/slurm/train.sbatch", bin_dir, "3 0", dead="node1",
                             SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="4", SLURM_NTASKS_PER_NODE="2",
                             SLURM_JOB_NODELIST="node0,node1,node2,node3")
    assert rc == 0, out
    assert launches[0].startswith("--nodes=4 --ntasks=8 --ntasks-per-node=2 --mpi=pmix --kill-on-bad-exit=1 ")
    # the failed step still holds its CPUs: the relaunch overlaps it, on the nodes SLURM sees
    assert launches[1].startswith("--nodes=3 --ntasks=6 --ntasks-per-node=2 --mpi=pmix --kill-on-bad-exit=1 "
                                  "--nodelist=node0,node2,node3 --overlap "), launches[1]
    assert "resist: lost node1 (exit 3); relaunching on 3 nodes (node0,node2,node3)" in out
    log = (tmp_path / "stub.log").read_text()
    assert "ping" not in log  # SLURM's view and its steps, not a ping
    # the nodes SLURM does not mark lost answer a one-task step on each; node1 is not asked
    probes = sorted(w for line in log.splitlines() if line.startswith("probe ") for w in line.split()
                    if w.startswith("--nodelist="))
    assert probes == ["--nodelist=node0", "--nodelist=node2", "--nodelist=node3"], log
    assert "probe --overlap --nodes=1 --ntasks=1 --nodelist=node0 --quiet true" in log, log


def test_slurm_finds_a_lost_node_before_slurm_marks_it(tmp_path):
    # SLURM still shows every node idle (its SlurmdTimeout, 300 s by default, has not passed):
    # node1 does not run the probe's step, node2's step never answers; a wait for SLURM's mark
    # (RESIST_NODE_WAIT=100 would have been 100 s) would outlast the subprocess' 60 s
    rc, out, launches = _slurm(_fresh(tmp_path, "probe"), "3 0", dead="node1", MARKED="", HANG="node2",
                               RESIST_NODE_WAIT="2")
    assert rc == 0 and len(launches) == 2, (out, launches)
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1 --mpi=pmix --kill-on-bad-exit=1 --nodelist=node0,node3 " \
        "--overlap " in launches[1], launches[1]
    assert "resist: lost node1,node2 (exit 3); relaunching on 2 nodes (node0,node3)" in out, out


def _slurm(tmp_path, exits, dead="", **env):
    bin_dir = _stubs(tmp_path, srun=SRUN, scontrol=SCONTROL, sinfo=SINFO, ping=PING)
    return _run(tmp_path, "jobs/slurm/train.sbatch", bin_dir, exits, dead, SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="4",
                SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST="node0,node1,node2,node3", **env)


def test_a_crash_before_the_first_checkpoint_launches_again_on_the_same_nodes(tmp_path):
    # the first launch: a rank's segmentation fault while MPI starts (srun: 139), nothing written;
    # every node answers its probe, so the relaunch comes at once (a wait of RESIST_NODE_WAIT for a
    # lost node to show would outlast the subprocess' 60 s)
    rc, out, launches = _slurm(_fresh(tmp_path, "start"), "139 0", RESIST_NODE_WAIT="100")
    assert rc == 0 and len(launches) == 2 and launches[1] == launches[0], (out, launches)
    assert ("resist: a rank was killed by signal 11 before the launch wrote a checkpoint (exit 139) and every "
            "node still answers: launching again on the same nodes, restart 1 of 3") in out, out
    # the relaunch after a lost node crashes the same way (a CI run's job): once more on the 3 nodes
    # left, though the run has a checkpoint (the first launch's): the crashed launch wrote none
    rc, out, launches = _slurm(_fresh(tmp_path, "relaunch"), "3 143 0", dead="node3", PROGRESS="1")
    assert rc == 0 and len(launches) == 3, (out, launches)
    assert "--nodelist=node0,node1,node2 --overlap " in launches[1] and launches[2] == launches[1], launches
    assert "relaunching on 3 nodes (node0,node1,node2), restart 1 of 3" in out
    assert "killed by signal 15 before the launch wrote a checkpoint (exit 143)" in out and "restart 2 of 3" in out


def test_a_crash_after_a_checkpoint_or_one_that_repeats_ends_the_job(tmp_path):
    # killed after it trained (a checkpoint written): a crash of the training, which a relaunch would repeat
    rc, out, launches = _slurm(_fresh(tmp_path, "trained"), "139", PROGRESS="1")
    assert rc == 139 and len(launches) == 1, (out, launches)
    assert "every node still answers: not a lost node, no relaunch" in out
    # a failure with a status (a rank's error line) is not retried either
    rc, out, launches = _slurm(_fresh(tmp_path, "error"), "1")
    assert rc == 1 and len(launches) == 1 and "not a lost node, no relaunch" in out, out
    # a crash at every start: the restarts run out, and the last line says so
    rc, out, launches = _slurm(_fresh(tmp_path, "always"), "139")
    assert rc == 139 and len(launches) == 4, (out, launches)
    assert out.rstrip().endswith("resist: the run failed (exit 139) and the restarts are used up "
                                 "(3 of RESIST_MAX_RESTARTS=3)"), out


def test_a_resume_path_in_the_extra_args_is_refused_before_any_launch(tmp_path):
    """RESIST_EXTRA_ARGS="--resume PATH" came after the job's own --resume auto and won: every
    requeue and relaunch restarted from PATH (what the run did since was set aside, and trained
    again). One line, exit 2, nothing launched; --resume auto there is what the job does anyway."""
    for extra in ("--resume /runs/a/checkpoints/ckpt-000003", "--width 8 --resume=/runs/a/checkpoints/ckpt-000003"):
        job = _fresh(tmp_path, str(len(extra)))
        rc, out, launches = _pbs(job, "0", RESIST_EXTRA_ARGS=extra, RESIST_OUT=str(job / "out"))
        assert (rc, launches) == (2, []), out
        assert "resist: error: RESIST_EXTRA_ARGS holds --resume /runs/a/checkpoints/ckpt-000003: the job resumes" in out
        assert out.rstrip().endswith(f"copy its folder into {job}/out/checkpoints/"), out
    rc, out, launches = _pbs(_fresh(tmp_path, "auto"), "0", RESIST_EXTRA_ARGS="--resume auto")
    assert (rc, len(launches)) == (0, 1), out


def test_a_launch_that_exits_0_without_finishing_the_run_is_not_taken_for_done(tmp_path):
    """A CI run's requeued job: srun printed "task 0 launch failed" (slurmd still ended the old
    run) and exited 0, and the job ended COMPLETED 0:0 without training. Exit 0 now counts only
    with the run's "done" record at the end of its metrics.jsonl; without it the script launches
    again on the same nodes once they answer. Its probes are refused at first, as that step was:
    a node has RESIST_NODE_WAIT seconds to answer, not one try."""
    rc, out, launches = _slurm(_fresh(tmp_path, "refused"), "0", UNLAUNCHED="1", REFUSED="1", RESIST_NODE_WAIT="5")
    assert rc == 0 and len(launches) == 2 and launches[1] == launches[0], (out, launches)
    assert "resist: the launch exited 0 but " in out and 'does not end with the run\'s "done" record' in out, out
    assert "every node still answers: launching again on the same nodes (from the newest checkpoint), " \
        "restart 1 of 3" in out, out
    log = (tmp_path / "refused" / "stub.log").read_text()
    assert log.count("--nodelist=node0 --quiet true") == 2, log  # refused once, asked again
    # a launcher that never starts the run: the restarts run out and the job fails, never exit 0
    rc, out, launches = _slurm(_fresh(tmp_path, "never"), "0", UNLAUNCHED="1 2 3 4")
    assert rc == 1 and len(launches) == 4, (out, launches)
    assert out.rstrip().endswith("resist: the run failed (exit 1) and the restarts are used up "
                                 "(3 of RESIST_MAX_RESTARTS=3)"), out
    # PBS (mpirun) too; a record that merely mentions done is not the end of a run
    job = _fresh(tmp_path, "pbs")
    (job / "out").mkdir()
    (job / "out" / "metrics.jsonl").write_text('{"event": "round", "round": 0, "note": "done"}\n')
    rc, out, launches = _pbs(job, "0", UNLAUNCHED="1", RESIST_OUT=str(job / "out"))
    assert rc == 0 and len(launches) == 2, (out, launches)
