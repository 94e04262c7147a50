"""The training CLI end to end under mpirun: accuracy, baselines, warm-up, resume, bad input, records,
and whole-job behaviour (a failing or unreachable rank)."""
import json
import os
import time

import pytest

from helpers import ROOT, have_mpirun, mpirun

pytestmark = pytest.mark.skipif(not have_mpirun(), reason="mpirun not found (run `make setup`)")


def test_failing_rank_aborts_job_fast(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(
        "from resist_mpi import comm\n"
        "c = comm.init('mpi')\n"
        "if c.rank == 1:\n"
        "    raise RuntimeError('rank one fails')\n"
        "c.barrier()  # the others would wait here forever\n")
    t0 = time.time()
    p = mpirun(4, [str(script)], timeout=60)
    assert time.time() - t0 < 30
    assert p.returncode != 0
    assert p.stderr.count("RuntimeError: rank one fails") == 1
    assert "[rank 1/4] uncaught exception" in p.stderr


def test_unreachable_rank_ends_job_with_one_line(tmp_path):
    """A rank that stops answering (SIGSTOP: like a node whose link is cut) makes the others' watchdog
    abort the job with one line naming it, instead of waiting in the collective for ever."""
    script = tmp_path / "lost.py"
    script.write_text(
        "import os, signal, time\n"
        "from resist_mpi import comm\n"
        "from resist_mpi.watchdog import Watchdog\n"
        "c = comm.init('mpi')\n"
        "wd = Watchdog(c, timeout=3, probe_timeout=2)\n"
        "wd.beat('the test phase')\n"
        "if c.rank == 2:\n"
        "    os.kill(os.getpid(), signal.SIGSTOP)\n"
        "    time.sleep(120)  # Open MPI sends SIGCONT before it kills: stay as silent as a cut-off node\n"
        "c.barrier()\n"
        "print('passed the barrier')\n")
    t0 = time.time()
    p = mpirun(3, [str(script)], timeout=90)
    assert time.time() - t0 < 60
    assert p.returncode != 0 and "passed the barrier" not in p.stdout
    errors = [line for line in p.stderr.splitlines() if line.startswith("resist_mpi: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith("resist_mpi: error: lost rank 2 (") and "in the test phase" in errors[0]


def _train(np_, out, *args, timeout=600):
    return mpirun(np_, ["-m", "resist_mpi.train", "--out", str(out), "--progress", "off", *args], timeout=timeout)


def _records(out, event):
    from resist_mpi.metrics import read_metrics
    return read_metrics(str(out), event)


def test_demo_resist_4_ranks_reaches_95_percent(tmp_path):
    """`make demo`'s run. Bar: a thin ResNet on these digits reaches ~98% (measured 98.3%); the paper
    reports ResIST within about a point of local SGD; 0.95 leaves room for seed and platform noise."""
    p = _train(4, tmp_path, "--config", os.path.join(ROOT, "configs", "demo.yaml"))
    assert p.returncode == 0, p.stderr[-3000:]
    final = _records(tmp_path, "eval")[-1]
    assert final["test_acc"] >= 0.95, final
    assert f"final test accuracy: {100 * final['test_acc']:.2f}%" in p.stdout
    rounds = _records(tmp_path, "round")
    keys = {"round", "epoch", "strategy", "world_size", "train_loss", "train_acc", "lr", "bytes_sent",
            "bytes_recv", "t_compute", "t_comm", "wallclock"}
    assert keys <= set(rounds[0]) and rounds[0]["world_size"] == 4
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    # every round moves blocks and the shared layers; sent == received over the whole job
    assert all(r["bytes_sent"] == r["bytes_recv"] > 0 for r in rounds)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["config"]["strategy"] == "resist" and cfg["world_size"] == 4


@pytest.mark.parametrize("strategy", ["local_sgd", "data_parallel"])
def test_baselines_train_from_same_cli(tmp_path, strategy):
    p = _train(4, tmp_path, "--strategy", strategy, "--model", "preact_resnet18", "--width", "8",
               "--epochs", "3", "--batch-size", "32", "--lr", "0.1", "--local-steps", "5")
    assert p.returncode == 0, p.stderr[-3000:]
    # it learned: chance is 0.1; 3 short epochs reached 0.58-0.98 here (accuracy parity with ResIST
    # at equal epochs is measured by benchmarks/compare.py, not asserted in a 30 s test)
    assert _records(tmp_path, "eval")[-1]["test_acc"] > 0.4
    assert {r["strategy"] for r in _records(tmp_path, "round")} == {strategy}


def test_warmup_switches_to_resist(tmp_path):
    p = _train(2, tmp_path, "--model", "preact_resnet34", "--width", "4", "--epochs", "2", "--warmup-epochs", "1",
               "--batch-size", "64", "--local-steps", "5", "--eval-every", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    rounds = _records(tmp_path, "round")
    switch = _records(tmp_path, "switch")
    assert len(switch) == 1 and switch[0]["to"] == "resist"
    assert rounds[0]["strategy"] == "local_sgd" and rounds[-1]["strategy"] == "resist"


@pytest.mark.parametrize("np_, extra", [(2, []), (2, ["--keep-shared-momentum"]), (2, ["--strategy", "data_parallel"]),
                                         (4, ["--group-size", "2"]),
                                         (4, ["--group-size", "2", "--strategy", "local_sgd"]),
                                         (4, ["--group-size", "2", "--wire-dtype", "int8"])],
                         ids=["resist", "resist-momentum", "data_parallel", "resist-groups", "local_sgd-groups",
                              "resist-groups-int8"])
def test_resume_continues_bit_for_bit(tmp_path, np_, extra):
    """Optimizer state that outlives a round (shared momentum per rank, data-parallel's optimizer)
    must come back too, or the resumed run drifts; with groups, every member must continue from
    its group's copy; with a compressed wire, every rank's error feedback."""
    args = ["--model", "preact_resnet34", "--width", "4", "--epochs", "2", "--batch-size", "64",
            "--local-steps", "4", "--checkpoint-every", "1", "--keep-checkpoints", "5", *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(np_, full, *args).returncode == 0
    ckpts = sorted(p for p in os.listdir(full / "checkpoints") if ".rank" not in p)
    assert len(ckpts) == 2  # after epoch 1 and at the end
    os.makedirs(part / "checkpoints")
    import shutil
    for name in os.listdir(full / "checkpoints"):  # the epoch-1 checkpoint and its per-rank companions
        if name.startswith(ckpts[0][:-3]):
            shutil.copy(full / "checkpoints" / name, part / "checkpoints" / name)
    p = _train(np_, part, *args, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    import torch
    a = torch.load(full / "checkpoints" / ckpts[1], weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / ckpts[1], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(full, "eval")[-1]["test_loss"] == _records(part, "eval")[-1]["test_loss"]
    # the resumed rounds are the uninterrupted run's rounds, their traffic included
    keys = ("round", "train_loss", "bytes_sent", "bytes_recv")
    resumed = _round_records(part, *keys)
    assert resumed and resumed == _round_records(full, *keys)[-len(resumed):]
    assert _records(part, "resume")[0]["round"] == resumed[0]["round"] > 0
    if np_ == 2 and not extra:  # another world size trains on from the same checkpoint (a new partition)
        p = _train(4, tmp_path / "np4", *args, "--resume", str(full / "checkpoints" / ckpts[0]))
        assert p.returncode == 0, p.stderr[-3000:]
        assert _records(tmp_path / "np4", "round")[0]["round"] > 0


def _bad_checkpoint(tmp_path, kind):
    path = tmp_path / "bad.pt"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    else:  # a real checkpoint of another model
        assert _train(1, tmp_path / "other", "--model", "preact_resnet18", "--width", "4", "--epochs", "1",
                      "--checkpoint-every", "1", "--batch-size", "256", "--min-depth", "1").returncode == 0
        path = next((tmp_path / "other" / "checkpoints").iterdir())
    return str(path)


def _truncated_h5(tmp_path):
    """A real packed dataset cut in half, as an interrupted copy leaves it."""
    from resist_mpi.data import main as data_main
    full = tmp_path / "digits.h5"
    assert data_main(["pack", "digits", str(full)]) == 0
    cut = tmp_path / "cut.h5"
    cut.write_bytes(full.read_bytes()[: os.path.getsize(full) // 2])
    return str(cut)


def _image_folder(tmp_path, size):
    from PIL import Image
    import numpy as np
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(tmp_path / "folder")


@pytest.mark.parametrize("np_,args,message", [
    (2, ["--min-depth", "99"], "exceeds the 22 partitionable blocks"),
    (2, ["--model", "resnet_nope"], "unknown model"),
    (4, ["--model", "preact_resnet18"], "4 ranks but only 1 partitionable blocks"),
    (2, ["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "cifar10"),
    (2, ["--epochs", "0"], "--epochs must be at least 1"),
    (2, ["--resume", "CORRUPT"], "corrupt or truncated"),
    (2, ["--resume", "OTHER"], "holds preact_resnet18"),
    (2, ["--dataset", "hdf5", "--data-dir", "TRUNCATED_H5"], "TRUNCATED_H5"),
    (2, ["--dataset", "imagefolder", "--data-dir", "FOLDER64"], "expects 32x32"),
    (2, ["--device", "cuda:7"], "device cuda:7 requested but only"),
    (2, ["--device", "cuda"], "no GPU is visible"),
    (2, ["--device", "gpu"], "--device 'gpu': use auto, cpu, cuda"),
    (2, ["--overwrite", "--resume", "auto"], "--overwrite starts afresh and --resume continues"),
    (4, ["--group-size", "3"], "--group-size 3: the 4 ranks do not split into groups of 3"),
    (2, ["--group-size", "two"], "--group-size 'two': give a number of ranks per group, or 'node'"),
    (2, ["--group-size", "2", "--strategy", "data_parallel"], "--group-size applies to resist and local_sgd"),
])
def test_bad_input_one_line_nonzero_everywhere(tmp_path, np_, args, message):
    made = {"TRUNCATED_H5": lambda: _truncated_h5(tmp_path), "FOLDER64": lambda: _image_folder(tmp_path, 64),
            "CORRUPT": lambda: _bad_checkpoint(tmp_path, "corrupt"), "OTHER": lambda: _bad_checkpoint(tmp_path, "other")}
    args = [made[a]() if a in made else a for a in args]
    message = str(args[-1]) if message in made else message
    before = {p: os.path.getsize(p) for p in args if os.path.isfile(p)}
    t0 = time.time()
    p = _train(np_, tmp_path / "run", "--width", "4", "--epochs", "1", *args, timeout=120)
    assert p.returncode != 0
    assert time.time() - t0 < 60
    errors = [line for line in p.stderr.splitlines() if line.startswith("resist_mpi: error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert before == {q: os.path.getsize(q) for q in before}  # the user's files are untouched


def test_out_dir_holding_a_run_is_never_overwritten_unasked(tmp_path):
    """A second run into the same --out stops with one line and leaves the first run's files as
    they were; --overwrite starts afresh (old checkpoints gone), --resume auto continues."""
    args = ["--model", "preact_resnet18", "--width", "4", "--epochs", "1", "--batch-size", "256",
            "--min-depth", "1", "--checkpoint-every", "1"]
    out = tmp_path / "run"
    assert _train(2, out, *args).returncode == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    p = _train(2, out, *args, "--seed", "1")
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("resist_mpi: error:")]
    assert errors == [f"resist_mpi: error: --out {out} holds a run; pass --resume auto to continue it, or --overwrite"]
    assert files == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    p = _train(2, out, *args, "--resume", "auto")  # finished: loads its last checkpoint, trains nothing
    assert p.returncode == 0, p.stderr[-2000:]
    assert _records(out, "round") == [r for r in (json.loads(line) for line in files[out / "metrics.jsonl"].decode()
                                                  .splitlines()) if r["event"] == "round"]
    (out / "checkpoints" / "ckpt-000099.pt").write_bytes(files[next(iter(sorted((out / "checkpoints").glob("*.pt"))))])
    p = _train(2, out, *args, "--seed", "1", "--overwrite")
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(q.name for q in (out / "checkpoints").iterdir()) == ["ckpt-000001.pt"]  # the old run's are gone
    assert json.load(open(out / "config.json"))["config"]["seed"] == 1


def _round_records(out, *keys):
    return [{k: r[k] for k in keys} for r in _records(out, "round")]


def test_round_records_do_not_depend_on_evaluation_or_loader_workers(tmp_path):
    """Evaluation gathers every block, then each rank goes back to its own sub-ResNet: the next
    round moves (and its record counts) what it would have without the evaluation. DataLoader
    workers (--workers 2) deliver the very batches of --workers 0, evaluation's reads included."""
    args = ["--model", "preact_resnet34", "--width", "4", "--epochs", "3", "--batch-size", "64",
            "--local-steps", "4", "--bn-batches", "2"]
    keys = ("round", "train_loss", "bytes_sent", "bytes_recv")
    assert _train(2, tmp_path / "final", *args, "--eval-every", "0").returncode == 0
    p = _train(2, tmp_path / "every", *args, "--eval-every", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(_records(tmp_path / "every", "eval")) == 3 and len(_records(tmp_path / "final", "eval")) == 1
    assert _round_records(tmp_path / "every", *keys) == _round_records(tmp_path / "final", *keys)
    assert all(r["bytes_sent"] > 0 for r in _round_records(tmp_path / "every", *keys)[1:])
    evals = _records(tmp_path / "every", "eval")
    assert all(e["bytes_sent"] > 0 for e in evals)  # the gather is counted where it happens
    p = _train(2, tmp_path / "workers", *args, "--eval-every", "1", "--workers", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _round_records(tmp_path / "workers", *keys) == _round_records(tmp_path / "every", *keys)
    assert [(e["test_loss"], e["test_acc"]) for e in _records(tmp_path / "workers", "eval")] == \
        [(e["test_loss"], e["test_acc"]) for e in evals]


def test_imagenet_style_model_trains_on_image_folder(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")
    p = _train(2, tmp_path / "run", "--model", "preact_resnet50_imagenet", "--width", "4", "--dataset",
               "imagefolder", "--data-dir", str(tmp_path / "data"), "--image-size", "64", "--epochs", "1",
               "--batch-size", "4", "--local-steps", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    rounds = _records(tmp_path / "run", "round")
    assert len(rounds) == 1 and rounds[0]["bytes_sent"] > 0  # 2 steps = one round (8 images per rank)
    assert 0.0 <= _records(tmp_path / "run", "eval")[-1]["test_acc"] <= 1.0


@pytest.mark.parametrize("np_", [2, 4])
def test_sync_bench_times_what_it_says(tmp_path, np_):
    """sync_bench on a thin ResNet-101: the payload it measured equals the plans' and the ring's bytes."""
    import json

    from resist_mpi import traffic
    from resist_mpi.comm import ring_allreduce_bytes
    from resist_mpi.models import create_model

    out = tmp_path / "sync.json"
    p = mpirun(np_, ["benchmarks/sync_bench.py", "--width", "4", "--rounds", "4", "--warmup", "2",
                     "--json", str(out)], timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "efficiency_vs_raw" in p.stdout
    res = json.loads(out.read_text())
    sizes = traffic.model_sizes(create_model("preact_resnet101", 100, 4))
    assert res["elements"]["full"] == sizes.full and res["warmup_rounds"] == 2 and res["rounds_timed"] == 4
    # the package's counters: the local-SGD allreduce, and ResIST's exchange equal to the plans' bytes
    # (resist_exchange is what the raw Alltoallv moved, from the plans' counts) plus the shared allreduce
    b = res["bytes_sent_per_round_all_ranks"]
    assert b["local_sgd"] == np_ * ring_allreduce_bytes(4 * sizes.full, np_)
    shared = np_ * ring_allreduce_bytes(4 * sizes.shared, np_)
    assert b["resist_total"] - b["resist_exchange"] == pytest.approx(shared, rel=1e-12)
    assert 0 < res["efficiency_vs_raw"] and 0 < res["resist_over_local_sgd"]
