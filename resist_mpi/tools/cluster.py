"""A simulated multi-node cluster on one Linux machine, for tests and benchmarks.

    python -m resist_mpi.cluster up --nodes 4 --rate 1gbit      # node0..node3 on 10.77.0.0/24
    python -m resist_mpi.cluster run -- mpirun -np 4 -H node0,node1,node2,node3 --mca btl tcp,self \\
        python -m resist_mpi.train --model preact_resnet18 --width 4 --epochs 1
    python -m resist_mpi.cluster rate 100mbit                    # reshape every link of the running cluster
    python -m resist_mpi.cluster status                           # addresses, shaping, interface counters
    python -m resist_mpi.cluster down

    with Cluster(nodes=4, rate="1gbit") as cl:                   # the same from Python; torn down on exit
        cl.run(["mpirun", ...])                                  # runs on node0 with cl.env()
        cl.counters()                                            # kernel tx/rx bytes per node

Each node is a network namespace ``<prefix>nodeK`` with one interface ``net0`` (10.77.0.K+1/24), a
veth whose other end is a port ``pK`` of the bridge ``br0`` in the switch namespace ``<prefix>sw``:
the root namespace's network is never touched. Every command on a node runs as
``ip netns exec NS unshare --uts`` with the hostname set to ``nodeK``, because Open MPI, Horovod
and slurmd tell nodes apart by hostname; ``ip netns exec`` bind-mounts ``/etc/netns/NS/hosts``
over /etc/hosts, so every node resolves every other by name. Processes of all nodes share the
file system and the CPUs; only the network and the hostname are per node.

Launchers reach other nodes through ``STATE/bin/ssh``, a stand-in for ssh that runs the command in
the target node's namespace (ssh options are ignored). Open MPI is pointed at it with
``OMPI_MCA_plm_rsh_agent``; horovodrun finds it first on PATH. Like a real ssh login, the command
gets a fresh environment: the node profile ``STATE/profile`` (PATH, HOME, PYTHONPATH, the Open MPI
root settings, ... captured when the cluster came up), not the caller's variables.

Links are shaped on both ends (the node's net0 egress and the switch port's egress, i.e. the node's
ingress) with a token bucket (tc tbf): burst = 1 ms at the rate (at least 32 KiB, larger than a
64 KiB GSO packet from 500 Mbit/s up, so fast links do not pay tbf's segmentation), and a queue of
20 ms at the rate, about what a switch port buffers. ``unshaped`` removes the qdiscs: veth then moves
data as fast as the CPUs copy it. Every node gives up on an unanswered TCP connection after 5
retransmissions (``net.ipv4.tcp_retries2=5``, ~15 s, a per-namespace setting) instead of Linux's 15
(~15 minutes), as clusters tuned for node failures do: that bounds how long mpirun waits for the
daemon of a node that was cut off.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

IFACE = "net0"            # the node's interface (the same name on every node: horovodrun wants a common NIC)
BRIDGE = "br0"
DEFAULT_PREFIX = "rc-"
DEFAULT_SUBNET = "10.77.0"  # /24; node K is .K+1
TBF_LATENCY_MS = 20
TCP_RETRIES2 = 5          # net.ipv4.tcp_retries2 on every node (see _make_network)
TBF_MIN_BURST = 32 * 1024
RATE_UNITS = {"bit": 1, "kbit": 10 ** 3, "mbit": 10 ** 6, "gbit": 10 ** 9, "tbit": 10 ** 12}
# Variables a login on any node gets (a site profile would set them the same on every node).
PROFILE_KEYS = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TERM", "TMPDIR", "LD_LIBRARY_PATH",
                "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "PYTHONUNBUFFERED")


class ClusterError(RuntimeError):
    """Why the cluster cannot be brought up or used, in one line."""


def why_unavailable() -> Optional[str]:
    """One line saying why a simulated cluster cannot run here; None when it can."""
    if not sys.platform.startswith("linux"):
        return "the simulated cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the simulated cluster needs root (network namespaces, veth, tc)"
    missing = [t for t in ("ip", "tc", "unshare") if shutil.which(t) is None]
    if missing:
        return f"the simulated cluster needs {', '.join(missing)} (apt-get install iproute2 util-linux)"
    return None


def parse_rate(text: str) -> Optional[int]:
    """'100mbit' -> 100_000_000 bits/s; 'unshaped' -> None."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)", text.strip().lower())
    if text.strip().lower() == "unshaped":
        return None
    if not m or float(m.group(1)) <= 0:
        raise ClusterError(f"rate {text!r}: use e.g. 100mbit, 1gbit, 10gbit or unshaped")
    return int(float(m.group(1)) * RATE_UNITS[m.group(2)])


def tbf_args(bits_per_s: int) -> List[str]:
    """tc arguments of one link end shaped to bits_per_s (see the module docstring for the choice)."""
    burst = max(bits_per_s // 8 // 1000, TBF_MIN_BURST)
    return ["tbf", "rate", f"{bits_per_s}bit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]


def _sh(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run an iproute2 command; a failure becomes a one-line ClusterError."""
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and p.returncode != 0:
        last = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit status {p.returncode}"]
        raise ClusterError(f"{' '.join(cmd)}: {last[0]}")
    return p


SSH_STANDIN = r"""#!/bin/sh
# ssh stand-in of the simulated cluster {prefix!r}: `ssh [options] host [options] command...`.
# Runs command (its words joined by spaces, as ssh does) with sh in host's network namespace, with
# host's hostname and the node profile as its whole environment. ssh options are ignored.
skip_options() {{ n=0; while [ $# -gt 0 ]; do case $1 in
    -[BbcDEeFIiJLlmOopQRSWw]) n=$((n + 2)); shift; [ $# -gt 0 ] && shift ;;
    --) n=$((n + 1)); break ;;
    -?*) n=$((n + 1)); shift ;;
    *) break ;;
esac; done; }}
skip_options "$@"; shift $n
[ $# -gt 0 ] || {{ echo "ssh: no host given" >&2; exit 255; }}
host=${{1#*@}}; shift
case $host in
{cases}
    *) echo "ssh: Could not resolve hostname $host: not a node of cluster {prefix}" >&2; exit 255 ;;
esac
skip_options "$@"; shift $n
[ $# -gt 0 ] || {{ echo "ssh: interactive logins are not simulated; give a command" >&2; exit 255; }}
exec ip netns exec "$ns" unshare --uts env -i sh -c \
    'hostname "$1" && set -a && . "$2" && set +a && {{ cd 2>/dev/null || :; }} && exec sh -c "$3"' sh "$name" {profile} "$*"
"""


class Cluster:
    """N nodes in network namespaces behind one bridge; see the module docstring.

    Args:
        nodes: number of nodes (node0 .. node{nodes-1}).
        rate: link rate of every node ("100mbit", "1gbit", ...) or "unshaped".
        prefix: namespace names start with it, so that clusters of different prefixes never clash.
        subnet: first three octets of the private /24 the nodes live on.
        state_dir: where the generated scripts, profile and cluster.json go (default /tmp/<prefix>cluster).
        profile: extra variables for every login on a node (added to PROFILE_KEYS of this environment).
    """

    def __init__(self, nodes: int = 4, rate: str = "unshaped", prefix: str = DEFAULT_PREFIX,
                 subnet: str = DEFAULT_SUBNET, state_dir: Optional[str] = None,
                 profile: Optional[Dict[str, str]] = None):
        if not 1 <= nodes <= 250:
            raise ClusterError(f"nodes={nodes}: choose 1 to 250")
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,7}", prefix):
            raise ClusterError(f"prefix {prefix!r}: 1-8 characters of a-z, 0-9 and -, starting with a letter")
        if not re.fullmatch(r"(10\.\d{1,3}|172\.(1[6-9]|2\d|3[01])|192\.168)\.\d{1,3}", subnet):
            raise ClusterError(f"subnet {subnet!r}: give the first three octets of a private /24, e.g. 10.77.0")
        parse_rate(rate)  # fail before making anything
        self.nodes, self.rate, self.prefix, self.subnet = nodes, rate, prefix, subnet
        self.state_dir = state_dir or os.path.join(tempfile.gettempdir(), f"{prefix}cluster")
        self.extra_profile = dict(profile or {})
        self._saved_handlers: Dict[int, object] = {}

    # -- names ----------------------------------------------------------------------------------------
    @property
    def hosts(self) -> List[str]:
        return [f"node{k}" for k in range(self.nodes)]

    def ns(self, host: str) -> str:
        """The network namespace of a node (or "sw" for the switch)."""
        return self.prefix + host

    def kill(self, host: Optional[str] = None) -> None:
        """SIGKILL every process in a node's namespace (its launcher daemon, ranks, slurmd), or in
        every node's: what a node that dies, or a job that must not outlive a timeout, leaves."""
        for h in [host] if host else self.hosts:
            pids = {int(p) for p in _sh(["ip", "netns", "pids", self.ns(h)], check=False).stdout.split()}
            pids.discard(os.getpid())
            _signal_all(pids, signal.SIGKILL)

    def address(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    @property
    def bin_dir(self) -> str:
        return os.path.join(self.state_dir, "bin")

    @property
    def ssh(self) -> str:
        return os.path.join(self.bin_dir, "ssh")

    # -- life cycle -------------------------------------------------------------------------------------
    def up(self, force_clean: bool = False) -> "Cluster":
        """Create the namespaces, links, shaping, hosts files and launcher scripts."""
        reason = why_unavailable()
        if reason:
            raise ClusterError(reason)
        stale = existing_namespaces(self.prefix)
        if stale and not force_clean:
            raise ClusterError(f"namespaces {', '.join(stale)} exist (a cluster is up or was left half-made): "
                               f"run `python -m resist_mpi.cluster down --prefix {self.prefix}` or `up --force-clean`")
        if stale:
            with _signals_held():
                teardown(self.prefix, self.state_dir)
        self._made = []
        wrote_state = False
        try:
            self._make_network()
            self.set_rate(self.rate)
            wrote_state = True  # from here on the state files may be partly this call's
            self._write_state()
        except BaseException:
            # never leave a half-made cluster behind, and remove only what this call made: a namespace
            # that was already there when `ip netns add` failed is another cluster's, started with the
            # same prefix between the check above and here, and stays up
            with _signals_held():
                teardown(self.prefix, self.state_dir if wrote_state else None, names=self._made)
            raise
        return self

    def _make_network(self) -> None:
        sw = self.ns("sw")
        _sh(["ip", "netns", "add", sw])
        self._made.append(sw)
        _sh(["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge"])
        _quiet(sw, BRIDGE)
        _sh(["ip", "-n", sw, "link", "set", BRIDGE, "up"])
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.address(h)} {h}\n" for h in self.hosts)
        for k, host in enumerate(self.hosts):
            ns = self.ns(host)
            _sh(["ip", "netns", "add", ns])
            self._made.append(ns)
            # Both ends are created inside their namespaces: nothing appears in the root namespace.
            _sh(["ip", "-n", sw, "link", "add", f"p{k}", "type", "veth", "peer", "name", IFACE, "netns", ns])
            _quiet(sw, f"p{k}")
            _quiet(ns, IFACE)
            _sh(["ip", "-n", sw, "link", "set", f"p{k}", "master", BRIDGE, "up"])
            _sh(["ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", IFACE])
            _sh(["ip", "-n", ns, "link", "set", IFACE, "up"])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            # A lost peer is noticed by TCP only when retransmissions give up: with Linux's default
            # (15 retries, ~15 min) mpirun waits that long for a cut-off node's daemon after the
            # job aborted. 5 retries (~15 s) is what high-availability guides set on real clusters.
            _sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv4.tcp_retries2={TCP_RETRIES2}"])
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write(hosts)

    def down(self) -> None:
        """Kill every process on the nodes, remove the namespaces, hosts files and state dir. Stop
        signals wait until it is done (a second Ctrl-C used to leave the cluster half-removed)."""
        with _signals_held():
            teardown(self.prefix, self.state_dir)

    def __enter__(self) -> "Cluster":
        # SIGTERM/SIGHUP become SystemExit, so that __exit__ tears the cluster down (SIGINT already
        # raises KeyboardInterrupt). Only the main thread may install handlers.
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._saved_handlers[sig] = signal.signal(sig, _raise_exit)
        try:
            return self.up()
        except BaseException:
            self._restore_handlers()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler)
        self._saved_handlers.clear()

    # -- shaping ------------------------------------------------------------------------------------
    def set_rate(self, rate: str) -> None:
        """Shape every link, both ends, to rate ("unshaped": no qdisc); works on a running cluster."""
        bits = parse_rate(rate)
        for k, host in enumerate(self.hosts):
            for ns, dev in ((self.ns(host), IFACE), (self.ns("sw"), f"p{k}")):
                if bits is None:
                    _sh(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)  # none is fine
                else:
                    _sh(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root"] + tbf_args(bits))
        self.rate = rate
        if os.path.isdir(self.state_dir):
            self._save()

    def shaping(self) -> Dict[str, Dict[str, Optional[int]]]:
        """The root qdisc rate of both ends of each link, as the kernel reports it:
        {host: {"node": bits/s or None, "switch": bits/s or None}} (None: no tbf there)."""
        out = {}
        for k, host in enumerate(self.hosts):
            ends = {}
            for end, ns, dev in (("node", self.ns(host), IFACE), ("switch", self.ns("sw"), f"p{k}")):
                qdisc = json.loads(_sh(["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev, "root"]).stdout)[0]
                ends[end] = 8 * qdisc["options"]["rate"] if qdisc["kind"] == "tbf" else None
            out[host] = ends
        return out

    # -- running things on nodes ------------------------------------------------------------------------
    def on(self, host: str = "node0") -> List[str]:
        """argv prefix that runs a command on host (its namespace and hostname, the caller's environment)."""
        if host not in self.hosts:
            raise ClusterError(f"no node {host!r}: the nodes are {', '.join(self.hosts)}")
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', host]

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """base (default os.environ) plus what launchers need here: the ssh stand-in first on PATH,
        Open MPI's rsh agent, root and oversubscription settings, MPI traffic on the cluster subnet."""
        env = dict(os.environ if base is None else base)
        env.update(self._launcher_vars())
        env["PATH"] = os.pathsep.join(p for p in (self.bin_dir, env.get("PATH", "")) if p)
        paths = [_package_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # the package first, no repeats
        return env

    def _launcher_vars(self) -> Dict[str, str]:
        subnet = f"{self.subnet}.0/24"
        return {"OMPI_MCA_plm_rsh_agent": self.ssh, "OMPI_ALLOW_RUN_AS_ROOT": "1",
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1",
                # Open MPI busy-polls unless a node runs more ranks than it has slots; here every node
                # has slots of its own but all share the machine's cores, so waiting ranks must yield.
                "OMPI_MCA_mpi_yield_when_idle": "1",
                # Open MPI's own traffic stays on the cluster network, never on a node's loopback.
                "OMPI_MCA_oob_tcp_if_include": subnet, "OMPI_MCA_btl_tcp_if_include": subnet}

    def popen(self, cmd: Sequence[str], host: str = "node0", env: Optional[Dict[str, str]] = None,
              **kw) -> subprocess.Popen:
        """Start cmd on host with env (default self.env()); Popen keywords pass through."""
        return subprocess.Popen(self.on(host) + list(cmd), env=self.env() if env is None else env, **kw)

    def run(self, cmd: Sequence[str], host: str = "node0", env: Optional[Dict[str, str]] = None,
            **kw) -> subprocess.CompletedProcess:
        """Run cmd on host with env (default self.env()) and wait; subprocess.run keywords pass through."""
        return subprocess.run(self.on(host) + list(cmd), env=self.env() if env is None else env, **kw)

    # -- counters -------------------------------------------------------------------------------------
    def counters(self) -> Dict[str, Dict[str, int]]:
        """The kernel's byte and packet counters of each node's net0: {host: {tx_bytes, rx_bytes, ...}}."""
        out = {}
        for host in self.hosts:
            p = _sh(["ip", "-n", self.ns(host), "-s", "-j", "link", "show", "dev", IFACE])
            stats = json.loads(p.stdout)[0]["stats64"]
            out[host] = {f"{d}_{k}": stats[d][k] for d in ("tx", "rx") for k in ("bytes", "packets")}
        return out

    # -- state ------------------------------------------------------------------------------------------
    def _write_state(self) -> None:
        os.makedirs(self.bin_dir, exist_ok=True)
        self._save()
        profile = {k: os.environ[k] for k in PROFILE_KEYS if k in os.environ}
        profile = self.env(profile)
        profile.update(self.extra_profile)
        with open(os.path.join(self.state_dir, "profile"), "w") as f:
            f.write("".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(profile.items())))
        cases = "".join(f"    {h}|{self.address(h)}) ns={self.ns(h)} name={h} ;;\n" for h in self.hosts)
        script = SSH_STANDIN.format(prefix=self.prefix, cases=cases.rstrip("\n"),
                                    profile=shlex.quote(os.path.join(self.state_dir, "profile")))
        with open(self.ssh, "w") as f:
            f.write(script)
        os.chmod(self.ssh, 0o755)

    def _save(self) -> None:
        state = {"nodes": self.nodes, "rate": self.rate, "prefix": self.prefix, "subnet": self.subnet,
                 "state_dir": self.state_dir}
        with open(os.path.join(self.state_dir, "cluster.json"), "w") as f:
            json.dump(state, f, indent=1)

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, state_dir: Optional[str] = None) -> "Cluster":
        """The cluster `up` left running with this prefix."""
        state_dir = state_dir or os.path.join(tempfile.gettempdir(), f"{prefix}cluster")
        try:
            with open(os.path.join(state_dir, "cluster.json")) as f:
                state = json.load(f)
        except OSError:
            raise ClusterError(f"no cluster with prefix {prefix!r} is up (no {state_dir}/cluster.json): "
                               "run `python -m resist_mpi.cluster up`") from None
        return cls(state["nodes"], state["rate"], state["prefix"], state["subnet"], state["state_dir"])


def existing_namespaces(prefix: str) -> List[str]:
    """Namespaces that a cluster with this prefix made: <prefix>sw and <prefix>nodeK, nothing else."""
    names = _sh(["ip", "netns", "list"]).stdout.split("\n")
    pattern = re.compile(re.escape(prefix) + r"(sw|node\d+)")
    return sorted(n.split()[0] for n in names if n.strip() and pattern.fullmatch(n.split()[0]))


def teardown(prefix: str, state_dir: Optional[str] = None, names: Optional[List[str]] = None) -> List[str]:
    """Remove everything a cluster with this prefix made, running or half-made; returns the namespaces.
    names: only these of its namespaces (and their hosts files), e.g. those a failed `up` made.

    Processes inside its namespaces (orted, ranks, slurmd, ...) get SIGTERM, then SIGKILL after 3 s:
    a namespace outlives its `ip netns del` while a process is still in it.
    """
    chosen = names
    names = [n for n in existing_namespaces(prefix) if chosen is None or n in chosen]

    def inside() -> set:
        pids = {int(p) for ns in names for p in _sh(["ip", "netns", "pids", ns], check=False).stdout.split()}
        return pids - {os.getpid()}
    pids = inside()
    _signal_all(pids, signal.SIGTERM)
    deadline = time.time() + 3
    while pids and time.time() < deadline:
        pids = {p for p in pids if _alive(p)}
        time.sleep(0.05)
    # then SIGKILL, asking again until none is left: what was forked meanwhile (a rank that a daemon
    # started during the grace time) would otherwise run on in a namespace without a name
    for _ in range(10):
        pids = inside()
        if not pids:
            break
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.05)
    for ns in names:
        _sh(["ip", "netns", "del", ns], check=False)
    pattern = re.compile(re.escape(prefix) + r"(sw|node\d+)")
    for ns in os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []:
        # also those of namespaces that a failed `up` never made
        if pattern.fullmatch(ns) and (chosen is None or ns in chosen):
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    try:
        os.rmdir("/etc/netns")  # only when empty: other namespaces' files stay
    except OSError:
        pass
    if state_dir:
        _remove_state(state_dir)
    return names


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends (main thread only: elsewhere nothing is
    held): one that arrives meanwhile is noted and raised again, to its own handler, at the end."""
    if not _in_main_thread():
        yield
        return
    arrived = []
    saved = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum))
             for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)


def _remove_state(state_dir: str) -> None:
    """Remove the files `up` wrote, then the directories if nothing else is in them."""
    for name in ("bin/ssh", "profile", "cluster.json"):
        try:
            os.remove(os.path.join(state_dir, name))
        except FileNotFoundError:
            pass
    for d in (os.path.join(state_dir, "bin"), state_dir):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _quiet(ns: str, dev: str) -> None:
    """No IPv6 link-local address on dev: no neighbour discovery chatter in the interface counters."""
    _sh(["ip", "-n", ns, "link", "set", "dev", dev, "addrgenmode", "none"])


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose (its parent reaps it)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the directory holding resist_mpi/


# -- command line ---------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m resist_mpi.cluster", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)  # options every subcommand takes, after its name
    common.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix (default %(default)s)")
    common.add_argument("--state-dir", default=None, help="default /tmp/<prefix>cluster")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="create the cluster and leave it running")
    up.add_argument("--nodes", type=int, default=4)
    up.add_argument("--rate", default="unshaped", help="link rate, e.g. 100mbit, 1gbit, or unshaped")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="first three octets of the /24 (default %(default)s)")
    up.add_argument("--force-clean", action="store_true", help="remove a stale cluster with this prefix first")
    run = sub.add_parser("run", parents=[common], help="run a command on a node (default node0), launcher environment")
    run.add_argument("--node", default="node0")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    rate = sub.add_parser("rate", parents=[common], help="reshape every link of the running cluster")
    rate.add_argument("rate")
    sub.add_parser("status", parents=[common], help="nodes, addresses, shaping and interface counters")
    sub.add_parser("down", parents=[common], help="tear the cluster down (also a half-made one)")
    return p


def _status(cl: Cluster) -> None:
    counters, shaping = cl.counters(), cl.shaping()
    print(f"cluster {cl.prefix}: {cl.nodes} nodes, links {cl.rate}, state in {cl.state_dir}")
    for host in cl.hosts:
        c = counters[host]
        procs = len(_sh(["ip", "netns", "pids", cl.ns(host)], check=False).stdout.split())
        ends = "/".join(f"{r / 1e6:g}M" if r else "-" for r in shaping[host].values())
        print(f"  {host:8s} {cl.address(host):12s} ns {cl.ns(host):12s} tbf {ends:>13s}  "
              f"tx {c['tx_bytes']:>14,d} B  rx {c['rx_bytes']:>14,d} B  {procs} processes")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            cl = Cluster(args.nodes, args.rate, args.prefix, args.subnet, args.state_dir).up(args.force_clean)
            print(f"cluster {cl.prefix}: up, {', '.join(f'{h}={cl.address(h)}' for h in cl.hosts)}, links {cl.rate}; "
                  f"`python -m resist_mpi.cluster run -- CMD` runs CMD on node0")
        elif args.command == "down":
            names = teardown(args.prefix, args.state_dir or os.path.join(tempfile.gettempdir(), f"{args.prefix}cluster"))
            print(f"cluster {args.prefix}: removed {', '.join(names) if names else 'nothing (none was up)'}")
        elif args.command == "run":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise ClusterError("run: give a command after --")
            cl = Cluster.load(args.prefix, args.state_dir)
            return subprocess.call(cl.on(args.node) + cmd, env=cl.env())
        elif args.command == "rate":
            cl = Cluster.load(args.prefix, args.state_dir)
            cl.set_rate(args.rate)
            print(f"cluster {cl.prefix}: links {cl.rate}")
        else:
            _status(Cluster.load(args.prefix, args.state_dir))
    except ClusterError as e:
        print(f"resist_mpi.cluster: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
