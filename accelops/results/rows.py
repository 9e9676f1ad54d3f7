"""From bench rows (the dicts bench/ appends to bench/results/<family>.jsonl) to the
database's typed run and measurement records.

A bench row carries the run's metadata (run id, date, commit, machine, versions) beside
its own fields. The run part becomes one `runs` record; the rest is split into identity
(family, op, method, label), configuration (the fields that name the case measured: a
shape, a dtype, a problem), measurements (median, p20, p80, repeats, peak memory, bytes)
and everything else, which is kept whole in the `extra` JSON column so nothing a family
records is lost.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone

from .machine import fingerprint

# Run-level fields every bench row repeats (bench/common.py run_metadata).
RUN_FIELDS = ("run_id", "date", "git_commit", "git_dirty", "device", "machine", "versions", "quick", "env")

# The fields that name the case a row measured, per family; rows of one run, family,
# thread count and configuration measured the same thing and are compared (the `ratios`
# view). A family not listed falls back to every scalar field that is not a measurement.
CONFIG_FIELDS = {
    "matmul": ("M", "N", "K", "x_dtype"),
    "comm": ("case", "link", "model", "ranks"),
    "fake_quant": ("case", "shape", "dtype", "pass"),
    "ffn": ("T", "D", "H", "activation", "dtype", "mode"),
    "hpo": ("problem", "kind", "observations", "total_budget"),
    "lm": ("setup", "data"),
    "optim": ("case", "params", "shape", "dtype", "model"),
    "scaleout": ("model", "params", "ranks", "batch", "seq_len", "precision"),
}

# The baseline each accelops row is paired with in the stored ratio column (the `ratios`
# view pairs it with every other row of the same case): the thing a user would otherwise
# run, as each family's summary compares.
PRIMARY_BASELINE = {
    "matmul": lambda row: "fp32",
    "fake_quant": lambda row: "torch",
    "ffn": lambda row: "eager",
    "comm": lambda row: f"reference:{row['op']}" if row.get("op") else None,
}

MEASUREMENT_FIELDS = ("median_us", "p20_us", "p80_us", "min_us", "repeats", "peak_mem_bytes")
IDENTITY_FIELDS = ("family", "op", "method", "label", "backend", "accelops", "status", "threads")
# bytes the op had to move (comm and fake-quant rows call it "bytes")
BYTES_FIELDS = ("bytes_moved", "bytes")


def _json(value) -> str | None:
    if value is None:
        return None
    return json.dumps(value, sort_keys=True, default=str, allow_nan=True)


def _int(value):
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _float(value):
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def parse_time(text) -> datetime | None:
    """ISO-8601 (bench writes UTC with an offset) -> naive UTC datetime."""
    if not text:
        return None
    t = datetime.fromisoformat(str(text))
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t


def run_record(row: dict, source: str) -> dict:
    """The `runs` record of the run a bench row belongs to."""
    machine = dict(row.get("machine") or {})
    versions = row.get("versions") or {}
    gpu = machine.get("gpu_name", machine.get("gpu"))
    return {
        "run_id": str(row["run_id"]),
        "started": parse_time(row.get("date")),
        "git_commit": row.get("git_commit"),
        "git_dirty": row.get("git_dirty"),
        "machine_fingerprint": machine.get("fingerprint") or fingerprint(machine),
        "cpu_model": machine.get("cpu_model"),
        "cpu_count": _int(machine.get("cpu_count")),
        "cpu_features": list(machine.get("cpu_features") or []),
        "cpu_isa": machine.get("accelops_cpu_isa", machine.get("cpu_isa")),
        "memory_bytes": _int(machine.get("memory_bytes")),
        "gpu_name": gpu,
        "gpu_driver": machine.get("gpu_driver"),
        "platform": machine.get("platform"),
        "device": row.get("device"),
        "accelops_version": versions.get("accelops"),
        "torch_version": versions.get("torch"),
        "triton_version": versions.get("triton"),
        "python_version": versions.get("python"),
        "versions": _json(versions),
        "quick": bool(row.get("quick", False)),
        "env": _json(row.get("env") or {}),
        "source": source,
    }


def config_of(row: dict) -> dict:
    family = row.get("family")
    fields = CONFIG_FIELDS.get(family)
    if fields is None:
        skip = set(RUN_FIELDS) | set(IDENTITY_FIELDS) | set(MEASUREMENT_FIELDS) | set(BYTES_FIELDS)
        return {k: v for k, v in row.items()
                if k not in skip and isinstance(v, (str, int, bool)) and not k.endswith(("_s", "_ms", "_us"))}
    return {k: row[k] for k in fields if k in row}


def measurement_record(row: dict, seq: int) -> dict:
    """The `measurements` record of one bench row (seq: its position in the run's family)."""
    config = config_of(row)
    used = set(RUN_FIELDS) | set(IDENTITY_FIELDS) | set(MEASUREMENT_FIELDS) | set(config)
    is_accelops = row.get("accelops")
    device = row.get("device")
    backend = row.get("backend")
    if backend is None and is_accelops is not None:
        backend = ("cpu" if device == "cpu" else device) if is_accelops else "baseline"
    shape = row.get("shape")
    bytes_moved = next((_int(row[k]) for k in BYTES_FIELDS if _int(row.get(k)) is not None), None)
    used.update(k for k in BYTES_FIELDS if k in row)
    median = _float(row.get("median_us"))
    ratio = _float(row.get("speedup_vs_reference"))
    baseline_label = baseline_median = None
    if ratio is not None and median is not None:
        baseline_label, baseline_median = "reference", median * ratio
    return {
        "run_id": str(row["run_id"]),
        "family": row.get("family"),
        "seq": seq,
        "op": row.get("op") or row.get("method") or row.get("variant") or row.get("optimizer"),
        "method": row.get("method") or row.get("variant") or row.get("optimizer"),
        "label": row.get("label"),
        "backend": backend,
        "is_accelops": is_accelops,
        "status": row.get("status"),
        "threads": _int(row.get("threads")),
        "device": device,
        "dtype": row.get("dtype") or row.get("x_dtype"),
        "m": _int(row.get("M")),
        "n": _int(row.get("N")),
        "k": _int(row.get("K")),
        "shape": None if shape is None else "x".join(map(str, shape)) if isinstance(shape, (list, tuple)) else str(shape),
        "config": _json(config),
        "config_key": _json(config),
        "median_us": median,
        "p20_us": _float(row.get("p20_us")),
        "p80_us": _float(row.get("p80_us")),
        "min_us": _float(row.get("min_us")),
        "repeats": _int(row.get("repeats")),
        "peak_mem_bytes": _int(row.get("peak_mem_bytes")),
        "bytes_moved": bytes_moved,
        "baseline_label": baseline_label,
        "baseline_median_us": baseline_median,
        "ratio": ratio,
        "loadavg_1m": _float(row.get("loadavg_1m")),
        "extra": _json({k: v for k, v in row.items() if k not in used}),
    }


def pair_baselines(records: list[dict], rows: list[dict]) -> None:
    """Fill baseline_label / baseline_median_us / ratio (baseline median over this median:
    a speed-up, > 1 when accelops is faster) of accelops records from the family's primary
    baseline measured in the same run, case and thread count."""
    index = {}
    for rec, row in zip(records, rows):
        if rec["median_us"] is not None and rec["status"] in (None, "ok"):
            index[(rec["family"], rec["config_key"], rec["threads"], rec["method"])] = rec
    for rec, row in zip(records, rows):
        rule = PRIMARY_BASELINE.get(rec["family"])
        if not rec["is_accelops"] or rule is None or rec["ratio"] is not None or not rec["median_us"]:
            continue
        method = rule(row)
        base = index.get((rec["family"], rec["config_key"], rec["threads"], method))
        if base is not None and base is not rec:
            rec["baseline_label"] = base["label"] or method
            rec["baseline_median_us"] = base["median_us"]
            rec["ratio"] = base["median_us"] / rec["median_us"]
