"""The machine a measurement was taken on, and its fingerprint (used by accelops.results
and by the tuned dispatch of accelops.ops, which ignores a table from another machine).

The fingerprint names a class of machine whose timings may be compared: the same CPU
model, logical core count and instruction-set features, and the same GPU model. Memory
size and the GPU driver are recorded beside it but left out of it, so that a VM resized
or a driver updated does not cut a machine's history in two; results from bench rows
written before this module existed (which recorded no memory size) get the same
fingerprint as new rows from the same machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

# The instruction sets accelops' kernels dispatch on (csrc/cpu/cpu_features.h), in the
# order accelops.info reports them.
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avxvnni")


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpu() -> tuple[str | None, str | None]:
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name(0)
    driver = None
    try:  # the driver version, when NVML is there (nvidia-ml-py is not a dependency)
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # noqa: BLE001 - the driver version is a nicety, never a failure
        driver = f"cuda runtime {torch.version.cuda}"
    return name, driver


def machine_info() -> dict:
    """What this machine is, in the fields the results database records."""
    from ._info import _cpu_flags, cpu_model

    flags = _cpu_flags()
    gpu_name, gpu_driver = _gpu()
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_features": [f for f in CPU_FEATURES if f in flags],
        "memory_bytes": _memory_bytes(),
        "gpu_name": gpu_name,
        "gpu_driver": gpu_driver,
        "platform": platform.platform(),
    }
    info["fingerprint"] = fingerprint(info)
    return info


def fingerprint(machine: dict) -> str:
    """16 hex digits from the fields that decide which timings are comparable.

    `machine` may be a machine_info() dict or the `machine` dict of a bench row
    (keys cpu_model, cpu_count, cpu_features, gpu)."""
    gpu = machine.get("gpu_name", machine.get("gpu"))
    key = {
        "cpu_model": machine.get("cpu_model"),
        "cpu_count": machine.get("cpu_count"),
        "cpu_features": sorted(machine.get("cpu_features") or []),
        "gpu": gpu,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
