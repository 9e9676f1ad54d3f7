"""What accelops can run on this machine, and why any backend is missing."""

from __future__ import annotations

import importlib.util
import platform

import torch

from .ops._backend import extension, triton_interpreting, triton_status

_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni")
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
    return d
