"""The scripts in examples/ run as a user runs them, under mpirun, and reach what they promise.

examples/horovod_style.py: a torchvision ResNet-18 on the embedded digits with ResIST in a
Horovod-shaped loop (one optimizer, one scheduler), 2 ranks, at least 95% test accuracy; then the
same script with its one strategy line switched to local SGD, which must train too.
"""
import re


from helpers import ROOT, mpirun, requires

pytestmark = requires("mpi", "slow")
SCRIPT = ROOT / "examples" / "horovod_style.py"
RESIST_LINE = "    job = rm.ResIST(model, c, optimizer=opt, local_steps=LOCAL_STEPS, stages=(2, 3, 4))"


def _accuracy(p, strategy):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    found = re.search(rf"^{strategy}: test accuracy ([\d.]+)%", p.stdout, re.M)
    assert found, p.stdout[-2000:]
    return float(found.group(1)) / 100


def test_resnet18_with_resist_in_a_horovod_shaped_loop():
    assert _accuracy(mpirun(2, [str(SCRIPT)], timeout=600), "resist") >= 0.95


def test_the_same_script_switched_to_local_sgd_by_one_line(tmp_path):
    text = SCRIPT.read_text()
    assert text.count(RESIST_LINE) == 1
    switched = tmp_path / "local_sgd_digits.py"
    switched.write_text(text.replace(RESIST_LINE, "    job = rm.LocalSGD(model, c, optimizer=opt, local_steps=LOCAL_STEPS)"))
    diff = [(a, b) for a, b in zip(text.splitlines(), switched.read_text().splitlines()) if a != b]
    assert len(diff) == 1  # one line
    assert _accuracy(mpirun(2, [str(switched)], timeout=600), "local_sgd") >= 0.9
