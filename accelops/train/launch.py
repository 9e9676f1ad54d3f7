"""Multi-process and multi-node launch for `accelops train`, through torchrun's elastic agent
(`torch.distributed.run`): accelops adds the command line, not a launcher of its own.

    accelops train run.toml --nproc-per-node 2                                  # one machine, 2 ranks
    accelops train run.toml --nnodes 2 --rdzv-endpoint node0:29400              # on each of 2 nodes
    torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node0:29400 -m accelops.train run.toml  # the same

With --nnodes > 1 each node runs the same command; torchrun's c10d rendezvous (hosted by
the node whose address is the endpoint's) assigns the ranks. Each node announces the
address it reaches the endpoint from (--local-addr, found from the routing table when not
given) and, unless GLOO_SOCKET_IFNAME is set, gloo is pointed at that address's interface:
hostname lookups, torchrun's and gloo's default, name an unreachable address on machines
whose hostname does not resolve to the link between the nodes.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import os
import socket
import struct

__all__ = ["add_arguments", "wanted", "child_argv", "torchrun_argv", "relaunch", "is_local_address"]

# flag -> takes a value; stripped from the command line the workers get.
_FLAGS = {
    "--nnodes": True,
    "--nproc-per-node": True,
    "--rdzv-endpoint": True,
    "--rdzv-id": True,
    "--rdzv-conf": True,
    "--max-restarts": True,
    "--local-addr": True,
    "--launcher": True,
    "--num-workers": True,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "launch (torchrun's elastic agent or Ray Train; leave out to run in this process)"
    )
    group.add_argument(
        "--launcher",
        choices=("torchrun", "ray"),
        default="torchrun",
        help="ray: run the trainer in Ray Train workers (pip install 'accelops[ray]')",
    )
    group.add_argument("--num-workers", type=int, default=2, metavar="N", help="Ray Train workers (--launcher ray)")
    group.add_argument(
        "--nnodes",
        default=None,
        metavar="N|MIN:MAX",
        help="number of nodes (each runs this same command); needs --rdzv-endpoint when > 1",
    )
    group.add_argument(
        "--nproc-per-node", type=int, default=None, metavar="N", help="processes (ranks) to start on this node"
    )
    group.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="the c10d rendezvous: an address of one node (it hosts the store) and a free port",
    )
    group.add_argument("--rdzv-id", default="accelops", help="run id shared by all nodes of one run")
    group.add_argument(
        "--rdzv-conf", default=None, metavar="K=V[,K=V]", help="extra rendezvous settings, e.g. join_timeout=600"
    )
    group.add_argument("--max-restarts", type=int, default=0, help="restarts of the worker group after a failure")
    group.add_argument(
        "--local-addr",
        default=None,
        metavar="ADDR",
        help="this node's address as the others reach it (default: the one routed to the endpoint)",
    )


def _max_nodes(nnodes) -> int:
    if nnodes is None:
        return 1
    text = str(nnodes)
    try:
        return int(text.split(":")[-1])
    except ValueError:
        raise ValueError(f"--nnodes must be N or MIN:MAX, got {text!r}") from None


def wanted(args) -> bool:
    """True when the command asks for more than this one process and we are not already a
    worker that torchrun started (then the flags were meant for the agent, which ran)."""
    if getattr(args, "launcher", "torchrun") == "ray":
        return False
    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("WORLD_SIZE"):
        return False
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    nodes = _max_nodes(getattr(args, "nnodes", None))
    if nodes < 1:
        raise ValueError(f"--nnodes must be >= 1, got {args.nnodes!r}")
    if nodes > 1 and not getattr(args, "rdzv_endpoint", None):
        raise ValueError(
            "--nnodes > 1 needs --rdzv-endpoint HOST:PORT (an address of one node, the same on every node)"
        )
    return nodes > 1 or (nproc or 1) > 1


def child_argv(argv) -> list[str]:
    """The `accelops train` arguments without the launch flags: what each worker runs."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = item.partition("=")
        if name in _FLAGS:
            skip = _FLAGS[name] and not eq
            continue
        out.append(item)
    return out


def is_local_address(host: str) -> bool:
    """True when `host` is an address of this machine (network namespace): a socket can bind
    to it. torchrun decides who hosts the c10d store by hostname, which two network
    namespaces (or containers) of one machine share, so it is told explicitly."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            if ipaddress.ip_address(sockaddr[0]).is_loopback:
                return True
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def route_address(host: str, port: int) -> str:
    """This machine's address on the route to host (no packet is sent: a UDP connect only
    picks the source address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the IPv4 interface that holds address, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def torchrun_argv(args, argv) -> list[str]:
    """torch.distributed.run's command line for this `accelops train` invocation."""
    nproc = args.nproc_per_node or 1
    out = ["--nproc-per-node", str(nproc), "--max-restarts", str(args.max_restarts)]
    if _max_nodes(args.nnodes) > 1:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {args.rdzv_endpoint!r}")
        conf = [c for c in (args.rdzv_conf or "").split(",") if c]
        if not any(c.split("=", 1)[0] == "is_host" for c in conf):
            conf.append(f"is_host={'true' if is_local_address(host) else 'false'}")
        local = args.local_addr or route_address(host, int(port))
        out += [
            "--nnodes",
            str(args.nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            args.rdzv_endpoint,
            "--rdzv-id",
            args.rdzv_id,
            "--rdzv-conf",
            ",".join(conf),
            "--local-addr",
            local,
        ]
    else:
        out += ["--standalone"]
    return out + ["--module", "accelops.train", *child_argv(argv)]


def relaunch(args, argv) -> int:
    """Runs this command's workers under torch.distributed.run (in this process: it becomes
    the node's elastic agent) -> 0, or raises torch's ChildFailedError naming the failed rank."""
    from torch.distributed.run import main as torchrun_main

    cmd = torchrun_argv(args, argv)
    if "--local-addr" in cmd and "GLOO_SOCKET_IFNAME" not in os.environ:
        iface = interface_of(cmd[cmd.index("--local-addr") + 1])
        if iface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = iface  # the workers inherit it
    torchrun_main(cmd)
    return 0
