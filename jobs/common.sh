# Shared by jobs/slurm/*.sbatch and jobs/pbs/*.pbs (sourced, never run): the RESIST_* settings
# with their defaults, and `resist_launch`, which starts NODES x RANKS_PER_NODE ranks of a Python
# program with srun, mpirun or horovodrun. See jobs/README.md for the variables.
#
#   source "$RESIST_HOME/jobs/common.sh"
#   resist_launch -m resist_mpi.train --out "$RESIST_OUT" ...    # arguments after the interpreter
#
# RESIST_DRY_RUN=1 prints the command instead of running it (used by tests/e2e/test_scheduler.py).

# The repository: where the batch script was submitted from, unless told otherwise. Batch systems
# run a copy of the script from a spool directory, so its own location says nothing.
RESIST_HOME=${RESIST_HOME:-$PWD}
export PYTHONPATH="$RESIST_HOME${PYTHONPATH:+:$PYTHONPATH}"

# -- the allocation ------------------------------------------------------------------------------
_resist_pbs_nodes() {  # unique hosts in the PBS node file (one line per rank slot there)
    if [ -r "${PBS_NODEFILE:-}" ]; then sort -u "$PBS_NODEFILE" | grep -c .; fi
}
_resist_pbs_ppn() {  # slots of the first host in the PBS node file (Torque: ppn, PBS Pro: mpiprocs)
    if [ -r "${PBS_NODEFILE:-}" ]; then awk 'NR == 1 {h = $0} $0 == h {n++} END {if (n) print n}' "$PBS_NODEFILE"; fi
}
_resist_first_int() {  # "4(x2),2" -> 4: SLURM_TASKS_PER_NODE's first entry
    if [ -n "$1" ]; then echo "${1%%[(,]*}"; fi
}

RESIST_NODES=${RESIST_NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$(_resist_pbs_nodes)}}}
RESIST_NODES=${RESIST_NODES:-1}
# SLURM_GPUS_ON_NODE is set when the job asked for GPUs (--gpus-per-node, --gres=gpu:N).
RESIST_GPUS_PER_NODE=${RESIST_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
# Ranks per node: what the job asked for (--ntasks-per-node), else one per GPU, else the tasks or
# PBS slots the allocation has on a node.
RESIST_RANKS_PER_NODE=${RESIST_RANKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-}}
if [ -z "$RESIST_RANKS_PER_NODE" ] && [ "$RESIST_GPUS_PER_NODE" -gt 0 ]; then
    RESIST_RANKS_PER_NODE=$RESIST_GPUS_PER_NODE
fi
RESIST_RANKS_PER_NODE=${RESIST_RANKS_PER_NODE:-$(_resist_first_int "${SLURM_TASKS_PER_NODE:-}")}
RESIST_RANKS_PER_NODE=${RESIST_RANKS_PER_NODE:-${PBS_NUM_PPN:-$(_resist_pbs_ppn)}}
RESIST_RANKS_PER_NODE=${RESIST_RANKS_PER_NODE:-1}
RESIST_NP=$((RESIST_NODES * RESIST_RANKS_PER_NODE))

# -- what to run ---------------------------------------------------------------------------------
RESIST_JOB_ID=${SLURM_JOB_ID:-${PBS_JOBID:-local}}
RESIST_JOB_ID=${RESIST_JOB_ID%%.*}                      # PBS: 1234.server -> 1234
if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
    RESIST_LAUNCHER=${RESIST_LAUNCHER:-srun}
else
    RESIST_LAUNCHER=${RESIST_LAUNCHER:-mpirun}
fi
if [ -z "${RESIST_PYTHON:-}" ]; then
    if [ -x "$RESIST_HOME/.venv/bin/python" ]; then RESIST_PYTHON=$RESIST_HOME/.venv/bin/python
    else RESIST_PYTHON=$(command -v python3 || echo python); fi
fi
# With RESIST_CONFIG (a YAML/JSON config, e.g. configs/cifar100_resnet101.yaml) the file decides the
# data and the length; RESIST_DATASET / RESIST_DATA_DIR / RESIST_EPOCHS then override it only when set.
RESIST_CONFIG=${RESIST_CONFIG:-}
_resist_set_by_user=" ${RESIST_DATASET:+dataset} ${RESIST_DATA_DIR:+data_dir} ${RESIST_EPOCHS:+epochs} "
RESIST_DATASET=${RESIST_DATASET:-cifar10}
RESIST_DATA_DIR=${RESIST_DATA_DIR:-$RESIST_HOME/data/$RESIST_DATASET}
RESIST_EPOCHS=${RESIST_EPOCHS:-160}
RESIST_CHECKPOINT_MINUTES=${RESIST_CHECKPOINT_MINUTES:-20}
# A sharded checkpoint every this many rounds (written in the background: a lost node costs a round)
RESIST_CHECKPOINT_ROUNDS=${RESIST_CHECKPOINT_ROUNDS:-1}
# After a lost node: relaunch on the nodes still alive, this many times at most (0: never)
RESIST_MAX_RESTARTS=${RESIST_MAX_RESTARTS:-3}
# After a failed launch, seconds a node has to answer a probe (SLURM: a step running `true` on it;
# PBS: a ping) before it counts as lost
RESIST_NODE_WAIT=${RESIST_NODE_WAIT:-30}
# After a lost node: seconds the relaunch waits for --out's lock (--lock-wait), which a file system
# like NFS keeps for the lost node until its lease ends
RESIST_LOCK_WAIT=${RESIST_LOCK_WAIT:-180}
RESIST_EXTRA_ARGS=${RESIST_EXTRA_ARGS:-}
# One thread per rank unless the job asked for more cores per task (ranks share a node's cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Since SLURM 22.05 srun no longer inherits sbatch's --cpus-per-task: pass it on explicitly, or every
# rank is bound to one core whatever the job asked for.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
# DataLoader worker processes per rank (--workers): the rank's cores beyond its threads.
_resist_cores=${SLURM_CPUS_PER_TASK:-${RESIST_CPUS_PER_RANK:-1}}
RESIST_WORKERS=${RESIST_WORKERS:-$(( _resist_cores > OMP_NUM_THREADS ? _resist_cores - OMP_NUM_THREADS : 0 ))}

# The train flags every job passes: data, length, and what makes a requeued job continue
# (--resume auto picks the newest checkpoint in --out; none yet means a fresh start).
resist_train_args() {
    local args=(--progress off --resume auto --checkpoint-minutes "$RESIST_CHECKPOINT_MINUTES"
                --checkpoint-rounds "$RESIST_CHECKPOINT_ROUNDS")
    _resist_wants() { [ -z "$RESIST_CONFIG" ] || [[ $_resist_set_by_user == *" $1 "* ]]; }
    if [ -n "$RESIST_CONFIG" ]; then args+=(--config "$RESIST_CONFIG"); fi
    if _resist_wants dataset; then args+=(--dataset "$RESIST_DATASET"); fi
    if _resist_wants epochs; then args+=(--epochs "$RESIST_EPOCHS"); fi
    case $RESIST_DATASET in
        digits|synthetic) ;;                                  # built in, no files
        *) if _resist_wants data_dir || { [ -n "$RESIST_CONFIG" ] && _resist_wants dataset; }; then
               args+=(--data-dir "$RESIST_DATA_DIR"); fi ;;
    esac
    printf '%s\n' "${args[@]}"
}

# -- launch --------------------------------------------------------------------------------------
_resist_hosts() {  # host1,host2,... of the launch: RESIST_HOSTS (after a lost node), else the allocation's
    if [ -n "${RESIST_HOSTS:-}" ]; then
        echo "$RESIST_HOSTS"
    elif [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
        scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -
    elif [ -n "${PBS_NODEFILE:-}" ] && [ -r "$PBS_NODEFILE" ]; then
        awk '!seen[$0]++' "$PBS_NODEFILE" | paste -sd, -
    else
        hostname -s
    fi
}

_resist_srun_mpi() {  # the PMI flavour srun offers MPI with: pmix, else pmi2 (RESIST_SRUN_MPI overrides)
    if [ -n "${RESIST_SRUN_MPI:-}" ]; then echo "$RESIST_SRUN_MPI"; return; fi
    local list; list=$(srun --mpi=list 2>&1)
    if grep -qw pmix <<<"$list"; then echo pmix
    elif grep -qw pmi2 <<<"$list"; then echo pmi2
    else echo none; fi
}

# resist_launch ARGS...: run "$RESIST_PYTHON ARGS..." on RESIST_NP ranks; returns its exit status.
resist_launch() {
    local cmd
    case $RESIST_LAUNCHER in
        srun)
            cmd=(srun --nodes="$RESIST_NODES" --ntasks="$RESIST_NP" --ntasks-per-node="$RESIST_RANKS_PER_NODE"
                 --mpi="$(_resist_srun_mpi)" --kill-on-bad-exit=1)
            # a relaunch after a lost node: only the nodes left, and --overlap, because the failed
            # step still holds its CPUs until the lost node's part of it is cleaned up, which never
            # happens while that node is down ("Requested nodes are busy" otherwise)
            if [ -n "${RESIST_HOSTS:-}" ]; then cmd+=(--nodelist="$RESIST_HOSTS" --overlap); fi ;;
        mpirun)
            cmd=(mpirun -np "$RESIST_NP")
            if [[ $(mpirun --version 2>&1) == *"Open MPI"* ]]; then  # (no pipe: grep -q + pipefail misfires)
                if [ -n "${RESIST_HOSTS:-}" ]; then  # a relaunch on the nodes still alive
                    local h spec=""
                    for h in ${RESIST_HOSTS//,/ }; do spec+="${spec:+,}$h:$RESIST_RANKS_PER_NODE"; done
                    cmd+=(-H "$spec")
                fi
                cmd+=(--map-by "ppr:$RESIST_RANKS_PER_NODE:node")
                # Open MPI reads SLURM allocations itself; a PBS one only when built with tm.
                if [ -z "${SLURM_JOB_ID:-}" ] && [ -n "${PBS_NODEFILE:-}" ]; then cmd+=(--hostfile "$PBS_NODEFILE"); fi
            else                                              # MPICH / Intel MPI (hydra)
                cmd+=(-ppn "$RESIST_RANKS_PER_NODE")
                # hydra takes a host list or a host file, not both (and has no -H): a relaunch
                # names the nodes still alive, a first launch reads the allocation's file
                if [ -n "${RESIST_HOSTS:-}" ]; then cmd+=(-hosts "$RESIST_HOSTS")
                elif [ -n "${PBS_NODEFILE:-}" ]; then cmd+=(-f "$PBS_NODEFILE"); fi
            fi ;;
        horovodrun)
            local hosts h spec=""
            hosts=$(_resist_hosts)
            for h in ${hosts//,/ }; do spec+="${spec:+,}$h:$RESIST_RANKS_PER_NODE"; done
            cmd=(horovodrun -np "$RESIST_NP" -H "$spec") ;;
        *)
            echo "resist: RESIST_LAUNCHER=$RESIST_LAUNCHER: choose srun, mpirun or horovodrun" >&2
            return 2 ;;
    esac
    # shellcheck disable=SC2206  # launcher options are meant to be split into words
    cmd+=(${RESIST_LAUNCHER_ARGS:-} "$RESIST_PYTHON" "$@")
    echo "resist: $RESIST_NP ranks ($RESIST_NODES nodes x $RESIST_RANKS_PER_NODE, $RESIST_GPUS_PER_NODE GPUs/node)" \
         "on $(_resist_hosts) via $RESIST_LAUNCHER"
    echo "resist: ${cmd[*]}"
    if [ "${RESIST_DRY_RUN:-0}" = 1 ]; then return 0; fi
    # The launcher runs in the background so this shell can pass a stop signal on: SLURM's
    # --signal=B:USR1@T signals the batch shell alone, and a preempting SIGTERM becomes a USR1 for
    # the launcher (mpirun would kill its ranks on TERM at once). The ranks then stop after the
    # round, save a checkpoint and exit with $RESIST_REQUEUE_EXIT (resist_mpi/cli/preempt.py).
    "${cmd[@]}" &
    local pid=$! rc=0
    trap 'echo "resist: stop signal: asking the ranks to checkpoint and stop"; kill -USR1 '"$pid"' 2>/dev/null' USR1 TERM
    wait "$pid" || rc=$?
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the launcher itself
        rc=0; wait "$pid" || rc=$?
    done
    _resist_catch_stop
    return "$rc"
}

# A stop signal while no launch runs (resist_train probing the nodes after a failure, the time
# between two runs of a job) sets _RESIST_STOP instead of ending the batch shell (USR1's own
# action), and resist_train then ends with $RESIST_REQUEUE_EXIT instead of launching: the job is
# requeued and goes on from its newest checkpoint.
_RESIST_STOP=0
_resist_catch_stop() {
    trap '_RESIST_STOP=1; echo "resist: stop signal while no launch runs: the job requeues instead of launching"' USR1 TERM
}

RESIST_REQUEUE_EXIT=99  # resist_mpi.cli.preempt.REQUEUE_EXIT: stopped on a signal, checkpoint written

# resist_finish STATUS: end the job script; a run that stopped on a signal requeues the job.
resist_finish() {
    local rc=$1
    if [ "$rc" -eq "$RESIST_REQUEUE_EXIT" ]; then
        if [ -n "${SLURM_JOB_ID:-}" ] && command -v scontrol >/dev/null; then
            echo "resist: stopped with a checkpoint; requeueing job $SLURM_JOB_ID (it resumes with --resume auto)"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
        elif [ -n "${PBS_JOBID:-}" ] && command -v qrerun >/dev/null; then
            echo "resist: stopped with a checkpoint; rerunning job $PBS_JOBID (it resumes with --resume auto)"
            qrerun "$PBS_JOBID" && exit 0
        fi
        echo "resist: stopped with a checkpoint; exit $rc asks the scheduler for a requeue (PBS Pro does)"
    fi
    exit "$rc"
}

# resist_train OUT [FLAGS...]: one training run into OUT with the job's settings, FLAGS, then
# RESIST_EXTRA_ARGS (last, so they override anything before them). When the run fails because a
# node was lost (a rank's exit 3, srun's node failure), it runs again on the nodes that are still
# alive, continuing from the newest complete checkpoint (--resume auto), RESIST_MAX_RESTARTS times
# at most; then it fails with a line that says why. A SLURM job needs --no-kill for this (else
# SLURM ends the whole job when a node fails): jobs/README.md, "Lost nodes". A launch whose rank
# was killed by a signal before the run wrote a checkpoint (a crash while MPI starts: seen with
# Open MPI 4.1.4 under srun --mpi=pmix) runs again on the same nodes, within the same limit.
resist_train() {
    local out=$1; shift
    local common rc restarts=0 hosts alive lost before word prev="" unfinished relaunch=()
    # shellcheck disable=SC2086  # RESIST_EXTRA_ARGS is a list of flags
    for word in $RESIST_EXTRA_ARGS; do  # a --resume PATH there would restart every requeue and relaunch from PATH
        if { [ "$prev" = --resume ] && [ "$word" != auto ]; } || { [[ $word == --resume=* ]] && [ "$word" != --resume=auto ]; }; then
            echo "resist: error: RESIST_EXTRA_ARGS holds --resume ${word#--resume=}: the job resumes with --resume auto" \
                 "itself, so that a requeue continues from the run's newest checkpoint, where a PATH would take it" \
                 "back to PATH every time; to start from another run's checkpoint, copy its folder into $out/checkpoints/" >&2
            return 2
        fi
        prev=$word
    done
    mapfile -t common < <(resist_train_args)
    _resist_catch_stop
    while :; do
        if [ "$_RESIST_STOP" = 1 ]; then return "$RESIST_REQUEUE_EXIT"; fi
        rc=0
        before=$(_resist_newest_checkpoint "$out")
        # shellcheck disable=SC2086  # RESIST_EXTRA_ARGS is a list of flags
        resist_launch -m resist_mpi.train "${common[@]}" --out "$out" "$@" ${relaunch[@]+"${relaunch[@]}"} $RESIST_EXTRA_ARGS || rc=$?
        unfinished=0
        if [ "$rc" -eq 0 ] && [ "${RESIST_DRY_RUN:-0}" != 1 ] && ! _resist_finished "$out"; then
            # srun has exited 0 for a step whose tasks failed to launch ("task 0 launch failed", seen
            # right after a requeue while slurmd still ended the old run): not a finished run
            echo "resist: the launch exited 0 but $out/metrics.jsonl does not end with the run's" \
                 "\"done\" record: the run did not train to its end" >&2
            rc=1 unfinished=1
        fi
        case $rc in  # done, bad input, diverged, stopped to be requeued: nothing a relaunch would fix
            0|2|4|"$RESIST_REQUEUE_EXIT") return "$rc" ;;
        esac
        if [ "$RESIST_MAX_RESTARTS" -le "$restarts" ]; then
            echo "resist: the run failed (exit $rc) and the restarts are used up ($restarts of RESIST_MAX_RESTARTS=$RESIST_MAX_RESTARTS)" >&2
            return "$rc"
        fi
        hosts=$(_resist_hosts)
        alive=$(_resist_alive_now "$hosts")
        if [ "$alive" = "$hosts" ]; then
            if [ "$rc" -gt 128 ] && [ "$(_resist_newest_checkpoint "$out")" = "$before" ]; then
                restarts=$((restarts + 1))
                echo "resist: a rank was killed by signal $((rc - 128)) before the launch wrote a checkpoint" \
                     "(exit $rc) and every node still answers: launching again on the same nodes, restart" \
                     "$restarts of $RESIST_MAX_RESTARTS" >&2
                continue
            fi
            if [ "$unfinished" = 1 ]; then
                restarts=$((restarts + 1))
                echo "resist: every node still answers: launching again on the same nodes (from the newest" \
                     "checkpoint), restart $restarts of $RESIST_MAX_RESTARTS" >&2
                continue
            fi
            echo "resist: the run failed (exit $rc) and every node still answers: not a lost node, no relaunch" >&2
            return "$rc"
        fi
        if [ -z "$alive" ]; then
            echo "resist: the run failed (exit $rc) and no node of the job answers: nowhere to relaunch" >&2
            return "$rc"
        fi
        lost=$(comm -23 <(tr , '\n' <<<"$hosts" | sort) <(tr , '\n' <<<"$alive" | sort) | paste -sd, -)
        restarts=$((restarts + 1))
        RESIST_HOSTS=$alive
        # --out on NFS keeps the lost node's lock on it until its lease ends (~90 s with NFSv4): wait for it
        relaunch=(--lock-wait "$RESIST_LOCK_WAIT")
        RESIST_NODES=$(tr , '\n' <<<"$alive" | grep -c .)
        RESIST_NP=$((RESIST_NODES * RESIST_RANKS_PER_NODE))
        echo "resist: lost $lost (exit $rc); relaunching on $RESIST_NODES nodes ($alive), restart $restarts of" \
             "$RESIST_MAX_RESTARTS, from the newest checkpoint"
    done
}

# Whether run directory $1 holds a finished run: its metrics.jsonl ends with the "done" record
# (resist_mpi.cli.metrics.finished).
_resist_finished() {
    [ -r "$1/metrics.jsonl" ] && [[ $(grep -v '^[[:space:]]*$' "$1/metrics.jsonl" | tail -n 1) == '{"event": "done"'* ]]
}

# The newest complete checkpoint of run directory $1 (its manifest is written last), or nothing.
_resist_newest_checkpoint() {
    local m newest=""
    for m in "$1"/checkpoints/ckpt-*/manifest.json; do  # the glob sorts: ckpt-000012 after ckpt-000009
        if [ -e "$m" ]; then newest=${m%/manifest.json}; fi
    done
    echo "$newest"
}

# The hosts (comma-separated) of $1 that are still alive, in their order. A host is lost when the
# scheduler already says so (SLURM: sinfo shows it not responding, down, drained or failed) or when
# it does not answer a probe within RESIST_NODE_WAIT seconds: under SLURM a one-task step running
# `true` there (srun --overlap: the failed step may still hold the CPUs), else a ping. The probes
# run at once, so a crash while every node answers is known in a second or two, and a lost node
# without waiting for SLURM's SlurmdTimeout (300 s by default) to mark it.
_resist_probe() {
    if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
        local end=$((SECONDS + RESIST_NODE_WAIT)) left=$RESIST_NODE_WAIT
        # a step refused at once (slurmd still ending the job's last one) is asked again until then
        until timeout "$left" srun --overlap --nodes=1 --ntasks=1 --nodelist="$1" --quiet true >/dev/null 2>&1; do
            if [ $((end - SECONDS)) -lt 2 ]; then return 1; fi
            sleep 1
            left=$((end - SECONDS > 0 ? end - SECONDS : 1))
        done
    else
        ping -c 1 -W 2 "$1" >/dev/null 2>&1
    fi
}

_resist_alive_now() {
    local h out="" answered
    answered=$(mktemp -d)
    for h in ${1//,/ }; do
        if [ -n "${SLURM_JOB_ID:-}" ] && command -v sinfo >/dev/null; then
            # %t: the state, with * when the node does not respond; down/drain/fail: not usable
            case $(sinfo -h -N -n "$h" -o %t 2>/dev/null | head -1) in
                *"*"*|down*|drain*|fail*|"") continue ;;
            esac
        fi
        { _resist_probe "$h" && touch "$answered/$h"; } &
    done
    wait
    for h in ${1//,/ }; do
        if [ -e "$answered/$h" ]; then out+="${out:+,}$h"; fi
    done
    rm -rf "$answered"
    echo "$out"
}
