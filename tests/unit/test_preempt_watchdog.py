"""Stop signals (resist_mpi.preempt) and the lost-peer watchdog's pure parts (resist_mpi.watchdog)."""
import os
import signal
import socket
import subprocess
import sys
import threading

from resist_mpi.cli.preempt import REQUEUE_EXIT, StopRequest
from resist_mpi.cli.watchdog import ANSWERED, ENDED, SILENT, lost_line, probe, probe_address, reporters


def test_stop_signals_only_set_a_flag_and_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process with the default handler
        assert stop.requested and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert REQUEUE_EXIT == 99  # jobs/common.sh's RESIST_REQUEUE_EXIT
    assert "RESIST_REQUEUE_EXIT=99" in open(os.path.join(os.path.dirname(__file__), "..", "..", "jobs",
                                                          "common.sh")).read()


def test_probe_address_same_host_loopback_other_host_its_address():
    me = ("node0", "10.0.0.1", 5000)
    assert probe_address(me, ("node0", "10.0.0.1", 6000)) == ("127.0.0.1", 6000)
    assert probe_address(me, ("node1", "10.0.0.2", 6001)) == ("10.0.0.2", 6001)
    # a peer whose hostname resolves to loopback on its own host cannot be probed from here: it is
    # never taken for lost (no false abort)
    assert probe_address(me, ("node2", "127.0.1.1", 6002)) is None


def test_probe_tells_an_answer_an_ended_process_and_silence_apart():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"+")

    t = threading.Thread(target=answer)
    t.start()
    assert probe(("127.0.0.1", port), 2.0) == ANSWERED
    t.join()
    silent = socket.socket()  # accepts (backlog) but never answers: a stopped process, a cut link
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    assert probe(("127.0.0.1", silent.getsockname()[1]), 0.5) == SILENT
    server.close()
    silent.close()
    # nothing listens any more: the host refuses, so the process has ended
    assert probe(("127.0.0.1", port), 0.5) == ENDED


def test_the_lost_peer_line_names_the_silent_first_then_the_ended():
    hosts = ["node0", "node1", "node2", "node3"]
    line = lost_line({3: SILENT}, hosts, 5, 12.4, "the local steps")
    assert line == ("resist_mpi: error: lost rank 3 (node3): no answer for 5 s; after 12 s without progress in "
                    "the local steps; aborting the job (rerun with --resume auto to continue from the last checkpoint)")
    line = lost_line({1: ENDED, 3: ENDED, 2: SILENT}, hosts, 5, 10, "evaluation")
    assert line.startswith("resist_mpi: error: lost rank 2 (node2): no answer for 5 s; rank 1 (node1), rank 3 (node3): "
                           "process ended (its host refused the probe); after 10 s without progress in evaluation; ")
    assert "\n" not in line


def test_reporters_one_line_per_job_log_or_per_node_log():
    hosts = ["node0", "node0", "node1", "node1", "node2", "node2", "node3", "node3"]
    # mpirun/srun: the ranks' output meets in one log, so the lowest rank left prints alone
    assert reporters([6, 7], hosts, per_node_logs=False) == [0]
    assert reporters([0, 1], hosts, per_node_logs=False) == [2]
    # torchrun: every surviving node's agent log gets its line, from its lowest rank left
    assert reporters([6, 7], hosts, per_node_logs=True) == [0, 2, 4]
    assert reporters([0, 3, 6, 7], hosts, per_node_logs=True) == [1, 2, 4]
    assert reporters([3], ["a", "b", "c", "d"], per_node_logs=True) == [0, 1, 2]


def test_a_process_says_its_last_line_once_whoever_finds_the_loss_first():
    # the watchdog's thread and the training loop race to report; the log gets one line
    code = ("import threading\n"
            "from resist_mpi.errors import say_last_line\n"
            "go = threading.Barrier(8)\n"
            "said = []\n"
            "def report(i):\n"
            "    go.wait()\n"
            "    said.append(say_last_line(f'resist_mpi: error: from {i}'))\n"
            "ts = [threading.Thread(target=report, args=(i,)) for i in range(8)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(sum(said))\n")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "1"
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("resist_mpi: error: from "), p.stderr


def test_a_stop_signal_while_the_run_starts_stops_it_after_its_first_round_with_a_checkpoint(tmp_path, monkeypatch):
    """SIGUSR1 (a job's time-limit warning) while a (re)launched run loaded its data: the handler
    came with the training loop, so the signal's default action ended the rank, and the job script
    relaunched it instead of requeueing. (Here a handler of the test's own stands for that default,
    so that the process survives to tell.)"""
    import json

    from resist_mpi.cli import train, trainer
    load = trainer.load_dataset

    def load_while_signalled(*args, **kw):
        os.kill(os.getpid(), signal.SIGUSR1)
        return load(*args, **kw)
    monkeypatch.setattr(trainer, "load_dataset", load_while_signalled)
    default = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: default.append(True))
    try:
        code = train.main(["--backend", "self", "--model", "preact_resnet34", "--width", "2", "--dataset",
                           "synthetic", "--epochs", "1", "--batch-size", "128", "--local-steps", "3", "--bn-batches",
                           "1", "--progress", "off", "--out", str(tmp_path / "run")])
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert default == [] and code == REQUEUE_EXIT
    stops = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["event"] == "stop"]
    assert [(s["round"], s["signal"]) for s in stops] == [(0, "SIGUSR1")]
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["ckpt-000001"]
