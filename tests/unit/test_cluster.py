"""resist_mpi.cluster without root: rates, tc arguments, argument checks and the ssh stand-in
(run against a fake `ip` that records its arguments instead of entering a namespace)."""
import json
import os
import subprocess

import pytest

from resist_mpi.tools import cluster as C


@pytest.mark.parametrize("text, bits", [("100mbit", 10 ** 8), ("1gbit", 10 ** 9), ("1.5Gbit", 15 * 10 ** 8),
                                        ("500kbit", 5 * 10 ** 5), ("unshaped", None)])
def test_parse_rate(text, bits):
    assert C.parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "100", "100mbps", "0gbit", "-1gbit"])
def test_parse_rate_refuses_in_one_line(text):
    with pytest.raises(C.ClusterError, match=r"^rate .*: use e.g. 100mbit, 1gbit, 10gbit or unshaped$"):
        C.parse_rate(text)


def test_tbf_burst_is_1ms_at_the_rate_but_at_least_32KiB():
    assert C.tbf_args(10 ** 9) == ["tbf", "rate", "1000000000bit", "burst", "125000", "latency", "20ms"]
    assert C.tbf_args(10 ** 8)[4] == str(32 * 1024)


@pytest.mark.parametrize("kw, message", [({"nodes": 0}, "nodes=0"), ({"prefix": "Bad_"}, "prefix 'Bad_'"),
                                         ({"rate": "warp"}, "rate 'warp'"),
                                         ({"subnet": "192.0.2"}, "subnet '192.0.2': .* private /24")])
def test_bad_arguments(kw, message):
    with pytest.raises(C.ClusterError, match=message):
        C.Cluster(**kw)


def test_needs_root(monkeypatch):
    monkeypatch.setattr(C.os, "geteuid", lambda: 1000)
    assert C.why_unavailable() == "the simulated cluster needs root (network namespaces, veth, tc)"


def test_needs_iproute2(monkeypatch):
    monkeypatch.setattr(C.os, "geteuid", lambda: 0)
    monkeypatch.setattr(C.shutil, "which", lambda name: None if name in ("ip", "tc") else "/usr/bin/" + name)
    assert C.why_unavailable() == "the simulated cluster needs ip, tc (apt-get install iproute2 util-linux)"


def test_on_node_sets_the_hostname_in_its_own_uts_namespace():
    cl = C.Cluster(nodes=2, prefix="rcu-")
    assert cl.on("node1") == ["ip", "netns", "exec", "rcu-node1", "unshare", "--uts",
                              "sh", "-c", 'hostname "$0" && exec "$@"', "node1"]
    assert [cl.address(h) for h in cl.hosts] == ["10.77.0.1", "10.77.0.2"]
    with pytest.raises(C.ClusterError, match="no node 'node2'"):
        cl.on("node2")


@pytest.fixture
def standin(tmp_path):
    """The generated ssh stand-in of a 3-node cluster, and a runner with a fake `ip` first on PATH."""
    cl = C.Cluster(nodes=3, prefix="rcu-", state_dir=str(tmp_path / "state"))
    cl._write_state()
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "ip").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$IP_ARGS"\n')
    (fake / "ip").chmod(0o755)

    def ssh(*args):
        record = tmp_path / "ip.args"
        env = {"PATH": f"{fake}:/usr/bin:/bin", "IP_ARGS": str(record)}
        p = subprocess.run([cl.ssh, *args], env=env, capture_output=True, text=True)
        return p, (record.read_text().split("\n")[:-1] if record.exists() else None)
    return cl, ssh


def test_ssh_standin_skips_options_and_joins_the_command(standin):
    cl, ssh = standin
    p, args = ssh("-o", "StrictHostKeyChecking=no", "-oBatchMode=yes", "-x", "-p", "22", "node1",
                  "-i", "key", "echo", "a  b", "c")
    assert p.returncode == 0, p.stderr
    profile = os.path.join(cl.state_dir, "profile")
    assert args[:8] == ["netns", "exec", "rcu-node1", "unshare", "--uts", "env", "-i", "sh"]
    assert args[-4:] == ["sh", "node1", profile, "echo a  b c"]  # words joined by spaces, as ssh does
    p, args = ssh("root@10.77.0.3", "true")  # user@ and addresses work too
    assert p.returncode == 0 and args[2] == "rcu-node2" and args[-1] == "true"


@pytest.mark.parametrize("argv, message", [(["node7", "true"], "Could not resolve hostname node7"),
                                           (["node0"], "interactive logins are not simulated"),
                                           (["-p", "22"], "no host given")])
def test_ssh_standin_failures_are_ssh_like(standin, argv, message):
    p, args = standin[1](*argv)
    assert p.returncode == 255 and message in p.stderr and args is None


def test_profile_points_launchers_at_the_standin(standin):
    cl, _ = standin
    lines = open(os.path.join(cl.state_dir, "profile")).read().splitlines()
    profile = dict(line.split("=", 1) for line in lines)
    assert profile["OMPI_MCA_plm_rsh_agent"] == cl.ssh
    assert profile["PATH"].startswith(cl.bin_dir + ":")
    assert profile["PYTHONPATH"].split(":")[0] == os.path.dirname(os.path.dirname(os.path.dirname(C.__file__)))
    assert json.load(open(os.path.join(cl.state_dir, "cluster.json")))["nodes"] == 3


class _FakeIp:
    """`ip` as up/teardown call it, on a table of namespaces; `other` are made by another cluster
    of the same prefix just after `up` looked (the race of two runs started at once)."""

    def __init__(self, monkeypatch, other=()):
        self.namespaces, self.other, self.deleted = set(), list(other), []
        monkeypatch.setattr(C, "_sh", self)
        monkeypatch.setattr(C, "why_unavailable", lambda: None)
        monkeypatch.setattr(C.os, "makedirs", lambda *a, **k: None)  # the hosts files under /etc/netns
        monkeypatch.setattr(C, "open", lambda *a, **k: open(os.devnull, "w"), raising=False)

    def __call__(self, cmd, check=True):
        out = ""
        if cmd[:3] == ["ip", "netns", "list"]:
            out = "\n".join(sorted(self.namespaces))
            self.namespaces.update(self.other)  # made between the check and our first add
            self.other = []
        elif cmd[:3] == ["ip", "netns", "add"]:
            if cmd[3] in self.namespaces:
                raise C.ClusterError(f"ip netns add {cmd[3]}: Cannot create namespace file: File exists")
            self.namespaces.add(cmd[3])
        elif cmd[:3] == ["ip", "netns", "del"]:
            self.namespaces.discard(cmd[3])
            self.deleted.append(cmd[3])
        return subprocess.CompletedProcess(cmd, 0, out, "")


@pytest.mark.parametrize("other", [["rcr-sw", "rcr-node0", "rcr-node1"], ["rcr-node1"]])
def test_a_failed_up_removes_only_what_it_made_not_another_clusters_namespaces(monkeypatch, tmp_path, other):
    """Two runs with one prefix: the second's `ip netns add` fails on a namespace the first made
    after the second checked. Its teardown used to remove every namespace of the prefix, the
    running cluster's too; now only its own (none, or the switch and node0 it made first)."""
    ip = _FakeIp(monkeypatch, other)
    with pytest.raises(C.ClusterError, match="File exists"):
        C.Cluster(nodes=3, prefix="rcr-", state_dir=str(tmp_path / "state")).up()
    assert sorted(ip.namespaces) == sorted(other)
    assert sorted(ip.deleted) == sorted({"rcr-sw", "rcr-node0"} - set(other))


def test_a_stop_signal_during_teardown_waits_until_the_cluster_is_gone(monkeypatch, tmp_path):
    """A second Ctrl-C (or SIGTERM) while `down` removed the namespaces used to stop it half-way,
    leaving namespaces that the next `up` refuses; it is delivered once teardown is done."""
    import signal
    done = []

    def teardown(prefix, state_dir=None, names=None):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the namespaces are being removed
        done.append(prefix)
        return []
    monkeypatch.setattr(C, "teardown", teardown)
    # Python's own handler (a shell starts background jobs, CI's runs among them, with SIGINT ignored)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            C.Cluster(nodes=2, prefix="rcs-", state_dir=str(tmp_path / "state")).down()
    finally:
        signal.signal(signal.SIGINT, old)
    assert done == ["rcs-"]


def test_teardown_kills_what_was_forked_during_its_grace_time(monkeypatch):
    """The pids were listed once: a process started in a namespace after that escaped the SIGKILL
    and ran on once the namespace's name was gone."""
    import signal
    inside = [{101}, {202}, set()]  # 101 ends at the SIGTERM; 202 was forked in the grace time
    killed = []
    monkeypatch.setattr(C, "existing_namespaces", lambda prefix: ["rct-node0"])
    monkeypatch.setattr(C, "_alive", lambda pid: False)

    def sh(cmd, check=True):
        out = ""
        if cmd[:3] == ["ip", "netns", "pids"]:
            out = " ".join(map(str, inside.pop(0) if inside else set()))
        return subprocess.CompletedProcess(cmd, 0, out, "")
    monkeypatch.setattr(C, "_sh", sh)
    monkeypatch.setattr(C, "_signal_all", lambda pids, sig: killed.append((sorted(pids), sig)))
    C.teardown("rct-", names=["rct-node0"])
    assert killed == [([101], signal.SIGTERM), ([202], signal.SIGKILL)]
