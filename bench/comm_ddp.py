"""Data-parallel training step over 2 gloo ranks: DDP's default all-reduce, torch's fp16 and
PowerSGD hooks, accelops' BucketedAllReducer and each accelops compression hook, on an MLP
of 16.8M parameters (4 x Linear(2048, 2048)), per link:

- loopback: both ranks on 127.0.0.1 (inside a fresh network namespace when root, so its
  interface counters see only this traffic);
- 1gbit: as root, two network namespaces joined by a veth pair whose both ends are shaped
  with `tc qdisc ... tbf rate 1gbit` (netem is not available on this kernel); skipped with
  the reason otherwise.

A step is zero_grad, forward, backward (communication overlapping it), the reducer's
finish() where there is one, and SGD's step, on a fixed batch of 32 x 2048 per rank
("local" is the same step without any communication: the floor). The
methods are timed round-robin (a barrier before each step, rotated order each round) so
load from other processes hits each alike; torch's PowerSGD hook, which launches
collectives from future callbacks and can mismatch them across ranks, is timed last, on
its own process group, so a failure of it costs only its own row. Rows give median with
p20/p80 over the rounds (rank 0's wall time) and bytes per step and rank:
payload_bytes_per_step (what the method hands to collectives: the accelops hooks count
it; DDP and torch's hooks computed from the bucket sizes), wire_bytes_per_step (bytes this
rank transmitted on the link, TCP/IP overhead included, from the namespace's interface
counters; None without namespaces) and bytes_per_step (wire where measured, else payload).

Used by bench/bench_comm.py through run(quick, threads); also runs on its own:
    python bench/comm_ddp.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

WIDTH, LAYERS, BATCH = 2048, 4, 32  # 4 * (2048 * 2048 + 2048) = 16,785,408 parameters
QUICK = (256, 4, 8)
POWERSGD_RANK = 4
TOPK_RATIO = 0.01
LINK_RATE = "1gbit"

# (key, label, accelops?)
METHODS = [
    ("local", "no communication (each rank steps alone: the floor)", False),
    ("ddp", "DDP default all-reduce (fp32)", False),
    ("torch_fp16", "torch fp16_compress_hook", False),
    ("reducer", "accelops BucketedAllReducer (fp32)", True),
    ("bf16", "accelops hook bf16", True),
    ("fp16", "accelops hook fp16", True),
    ("int8", "accelops hook int8 (stochastic rounding)", True),
    ("topk", f"accelops hook topk {TOPK_RATIO:g} + error feedback", True),
    ("sign", "accelops hook sign (1 bit) + error feedback", True),
    ("powersgd", f"accelops hook powersgd rank {POWERSGD_RANK}", True),
    ("torch_powersgd", f"torch powerSGD_hook rank {POWERSGD_RANK}", False),
    ("torch_powersgd_1bucket", f"torch powerSGD_hook rank {POWERSGD_RANK}, one bucket (bucket_cap_mb=100)", False),
]
# Timed in launches of their own, after the others, with a watchdog: torch's PowerSGD hook
# waits on a future inside a callback that runs on gloo's run-loop threads; with several
# buckets in flight both threads block and the process group deadlocks (seen here on the
# 1 Gbit link). With one bucket it can run; that row is timed only when the default hangs.
SEPARATE = ("torch_powersgd", "torch_powersgd_1bucket")
SEPARATE_TIMEOUT_S = 240
LABELS = {k: label for k, label, _ in METHODS}
HOOK_OPTIONS = {"topk": {"ratio": TOPK_RATIO}, "powersgd": {"rank": POWERSGD_RANK}}


# =========================================================================== one rank (child process)


def _mlp(width: int, layers: int):
    import torch.nn as nn

    mods = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i + 1 < layers:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def _iface_tx(iface: str | None) -> int | None:
    if not iface:
        return None
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                return int(rest.split()[8])
    return None


def _powersgd_payload(model, rank: int) -> int:
    """Bytes per step PowerSGD hands to its all-reduces: P and Q of each compressed matrix,
    the other parameters whole (torch's and accelops' rules are the same)."""
    total = 0
    for p in model.parameters():
        if p.dim() >= 2:
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            r = min(rank, rows, cols)
            if (rows + cols) * r * 2 < rows * cols:
                total += (rows + cols) * r
                continue
        total += p.numel()
    return total * 4


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    import accelops.distributed as ad

    torch.set_num_threads(args.threads)
    if args.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = args.ifname
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.addr}:{args.port}",
        rank=args.rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=300),
    )
    rank = args.rank
    width, layers, batch = QUICK if args.quick else (WIDTH, LAYERS, BATCH)
    torch.manual_seed(0)
    base = _mlp(width, layers)
    n_params = sum(p.numel() for p in base.parameters())
    grad_bytes = n_params * 4
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank + 1))

    # link check: one 16 MB all-reduce, timed
    probe = torch.ones((4 << 20) if not args.quick else 1 << 16)
    dist.all_reduce(probe)
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(probe)
    probe_s = time.perf_counter() - t0

    setups, errors = {}, {}
    for key in args.methods.split(","):
        try:
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=1e-4)
            finish, state, payload = None, None, None
            if key == "local":
                wrapped, payload = model, 0
            elif key == "reducer":
                reducer = ad.BucketedAllReducer(model)
                wrapped, finish, state = model, reducer.finish, reducer
            else:
                wrapped = DDP(model)
                if key == "ddp":
                    payload = grad_bytes
                elif key == "torch_fp16":
                    wrapped.register_comm_hook(None, default_hooks.fp16_compress_hook)
                    payload = grad_bytes // 2
                elif key.startswith("torch_powersgd"):
                    if key.endswith("1bucket"):
                        wrapped = DDP(model, bucket_cap_mb=100)
                    group = dist.new_group(timeout=datetime.timedelta(seconds=120))
                    psgd = torch_psgd.PowerSGDState(
                        process_group=group, matrix_approximation_rank=POWERSGD_RANK, start_powerSGD_iter=2
                    )
                    wrapped.register_comm_hook(psgd, torch_psgd.powerSGD_hook)
                    payload = _powersgd_payload(model, POWERSGD_RANK)
                else:
                    state = ad.register_compression(wrapped, key, **HOOK_OPTIONS.get(key, {}))
            setups[key] = (model, wrapped, opt, finish, state, payload)
        except Exception as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"[:500]

    def step(key):
        model, wrapped, opt, finish, _, _ = setups[key]
        opt.zero_grad(set_to_none=True)
        wrapped(x).square().mean().backward()
        if finish is not None:
            finish()
        opt.step()

    times = {k: [] for k in setups}
    wire = {k: [] for k in setups}

    def timed_rounds(keys, rounds, warmup):
        for r in range(warmup + rounds):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            for key in order:
                if key in errors:
                    continue
                try:
                    dist.barrier()
                    tx0 = _iface_tx(args.count_iface)
                    t0 = time.perf_counter()
                    step(key)
                    dt = time.perf_counter() - t0
                    tx1 = _iface_tx(args.count_iface)
                except Exception as exc:
                    errors[key] = f"{type(exc).__name__}: {exc}"[:500]
                    raise
                if r >= warmup:
                    times[key].append(dt)
                    if tx0 is not None:
                        wire[key].append((tx1 - tx0) / args.count_divisor)

    keys = [k for k in setups if k not in errors]
    if keys:  # torch's PowerSGD compresses from its step 2 on: 3 warm-up steps at least
        timed_rounds(keys, args.rounds, max(args.warmup, 3) if any(k in SEPARATE for k in keys) else args.warmup)

    if rank == 0:
        out = {
            "params": n_params,
            "width": width,
            "layers": layers,
            "batch": batch,
            "probe_allreduce_bytes": probe.numel() * 4,
            "probe_allreduce_s": probe_s,
            "methods": {},
        }
        for key in args.methods.split(","):
            entry = {"times_s": times.get(key, []), "wire": wire.get(key, [])}
            if key in errors:
                entry["error"] = errors[key]
            elif key in setups:
                state, payload = setups[key][4], setups[key][5]
                entry["payload"] = state.bytes_last_step if state is not None else payload
            out["methods"][key] = entry
        Path(args.out).write_text(json.dumps(out))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


# =========================================================================== links (parent)


def _run(cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Netns:
    """Network namespaces for one link; removed on exit (which removes the veth pair)."""

    def __init__(self, kind: str):
        self.kind = kind
        tag = f"{os.getpid() % 100000}"
        self.names = []
        if kind == "loopback":
            self.names = [f"aolo{tag}"]
        else:
            self.names = [f"ao0{tag}", f"ao1{tag}"]
            self.veth = [f"aov0{tag}", f"aov1{tag}"]

    def __enter__(self):
        try:
            for ns in self.names:
                _run(["ip", "netns", "add", ns])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.kind == "1gbit":
                v0, v1 = self.veth
                _run(["ip", "link", "add", v0, "type", "veth", "peer", "name", v1])
                for ns, v, addr in zip(self.names, self.veth, ("10.77.0.1/24", "10.77.0.2/24")):
                    _run(["ip", "link", "set", v, "netns", ns])
                    _run(["ip", "-n", ns, "addr", "add", addr, "dev", v])
                    _run(["ip", "-n", ns, "link", "set", v, "up"])
                    # Both directions shaped: the all-reduce sends both ways at once.
                    _run(
                        [
                            "tc",
                            "-n",
                            ns,
                            "qdisc",
                            "add",
                            "dev",
                            v,
                            "root",
                            "tbf",
                            "rate",
                            LINK_RATE,
                            "burst",
                            "256kb",
                            "latency",
                            "20ms",
                        ]
                    )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for ns in self.names:
            _run(["ip", "netns", "del", ns], check=False)

    def ranks(self):
        """-> per rank (command prefix, master address, GLOO_SOCKET_IFNAME, counted interface)."""
        if self.kind == "loopback":
            pre = ["ip", "netns", "exec", self.names[0]]
            return [(pre, "127.0.0.1", "lo", "lo"), (pre, "127.0.0.1", "lo", None)]
        return [
            (["ip", "netns", "exec", self.names[0]], "10.77.0.1", self.veth[0], self.veth[0]),
            (["ip", "netns", "exec", self.names[1]], "10.77.0.1", self.veth[1], None),
        ]


def can_use_netns() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root: network namespaces (ip netns) need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    probe = f"aoprobe{os.getpid() % 100000}"
    try:
        _run(["ip", "netns", "add", probe])
    except (subprocess.SubprocessError, OSError) as exc:
        return f"ip netns add failed: {getattr(exc, 'stderr', '') or exc}".strip()
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _launch(
    link: str,
    netns: Netns | None,
    quick: bool,
    threads: int,
    methods: list[str],
    rounds: int,
    warmup: int,
    timeout_s: float = 3600,
) -> dict:
    """Runs the methods on 2 rank processes -> rank 0's result. TimeoutError after timeout_s."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        env.pop("TRITON_INTERPRET", None)
        env["OMP_NUM_THREADS"] = str(threads)
        port = _free_port()
        if netns is None:
            per_rank = [([], "127.0.0.1", None, None)] * 2
            divisor = 1
        else:
            per_rank = netns.ranks()
            divisor = 2 if link == "loopback" else 1  # both ranks' traffic crosses one lo
        procs = []
        for rank, (pre, addr, ifname, count) in enumerate(per_rank):
            cmd = pre + [
                sys.executable,
                str(Path(__file__).resolve()),
                "--_rank",
                str(rank),
                "--addr",
                addr,
                "--port",
                str(port),
                "--threads",
                str(threads),
                "--methods",
                ",".join(methods),
                "--rounds",
                str(rounds),
                "--warmup",
                str(warmup),
                "--out",
                out,
                "--count-divisor",
                str(divisor),
            ]
            if ifname:
                cmd += ["--ifname", ifname]
            if count:
                cmd += ["--count-iface", count]
            if quick:
                cmd.append("--quick")
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs, hung = [], False
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                hung = True
                p.kill()
                logs.append(p.communicate()[0])
        if hung:
            raise TimeoutError(f"{link}: {','.join(methods)}: no result within {timeout_s:.0f} s (hung); killed")
        if not os.path.exists(out):
            tail = "\n".join(
                f"rank {r} (exit {p.returncode}): {log[-1500:]}" for r, (p, log) in enumerate(zip(procs, logs))
            )
            raise RuntimeError(f"{link}: no result; {tail}")
        return json.loads(Path(out).read_text())


def _percentile(values, q):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def run(quick: bool, threads: int) -> list[dict]:
    """-> one row per (link, method): method, label, link, accelops, status, median_us,
    p20_us, p80_us, payload_bytes_per_step, wire_bytes_per_step, bytes_per_step,
    time_vs_ddp, bytes_vs_ddp (DDP's bytes / this method's) and the set-up."""
    methods = [k for k, _, _ in METHODS]
    rounds, warmup = (3, 2) if quick else (12, 3)
    why_not = can_use_netns()
    links = [("loopback", "loopback")]
    if not quick:
        links.append((LINK_RATE, "1gbit"))
    rows = []
    for link, kind in links:
        base = {"link": link, "threads": threads, "quick": quick, "ranks": 2, "backend": "gloo"}
        if kind == "1gbit" and why_not:
            rows.append(
                {
                    **base,
                    "method": None,
                    "label": None,
                    "status": "skipped",
                    "reason": f"{LINK_RATE} link skipped: {why_not}",
                }
            )
            print(f"comm_ddp: {LINK_RATE} link skipped: {why_not}", file=sys.stderr)
            continue
        main_methods = [k for k in methods if k not in SEPARATE]
        try:
            with Netns(kind) if not why_not else contextlib.nullcontext() as ns:
                base["netns"] = ns is not None
                res = _launch(link, ns, quick, threads, main_methods, rounds, warmup)
                print(f"comm_ddp: {link}: main methods done", file=sys.stderr)
                for key in SEPARATE:
                    try:
                        part = _launch(link, ns, quick, threads, [key], rounds, warmup, timeout_s=SEPARATE_TIMEOUT_S)
                        res["methods"].update(part["methods"])
                        break  # the one-bucket fallback only after a hang
                    except Exception as exc:
                        res["methods"][key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                        print(f"comm_ddp: {link}: {key}: {exc}"[:300], file=sys.stderr)
        except Exception as exc:
            rows.append(
                {
                    **base,
                    "method": None,
                    "label": None,
                    "status": "error",
                    "reason": f"{type(exc).__name__}: {exc}"[:2000],
                }
            )
            continue
        base.update(
            params=res["params"],
            model=f"MLP {res['layers']} x Linear({res['width']}, {res['width']})",
            batch_per_rank=res["batch"],
            rounds=rounds,
            warmup_rounds=warmup,
            link_probe_mb_s=res["probe_allreduce_bytes"] / res["probe_allreduce_s"] / 1e6,
        )
        link_rows = []
        for key, label, is_accelops in METHODS:
            if key not in res["methods"]:
                continue
            entry = res["methods"][key]
            row = {**base, "method": key, "label": label, "accelops": is_accelops}
            if "error" in entry or not entry.get("times_s"):
                row.update(status="error", reason=entry.get("error", "no timed steps"))
            else:
                t = entry["times_s"]
                wire = entry["wire"]
                wire_b = int(_percentile(wire, 0.5)) if wire else None
                row.update(
                    status="ok",
                    median_us=_percentile(t, 0.5) * 1e6,
                    p20_us=_percentile(t, 0.2) * 1e6,
                    p80_us=_percentile(t, 0.8) * 1e6,
                    min_us=min(t) * 1e6,
                    steps=len(t),
                    payload_bytes_per_step=entry.get("payload"),
                    wire_bytes_per_step=wire_b,
                    bytes_per_step=wire_b if wire_b is not None else entry.get("payload"),
                    bytes_method="wire (interface tx counter, median)"
                    if wire_b is not None
                    else "payload (bytes handed to collectives)",
                )
            link_rows.append(row)
        ddp = next((r for r in link_rows if r["method"] == "ddp" and r["status"] == "ok"), None)
        for row in link_rows:
            if ddp and row["status"] == "ok" and row["method"] != "local":
                row["time_vs_ddp"] = row["median_us"] / ddp["median_us"]
                if row.get("bytes_per_step"):
                    row["bytes_vs_ddp"] = ddp["bytes_per_step"] / row["bytes_per_step"]
        rows += link_rows
    return rows


def _x(ratio, digits):
    return "-" if ratio is None else f"{ratio:.{digits}f}x"


def check_target(rows: list[dict]) -> dict | None:
    """The issue's target on the slow link: the fastest accelops hook among those sending at
    least 16x fewer bytes than DDP must take at most 0.5x DDP's step time."""
    slow = [
        r
        for r in rows
        if r["link"] == LINK_RATE
        and r.get("status") == "ok"
        and r.get("accelops")
        and r["method"] != "reducer"
        and r.get("bytes_vs_ddp") is not None
    ]
    if not slow:
        return None
    few = [r for r in slow if r["bytes_vs_ddp"] >= 16]
    best = min(few or slow, key=lambda r: r["median_us"])
    met = bool(few) and best["time_vs_ddp"] <= 0.5
    text = (
        f"Target ({LINK_RATE}: an accelops hook at <= 0.5x DDP's step time with >= 16x fewer bytes): "
        f"{best['label']}: {best['time_vs_ddp']:.2f}x time, {best['bytes_vs_ddp']:.1f}x fewer bytes: "
        f"{'met' if met else 'NOT met'}"
    )
    return {
        "met": met,
        "method": best["method"],
        "time_vs_ddp": best["time_vs_ddp"],
        "bytes_vs_ddp": best["bytes_vs_ddp"],
        "text": text,
    }


def summary(rows: list[dict]) -> str:
    """Markdown table of the rows, and the 1 Gbit target."""
    lines = []
    for link in dict.fromkeys(r["link"] for r in rows):
        link_rows = [r for r in rows if r["link"] == link]
        skipped = [r for r in link_rows if r["method"] is None]
        lines.append(f"#### link: {link}")
        if skipped:
            lines += [f"{r['status']}: {r['reason']}" for r in skipped]
            continue
        first = link_rows[0]
        lines.append(
            f"{first['model']}, {first['params']:,} parameters, batch {first['batch_per_rank']} per rank, "
            f"2 gloo ranks, {first['threads']} thread(s) each; probe all-reduce "
            f"{first['link_probe_mb_s']:.0f} MB/s"
        )
        lines.append("")
        lines.append("| method | median | p20 - p80 | bytes/step/rank | vs DDP time | DDP bytes / bytes |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for r in link_rows:
            if r["status"] != "ok":
                lines.append(f"| {r['label']} | {r['status']}: {r.get('reason', '')[:80]} | | | | |")
                continue
            lines.append(
                f"| {r['label']} | {r['median_us'] / 1e3:.1f} ms | {r['p20_us'] / 1e3:.1f} - "
                f"{r['p80_us'] / 1e3:.1f} ms | {r['bytes_per_step'] / 1e6:.3g} MB | "
                f"{_x(r.get('time_vs_ddp'), 2)} | {_x(r.get('bytes_vs_ddp'), 1)} |"
            )
        lines.append("")
    target = check_target(rows)
    if target:
        lines.append(target["text"])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--addr", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ifname", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--count-iface", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--count-divisor", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--methods", default=",".join(k for k, _, _ in METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._rank is not None:
        args.rank = args._rank
        rank_main(args)
        return 0
    rows = run(args.quick, args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
