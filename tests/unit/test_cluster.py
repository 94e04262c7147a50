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
