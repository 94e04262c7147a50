"""The scripts in examples/ run as a user runs them, under mpirun, and reach what they promise.

examples/horovod_style.py: a torchvision ResNet-18 on the embedded digits with ResIST in a
Horovod-shaped loop (one optimizer, one scheduler), 2 ranks, at least 95% test accuracy (the
README's script is this file: tests/e2e/test_docs.py); then the same script with its one strategy
line switched to local SGD, for 2 epochs, which must train too (at least 80%).
"""
import re


from helpers import ROOT, mpirun, requires

pytestmark = requires("mpi", "slow")
SCRIPT = ROOT / "examples" / "horovod_style.py"
RESIST_LINE = "    job = rm.ResIST(model, c, optimizer=opt, scheduler=sched, local_steps=LOCAL_STEPS, stages=(2, 3, 4))"
EPOCHS_LINE = "EPOCHS, LOCAL_STEPS = 4, 8"


def _accuracy(p, strategy):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    found = re.search(rf"^{strategy}: test accuracy ([\d.]+)%", p.stdout, re.M)
    assert found, p.stdout[-2000:]
    return float(found.group(1)) / 100


def test_resnet18_with_resist_in_a_horovod_shaped_loop():
    assert _accuracy(mpirun(2, [str(SCRIPT)], timeout=600), "resist") >= 0.95


def test_the_same_script_switched_to_local_sgd_by_one_line(tmp_path):
    """The strategy line alone changes; the run is shortened to 2 epochs (local SGD's exact values
    are tests/unit/test_library.py's; this is the switch and the script around it)."""
    text = SCRIPT.read_text()
    assert text.count(RESIST_LINE) == 1 and text.count(EPOCHS_LINE) == 1
    local_sgd = "    job = rm.LocalSGD(model, c, optimizer=opt, scheduler=sched, local_steps=LOCAL_STEPS)"
    switched = text.replace(RESIST_LINE, local_sgd)
    diff = [(a, b) for a, b in zip(text.splitlines(), switched.splitlines()) if a != b]
    assert len(diff) == 1  # one line
    script = tmp_path / "local_sgd_digits.py"
    script.write_text(switched.replace(EPOCHS_LINE, "EPOCHS, LOCAL_STEPS = 2, 8"))
    assert _accuracy(mpirun(2, [str(script)], timeout=600), "local_sgd") >= 0.8
