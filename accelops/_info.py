"""What accelops can run on this machine, and why any backend is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import platform

import torch

from .ops._backend import extension, triton_interpreting, triton_status

TUNED_OPS = ("ternary_matmul", "int8_linear")

_FEATURES = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vnni",
    "avxvnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
# Linux /proc/cpuinfo spells some flags with an underscore (avx512_vnni, avx_vnni); the
# names above are the ones ACCELOPS_CPU_ISA and __builtin_cpu_supports use.
_FLAG_SPELLINGS = {"avx512vnni": ("avx512vnni", "avx512_vnni"), "avxvnni": ("avxvnni", "avx_vnni")}


def cpu_features(flags: set[str]) -> list[str]:
    return [f for f in _FEATURES if any(s in flags for s in _FLAG_SPELLINGS.get(f, (f,)))]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def info_dict() -> dict:
    from . import __version__

    ext, ext_why = extension()
    flags = _cpu_flags()
    ok_triton, triton_why = triton_status()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # find_spec, not import: importing accelops._C_cuda registers its CUDA kernels, which
    # only ops/_backend.py decides to do (when triton is missing).
    cuda_ext = importlib.util.find_spec("accelops._C_cuda") is not None
    if cuda_ext:
        cuda_why = "built; in use for CUDA tensors only when triton is missing" if ok_triton else "built; not in use"
    elif torch.version.cuda is None:
        cuda_why = "torch was built without CUDA, so accelops._C_cuda was not built"
    else:
        cuda_why = "not built (needs nvcc / CUDA_HOME at build time)"
    return {
        "accelops": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "machine": f"{cpu_model()}, {torch.get_num_threads()} torch threads",
        "cpu_extension": ext is not None,
        "cpu_extension_reason": ext_why,
        "cpu_isa": ext.cpu_isa() if ext is not None else None,  # of the int8/ternary kernels
        "cpu_features": cpu_features(flags),
        "triton_available": ok_triton,
        "triton_reason": triton_why,
        "triton_interpret": triton_interpreting(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda_extension": cuda_ext,
        "cuda_extension_reason": cuda_why,
        "dispatch": dispatch_dict(ext.cpu_isa() if ext is not None else None, cpu_features(flags)),
    }


def _gemv_path(isa: str | None, features: list[str]) -> str | None:
    """The ternary M=1 GEMV's instruction set at dot level `isa`: the rule of gemv_vnni256 in
    csrc/cpu/ternary.cpp (256-bit vpdpbusd inside the avx2 level when the CPU has AVX-VNNI, or
    with ACCELOPS_CPU_ISA=avxvnni on an AVX-512 VNNI CPU through the EVEX form)."""
    import os

    if isa != "avx2":
        return isa
    requested = os.environ.get("ACCELOPS_CPU_ISA", "").strip() or "avx512vnni"
    if requested not in ("avxvnni", "avx512vnni"):
        return "avx2"
    if "avxvnni" in features:
        return "avxvnni (256-bit vpdpbusd)"
    if requested == "avxvnni" and "avx512vnni" in features:
        return "avxvnni (256-bit vpdpbusd, EVEX form)"
    return "avx2"


def dispatch_dict(isa: str | None, features: list[str]) -> dict:
    """The path each tuned op takes on CPU tensors here, and the dispatch table's state."""
    from collections import Counter

    from .ops import _backend, _tuning

    try:
        forced = _backend.forced_backend()
    except ValueError as exc:
        forced = f"invalid: {exc}"
    disabled = os.environ.get(_tuning.ENV_DISABLE, "1") == "0"
    autotune = _tuning.autotune_enabled() and not disabled
    try:
        budget = _tuning.autotune_budget()
    except ValueError as exc:
        budget, autotune = None, f"invalid: {exc}"
    path = _tuning.default_path()
    table = None if disabled else _tuning.load(path, warn=False)
    others = []
    if path.exists():
        try:
            others = sorted(set(json.loads(path.read_text()).get("tables", {})) - {table.fingerprint if table else ""})
        except (OSError, ValueError, AttributeError):
            others = ["(unreadable file)"]
    ops = {}
    for op in TUNED_OPS:
        try:
            backend = _backend._choose(
                op, torch.device("cpu"), None if forced and forced.startswith("invalid") else forced
            )
        except RuntimeError as exc:
            backend = f"error: {exc}"
        entries = (table.entries.get(op, {}) if table else {}).values()
        choices = Counter(
            f"{c.backend} x{c.threads}" + (f" tiles {c.tiles[0]}/{c.tiles[1]}" if c.tiles else "") for c in entries
        )
        ops[op] = {
            "backend": backend,
            "kernel_isa": isa if backend == "native" else None,
            "m1_gemv_isa": _gemv_path(isa, features) if backend == "native" and op == "ternary_matmul" else None,
            "table_entries": sum(choices.values()),
            "table_choices": dict(choices.most_common()),
        }
    return {
        "forced_backend": forced,
        "table": str(path),
        "table_exists": path.exists(),
        "table_disabled": disabled,
        "fingerprint": table.fingerprint if table else None,
        "other_machines": others,
        "autotune": autotune,
        "autotune_budget_s": budget,
        "ops": ops,
    }


def info(file=None) -> dict:
    """Print the versions and the backends available here (with the reason any is missing)."""
    d = info_dict()

    def line(label, ok, detail):
        print(f"  {label:<14} {'yes' if ok else 'no ':<4} {detail or ''}", file=file)

    print(f"accelops {d['accelops']}  torch {d['torch']}  triton {d['triton'] or '-'}  python {d['python']}", file=file)
    print(f"machine: {d['machine']}", file=file)
    print("backends:", file=file)
    line(
        "cpu (C++)",
        d["cpu_extension"],
        f"int8/ternary kernels use {d['cpu_isa']}"
        f"{' (others avx2)' if d['cpu_isa'] == 'avx512vnni' else ''}; CPU has {', '.join(d['cpu_features']) or 'no SIMD extensions'}"
        if d["cpu_extension"]
        else d["cpu_extension_reason"],
    )
    line(
        "triton",
        d["triton_available"],
        (
            "interpreter (TRITON_INTERPRET=1)"
            if d["triton_interpret"]
            else "runs on CUDA tensors"
            if d["cuda_available"]
            else "no GPU here: runs only under TRITON_INTERPRET=1"
        )
        if d["triton_available"]
        else d["triton_reason"],
    )
    line("cuda", d["cuda_available"], d["cuda_device"] or "torch sees no CUDA device")
    line("cuda ext", d["cuda_extension"], d["cuda_extension_reason"])
    line("reference", True, "pure PyTorch, always available")
    disp = d["dispatch"]
    print("dispatch of the tuned ops (CPU tensors):", file=file)
    if disp["forced_backend"]:
        print(f"  ACCELOPS_BACKEND={disp['forced_backend']}: no table, no autotune", file=file)
    if disp["table_disabled"]:
        table = "ignored (ACCELOPS_TUNED=0)"
    elif disp["fingerprint"]:
        table = f"{disp['table']} (this machine: {disp['fingerprint']})"
    else:
        table = f"{disp['table']} ({'no table for this machine' if disp['table_exists'] else 'not written yet'})"
    if disp["other_machines"]:
        table += f"; tables of other machines, ignored: {', '.join(disp['other_machines'])}"
    print(f"  table          {table}", file=file)
    auto = disp["autotune"]
    print(
        "  autotune       "
        + (
            f"on: the first call of an (op, M bucket, N, K, dtype, threads) without an entry measures its "
            f"candidates for about {disp['autotune_budget_s']:g} s (ACCELOPS_AUTOTUNE=0: off)"
            if auto is True
            else auto
            if isinstance(auto, str)
            else "off: a shape without an entry takes the nearest measured one's choice, or the default"
        ),
        file=file,
    )
    for op, o in disp["ops"].items():
        if o["backend"] == "native":
            path = f"C++ {o['kernel_isa']} kernels"
            if o["m1_gemv_isa"]:
                path += f" (M=1 GEMV: {o['m1_gemv_isa']})"
        else:
            path = o["backend"]
        if o["table_entries"]:
            picks = ", ".join(f"{k} on {v}" for k, v in o["table_choices"].items())
            path += f"; per shape from the table ({o['table_entries']} entries): {picks}"
        elif o["backend"] == "native":
            path += " at the caller's threads, own tiles (no entry yet)"
        print(f"  {op:<14} {path}", file=file)
    return d
