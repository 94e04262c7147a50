"""Every command in README.md, jobs/README.md and docs/*.md is checked, or says what it needs that CI lacks.

Each command line of a ```bash block ends with a comment in parentheses:

  (run by tests/e2e/test_docs.py)            this test runs it as written, from the repository root
  (run by .ci/run)                           CI's entry point runs it (`make test`)
  (dry run in tests/e2e/test_docs.py)        an `sbatch`/`qsub` of a job script: this test runs the
                                             script with RESIST_DRY_RUN=1 in the environment the
                                             scheduler would give it (the options and #SBATCH/#PBS
                                             lines turned into SLURM_*/PBS_* variables) and checks
                                             the launch command it prints
  (tested: tests/e2e/FILE.py::TEST)          that test runs it (the test must exist)
  (needs ...)                                needs what CI does not have (a GPU, a cluster, data)

One marker may combine "needs ..." with a dry run. The python example of the README must be
examples/horovod_style.py, line for line (tests/e2e/test_examples.py runs that file).
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT, documented_env, requires, run_documented

DOCS = ["README.md", "jobs/README.md", "docs/index.md", "docs/usage.md", "docs/library.md", "docs/method.md",
        "docs/backends.md", "docs/multinode.md", "docs/checkpoints.md", "docs/benchmarks.md", "docs/testing.md",
        "docs/departures.md", "docs/layout.md"]
MARKER = re.compile(r"#\s*\((?P<marker>[^()]*)\)\s*$")


def blocks(path, lang):
    """(line number, text) of every ```lang block of a markdown file."""
    lines, out, inside, start = (ROOT / path).read_text().splitlines(), [], False, 0
    for n, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            if inside:
                out.append((start, "\n".join(lines[start:n - 1])))
                inside = False
            elif line.strip() == "```" + lang:
                inside, start = True, n
    return out


def commands(path):
    """(doc:line, command, marker) of every command of the ```bash blocks (continuations joined)."""
    out = []
    for start, text in blocks(path, "bash"):
        pending, first = "", None
        for k, line in enumerate(text.splitlines()):
            if not pending and (not line.strip() or line.strip().startswith("#")):
                continue
            first = first if pending else start + k + 1
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            full = pending + line
            pending = ""
            m = MARKER.search(full)
            command = full[:m.start()].strip() if m else full.strip()
            out.append((f"{path}:{first}", command, m.group("marker").strip() if m else None))
    return out


ALL = [c for path in DOCS for c in commands(path)]


def test_every_command_says_how_it_is_checked():
    assert len(ALL) > 10
    for where, command, marker in ALL:
        assert marker, f"{where}: `{command}` has no (run by / dry run / tested: / needs ...) comment"
        ok = ("run by tests/e2e/test_docs.py" in marker or "dry run in tests/e2e/test_docs.py" in marker
              or marker.startswith("needs ") or marker.startswith("tested: ") or marker == "run by .ci/run")
        assert ok, f"{where}: unknown marker ({marker})"
        if marker == "run by .ci/run":
            ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
            assert command in ci, f"{where}: .ci/run does not run `{command}`"
        if marker.startswith("tested: "):
            path, _, name = marker[len("tested: "):].partition("::")
            text = (ROOT / path).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", text, re.M), f"{where}: {path} has no test {name}"


RUN = [c for c in ALL if c[2] and "run by tests/e2e/test_docs.py" in c[2]]
CLUSTER = "resist_mpi.cluster"


@pytest.fixture(scope="module")
def simulated_cluster():
    """The README's cluster commands use the CLI's default cluster: tear down a stale one before them,
    and whatever they left after them, also when one failed."""
    from resist_mpi.tools.cluster import why_unavailable
    reason = why_unavailable()
    if reason:
        pytest.skip(f"simulated cluster: {reason}")
    down = [sys.executable, "-m", CLUSTER, "down"]
    subprocess.run(down, cwd=ROOT, capture_output=True, timeout=120)  # a stale one, its state in /tmp
    yield
    subprocess.run(down, cwd=ROOT, env=documented_env(), capture_output=True, timeout=120)  # the commands' own


@requires("mpi")
@pytest.mark.parametrize("where, command, marker", RUN, ids=[c[0] for c in RUN])
def test_documented_command_runs(request, tmp_path, where, command, marker):
    if "horovodrun" in command and importlib.util.find_spec("horovod") is None:
        pytest.skip("Horovod is not installed (make horovod)")
    if CLUSTER in command:
        request.getfixturevalue("simulated_cluster")
    p = run_documented(command)
    assert p.returncode == 0, f"{where}: `{command}` exited {p.returncode}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}"


# -- dry runs of the job scripts --------------------------------------------------------------------
def scheduler_env(tool, options, script, nodefile):
    """What SLURM or PBS would put in the job's environment for `tool options script`."""
    defaults = []
    for line in (ROOT / script).read_text().splitlines():  # the script's own #SBATCH / #PBS options first
        if line.startswith("#SBATCH ") or line.startswith("#PBS "):
            defaults += shlex.split(line.split(" ", 1)[1])
    env = {"RESIST_DRY_RUN": "1"}
    if tool == "sbatch":
        env.update(SLURM_JOB_ID="42", SLURM_JOB_NAME="job", RESIST_SRUN_MPI="pmix")
        names = {"--nodes": "SLURM_JOB_NUM_NODES", "--ntasks-per-node": "SLURM_NTASKS_PER_NODE",
                 "--gpus-per-node": "SLURM_GPUS_ON_NODE", "--cpus-per-task": "SLURM_CPUS_PER_TASK"}
        for opt in defaults + options:
            key, _, value = opt.partition("=")
            if key in names:
                env[names[key]] = value
        return env
    env.update(PBS_JOBID="42.server", PBS_JOBNAME="job")
    nodes, per_node = 1, 1
    args = defaults + options
    for k, opt in enumerate(args):
        if opt == "-l" and k + 1 < len(args):
            fields = dict(f.split("=", 1) if "=" in f else (f, "") for f in re.split(r"[:,]", args[k + 1]))
            nodes = int(fields.get("nodes") or fields.get("select") or nodes)
            per_node = int(fields.get("ppn") or fields.get("mpiprocs") or per_node)
        if opt == "-v" and k + 1 < len(args):
            env.update(dict(v.split("=", 1) for v in args[k + 1].split(",")))
    nodefile.write_text("".join(f"n{i}\n" * per_node for i in range(nodes)))
    env["PBS_NODEFILE"] = str(nodefile)
    return env


DRY = [c for c in ALL if c[2] and "dry run in tests/e2e/test_docs.py" in c[2]]


@pytest.mark.parametrize("where, command, marker", DRY, ids=[c[0] for c in DRY])
def test_documented_job_submission_as_a_dry_run(tmp_path, where, command, marker):
    words = shlex.split(command)
    assigned = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        assigned[key] = os.path.expandvars(value)
    tool, options, script = words[0], words[1:-1], words[-1]
    assert tool in ("sbatch", "qsub") and (ROOT / script).is_file(), where
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           **scheduler_env(tool, options, script, tmp_path / "nodefile"), **assigned}
    p = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{where}: {p.stdout}{p.stderr}"
    launches = [line for line in p.stdout.splitlines() if line.startswith("resist: ") and " ranks " not in line]
    assert launches, p.stdout
    ranks = re.search(r"resist: (\d+) ranks \((\d+) nodes x (\d+)", p.stdout)
    assert ranks and int(ranks.group(1)) == int(ranks.group(2)) * int(ranks.group(3)), p.stdout
    for line in launches:
        assert "resist_mpi.train" in line or "comm_bench.py" in line, line
        if "RESIST_CONFIG" in assigned:
            assert f"--config {assigned['RESIST_CONFIG']}" in line and "--dataset" not in line, line


# -- the README's python example -----------------------------------------------------------------------
def test_readme_library_example_is_the_example_file():
    """The README's script is examples/horovod_style.py without its docstring, line for line, so the
    run of that file (tests/e2e/test_examples.py: 2 ranks, at least 95%) is the run of the README's."""
    [(_, code)] = [b for b in blocks("README.md", "python") if "rm.ResIST(" in b[1]]
    text = (ROOT / "examples" / "horovod_style.py").read_text()
    assert text.startswith('"""')
    assert code.strip("\n") == text[text.index('"""', 3) + 3:].strip("\n")


def test_make_setup_is_idempotent():
    """`make setup` on a machine that has it already does nothing and succeeds (CI runs it fresh)."""
    p = subprocess.run(["make", "-s", "setup"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
