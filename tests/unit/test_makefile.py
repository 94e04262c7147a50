"""The Makefile: its gate on the Horovod build (a warning on a user's machine, a failure under CI),
its targets, and how `make test` runs the tiers."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gate(ci):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    # HOROVOD_BUILD=false: a build that fails
    return subprocess.run(["make", "-s", "horovod-or-warn", "HOROVOD_BUILD=false"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_failed_horovod_build_fails_ci():
    p = _gate(ci=True)
    assert p.returncode != 0
    assert "the Horovod build failed under CI=true" in p.stderr


def test_failed_horovod_build_only_warns_elsewhere():
    p = _gate(ci=False)
    assert p.returncode == 0
    assert "WARNING: the Horovod build failed" in p.stderr


def test_ci_entry_point_runs_make_test_under_ci():
    text = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "export CI=true" in text and "make test" in text


def test_phony_targets_exist_and_test_runs_lint_and_docs():
    import re
    text = open(os.path.join(ROOT, "Makefile")).read()
    rules = set(re.findall(r"^([\w-]+):", text, re.M))
    phony = {t for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for t in line.split()}
    assert phony and phony <= rules, phony - rules
    test_rule = re.search(r"^test:(.*)$", text, re.M).group(1).split()
    assert "lint" in test_rule and "docs" in test_rule


@pytest.mark.parametrize("unit_rc, launching_rc", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_make_test_runs_both_tiers_and_fails_when_either_fails(tmp_path, unit_rc, launching_rc):
    """`make test` runs the unit tier beside the launching tests: both always run to the end, the
    unit tier's output is printed after theirs, and either one failing fails the target."""
    unit = f"sh -c 'echo unit tier ran; exit {unit_rc}' --"
    launching = f"sh -c 'sleep 0.5; echo launching tests ran; exit {launching_rc}' --"
    p = subprocess.run(["make", "-s", "test-tiers", f"UNIT={unit}", f"LAUNCHING={launching}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode == 0) == (unit_rc == 0 and launching_rc == 0), p.stdout + p.stderr
    out = p.stdout
    assert "launching tests ran" in out and "unit tier ran" in out
    assert out.index("launching tests ran") < out.index("unit tier ran")  # its log follows theirs
