"""A watchdog that ends a job whose peer became unreachable, instead of waiting on TCP for minutes.

When a node or its link is lost mid-collective, MPI over TCP notices only when the kernel gives up
retransmitting (often 15 minutes or more), and until then every rank waits. Here each rank beats a
heartbeat as it makes progress (a local step, a phase of the round). A background thread watches
it: after `timeout` seconds without a beat it asks every peer's liveness listener (a TCP socket
each rank opened at start, addresses exchanged once) whether it is still reachable.

- Every peer answers: the job is slow, not broken (a rank writing a large checkpoint, a long
  evaluation); nothing happens, and it asks again after another `timeout` seconds.
- Some peer does not answer within `probe_timeout`: the lowest rank that still reaches every
  answering peer prints one line naming the lost ranks and their hosts (under torchrun, whose
  agents keep a log per node, the lowest on each node; see `reporters`), and the job is aborted
  (exit status LOST_PEER_EXIT), so `--resume auto` can continue it from its last checkpoint.
  The line tells the two ways a peer is lost apart (`probe`): its host refused the connection
  (the host is up, the rank's process has ended: look in its log), or nothing answered at all
  (the node or its link is down, or the process is alive but cannot answer: stopped, or stuck).
  A survivor whose own collective failed a moment earlier has ended too, so it can be among the
  first kind.

The listener answers from its own thread, so a rank busy in a long computation or blocked in an
MPI call still answers; only a rank that cannot be reached does not.
"""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from ..comm.launch import world_info_from_env
from ..errors import say_last_line

LOST_PEER_EXIT = 3


def _advertised_address() -> str:
    """The IPv4 address peers on other hosts reach this rank on: its hostname's."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def probe_address(me: Tuple[str, str, int], peer: Tuple[str, str, int]) -> Optional[Tuple[str, int]]:
    """Where to probe peer (host, address, port) from me: loopback on the same host, its address
    on another; None when it cannot be reached from here by design (its hostname resolves to a
    loopback address on its own host), which is then never taken for a lost peer."""
    host, addr, port = peer
    if host == me[0]:
        return "127.0.0.1", port
    return None if addr.startswith("127.") else (addr, port)


ANSWERED, ENDED, SILENT = "answered", "ended", "silent"


def probe(addr: Tuple[str, int], timeout: float) -> str:
    """Ask the liveness listener at addr: ANSWERED (it accepted and answered within timeout),
    ENDED (its host refused or reset the connection: the host is up, nothing listens there any
    more, so the rank's process has ended), or SILENT (no answer within timeout, or no route: the
    node or its link is down, or the process is alive but cannot answer: stopped, or stuck)."""
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            s.settimeout(timeout)
            return ANSWERED if s.recv(1) == b"+" else ENDED  # closed without a word: it is shutting down
    except (ConnectionRefusedError, ConnectionResetError):
        return ENDED
    except OSError:
        return SILENT


def lost_line(lost: Dict[int, str], hosts: Sequence[str], probe_timeout: float, stalled: float, phase: str) -> str:
    """The one error line for lost peers ({rank: ENDED or SILENT}): the silent ones first (a node
    or link down is the likelier cause), then those whose process has ended."""
    def names(kind):
        return ", ".join(f"rank {r} ({hosts[r]})" for r in sorted(lost) if lost[r] == kind)
    parts = []
    if any(k == SILENT for k in lost.values()):
        parts.append(f"{names(SILENT)}: no answer for {probe_timeout:.0f} s")
    if any(k == ENDED for k in lost.values()):
        parts.append(f"{names(ENDED)}: process ended (its host refused the probe)")
    return (f"resist_mpi: error: lost {'; '.join(parts)}; after {stalled:.0f} s without progress in {phase}; "
            f"aborting the job (rerun with --resume auto to continue from the last checkpoint)")


def reporters(lost: Sequence[int], hosts: Sequence[str], per_node_logs: bool) -> List[int]:
    """The ranks that print the lost-peer line. Every rank that still sees all the others says the
    same, so one line is enough where the ranks' output meets in one log (mpirun, srun): the lowest
    rank left prints. Under torchrun each node's agent keeps its own log, so the lowest rank left on
    each host prints, and every surviving node's log says why its workers stopped (a cut-off rank's
    own output cannot arrive anyway)."""
    gone = set(lost)
    left = [r for r in range(len(hosts)) if r not in gone]
    if not per_node_logs:
        return left[:1]
    first = {}
    for r in left:
        first.setdefault(hosts[r], r)
    return sorted(first.values())


class Watchdog:
    """Heartbeat + liveness listener + watcher thread for this rank (see the module docstring).

    Args:
        c: the Comm (used once, at start, to exchange the listeners' addresses).
        timeout: seconds without a beat before peers are probed (0, or a world of one: inert, beat()
            only records the phase).
        probe_timeout: seconds a peer has to answer a probe.
    """

    def __init__(self, c, timeout: float, probe_timeout: float = 5.0):
        self.c, self.timeout, self.probe_timeout = c, float(timeout), probe_timeout
        self.phase, self._last = "start", time.monotonic()
        self._stop = threading.Event()
        self.peers: List[Optional[Tuple[str, int]]] = []
        self.hosts: List[str] = []
        if self.timeout <= 0 or c.size == 1:
            return
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("0.0.0.0", 0))
        self._server.listen(64)
        me = (socket.gethostname(), _advertised_address(), self._server.getsockname()[1])
        # ---- distributed step: the listeners' addresses (metadata: control bytes) ----
        with c.as_control():
            table = c.allgather_object(me)
        self.peers = [probe_address(me, peer) for peer in table]
        self.hosts = [host for host, _, _ in table]
        threading.Thread(target=self._answer, name="resist-liveness", daemon=True).start()
        threading.Thread(target=self._watch, name="resist-watchdog", daemon=True).start()

    def beat(self, phase: str) -> None:
        """Progress was made; phase names what runs now (it appears in the lost-peer message)."""
        self.phase, self._last = phase, time.monotonic()

    def close(self) -> None:
        self._stop.set()

    # -- threads ----------------------------------------------------------------------------------
    def _answer(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
                with conn:
                    conn.sendall(b"+")
            except OSError:
                continue

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            stalled = time.monotonic() - self._last
            if stalled < self.timeout:
                continue
            lost = self.lost_peers()
            if lost and not self._stop.is_set():
                self._report_and_abort(lost, stalled)
            self._last = time.monotonic()  # everyone answered: slow, not lost; ask again later

    def lost_peers(self) -> Dict[int, str]:
        """The ranks whose listener does not answer, each ENDED or SILENT (probed in parallel)."""
        others = [r for r in range(self.c.size) if r != self.c.rank and self.peers[r] is not None]
        if not others:
            return {}
        with ThreadPoolExecutor(max_workers=min(32, len(others))) as pool:
            found = list(pool.map(lambda r: probe(self.peers[r], self.probe_timeout), others))
        return {r: kind for r, kind in zip(others, found) if kind != ANSWERED}

    def _report_and_abort(self, lost: Dict[int, str], stalled: float) -> None:
        per_node_logs = world_info_from_env().launcher == "torchrun"  # each agent its own log
        if self.c.rank in reporters(sorted(lost), self.hosts, per_node_logs):
            say_last_line(lost_line(lost, self.hosts, self.probe_timeout, stalled, self.phase))
        else:
            time.sleep(1.0)  # let the reporter's line out first
        self.c.abort(LOST_PEER_EXIT)

