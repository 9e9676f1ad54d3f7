"""`accelops train` as its own launcher: several ranks on one node, and two "nodes" (network
namespaces joined by a veth pair, one rank each) meeting through torchrun's c10d
rendezvous, as on two machines."""

import json
import os
import re
import shutil
import subprocess
import sys
import types
import uuid

import pytest

from accelops.train import launch
from accelops.train.config import ConfigError
from accelops.train.run import add_arguments, run_args

LINE = re.compile(r"accelops train \[rank (\d)/(\d)\]: step (\d+), train loss (\S+)")


def parse(argv):
    import argparse

    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_child_argv_strips_only_launch_flags():
    argv = [
        "cfg.json",
        "--nnodes",
        "2",
        "--rdzv-endpoint=10.0.0.1:29400",
        "--set",
        "train.max_steps=3",
        "--nproc-per-node",
        "1",
        "--local-addr",
        "10.0.0.2",
        "--no-resume",
    ]
    assert launch.child_argv(argv) == ["cfg.json", "--set", "train.max_steps=3", "--no-resume"]


def test_torchrun_command_line(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    args = parse(["cfg.json", "--nproc-per-node", "2"])
    assert launch.wanted(args)
    assert launch.torchrun_argv(args, ["cfg.json", "--nproc-per-node", "2"]) == [
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--standalone",
        "--module",
        "accelops.train",
        "cfg.json",
    ]
    argv = ["cfg.json", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400"]
    cmd = launch.torchrun_argv(parse(argv), argv)
    assert cmd[cmd.index("--rdzv-conf") + 1] == "is_host=true"  # 127.0.0.1 is this machine
    assert cmd[cmd.index("--local-addr") + 1] == "127.0.0.1"
    assert cmd[-3:] == ["--module", "accelops.train", "cfg.json"]
    argv = ["cfg.json", "--nnodes", "2", "--rdzv-endpoint", "192.0.2.7:29400", "--local-addr", "192.0.2.8"]
    cmd = launch.torchrun_argv(parse(argv), argv)
    assert "is_host=false" in cmd and cmd[cmd.index("--local-addr") + 1] == "192.0.2.8"
    # one process: no launch; under torchrun the flags were for the agent, which already ran
    assert not launch.wanted(parse(["cfg.json"]))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert not launch.wanted(args)


def test_bad_launch_flags(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(ConfigError, match="needs --rdzv-endpoint"):
        run_args(parse(["cfg.json", "--nnodes", "2"]), ["cfg.json", "--nnodes", "2"])
    with pytest.raises(ConfigError, match="--nproc-per-node must be >= 1"):
        run_args(parse(["cfg.json", "--nproc-per-node", "0"]), [])
    with pytest.raises(ConfigError, match="--nnodes must be N or MIN:MAX"):
        run_args(parse(["cfg.json", "--nnodes", "two"]), [])
    args = parse(["cfg.json", "--nnodes", "2", "--rdzv-endpoint", "nohost"])
    with pytest.raises(ValueError, match="HOST:PORT"):
        launch.torchrun_argv(args, [])


def test_local_address_detection():
    assert launch.is_local_address("127.0.0.1") and launch.is_local_address("localhost")
    assert not launch.is_local_address("192.0.2.1")  # TEST-NET-1: never assigned
    assert not launch.is_local_address("no-such-host.invalid")
    assert launch.interface_of("127.0.0.1") == "lo" and launch.interface_of("192.0.2.1") is None


def write_config(tmp_path) -> str:
    text = "First Citizen: before we proceed any further, hear me speak. All: speak, speak. " * 40
    (tmp_path / "text.txt").write_text(text)
    config = {
        "data": {"path": str(tmp_path / "text.txt"), "seq_len": 16},
        "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
        "optimizer": {"lr": 1e-2},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "progress": False, "seed": 0},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return str(path)


def worker_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    for key in (
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "GLOO_SOCKET_IFNAME",
    ):
        env.pop(key, None)
    return env


def final_lines(output: str) -> dict:
    return {int(m.group(1)): (int(m.group(2)), int(m.group(3)), m.group(4)) for m in LINE.finditer(output)}


def test_two_ranks_on_one_node(tmp_path):
    config = write_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "accelops.cli", "train", config, "--nproc-per-node", "2"],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = final_lines(proc.stderr)
    assert sorted(lines) == [0, 1] and lines[0] == lines[1] and lines[0][:2] == (2, 3), proc.stderr[-2000:]


def _netns_reason():
    if os.geteuid() != 0:
        return "not root: network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not found"
    probe = f"aolp{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair: node 0 at 10.79.0.1, node 1 at 10.79.0.2."""
    reason = _netns_reason()
    if reason is not None:
        pytest.skip(f"multi-node launch test needs network namespaces: {reason}")
    tag = uuid.uuid4().hex[:6]
    nodes = [types.SimpleNamespace(ns=f"aon{i}{tag}", veth=f"aoe{i}{tag}", addr=f"10.79.0.{i + 1}") for i in range(2)]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    try:
        ip("link", "add", nodes[0].veth, "type", "veth", "peer", "name", nodes[1].veth)
        for node in nodes:
            ip("netns", "add", node.ns)
            ip("link", "set", node.veth, "netns", node.ns)
            ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.veth)
            ip("-n", node.ns, "link", "set", node.veth, "up")
            ip("-n", node.ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for node in nodes:
            subprocess.run(["ip", "netns", "del", node.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", nodes[0].veth], capture_output=True)


def test_two_nodes_through_c10d_rendezvous(tmp_path, two_nodes):
    """Each "node" runs the same `accelops train ... --nnodes 2 --rdzv-endpoint node0:port`;
    nothing tells them their rank or interface: the launcher finds that node 0 hosts the
    rendezvous (its address is the endpoint's), each node's address on the link, and gloo's
    interface. Both finish and report the same losses."""
    config = write_config(tmp_path)
    endpoint = f"{two_nodes[0].addr}:29431"
    run_id = f"t{uuid.uuid4().hex[:8]}"  # the same on both nodes: one run
    procs = []
    for node in two_nodes:
        cmd = [
            "ip",
            "netns",
            "exec",
            node.ns,
            sys.executable,
            "-m",
            "accelops.cli",
            "train",
            config,
            "--nnodes",
            "2",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            run_id,
            "--rdzv-conf",
            "join_timeout=120",
        ]
        procs.append(subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            outputs.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (rc, err) in enumerate(outputs):
        assert rc == 0, f"node {i}: exit {rc}\n{err[-3000:]}"
    # The rendezvous may hand either node rank 0; together they hold ranks 0 and 1.
    per_node = [final_lines(err) for _, err in outputs]
    assert all(len(lines) == 1 for lines in per_node), outputs
    ((rank_a, line_a),) = per_node[0].items()
    ((rank_b, line_b),) = per_node[1].items()
    assert {rank_a, rank_b} == {0, 1}
    assert line_a == line_b and line_a[:2] == (2, 3)
