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
    "eval": ("task", "split", "metric", "model_config", "train_config", "seeds", "vocab_size"),
    "optim": ("case", "params", "shape", "dtype", "model"),
    "scaleout": ("model", "params", "ranks", "batch", "seq_len", "precision"),
    "generate": ("engine", "shape", "batch", "prompt_tokens", "new_tokens"),
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


class RowError(ValueError):
    """A field of a bench row that its database column cannot hold. The database refuses
    the row rather than store NULL or a cast in its place (a median of "fast" is not an
    unmeasured median); the importer adds the file and line."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field!r}: {reason}")
        self.field = field


INT32 = (-(1 << 31), (1 << 31) - 1)  # DuckDB INTEGER
INT64 = (-(1 << 63), (1 << 63) - 1)  # DuckDB BIGINT


def _json(value) -> str | None:
    if value is None:
        return None
    # allow_nan: rows written before bench/common.py refused NaN (hpo regret curves) keep them
    return json.dumps(value, sort_keys=True, default=str, allow_nan=True)


def _int(value, field: str, bounds=INT64):
    """An integer column's value: None, an int, or a float with an integer value; anything
    else (a string, a bool, 1.5, 2**70 in a BIGINT) is refused with the field's name."""
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError(field, f"expected an integer, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise RowError(field, f"{value} is out of the column's range [{bounds[0]}, {bounds[1]}]")
    return value


def _float(value, field: str):
    """A DOUBLE column's value: None or a number. NaN and infinities are numbers and kept
    (the regression check flags them); a string or a bool is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(field, f"expected a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise RowError(field, f"{value} is too large for a DOUBLE") from None


def _bool(value, field: str):
    if value is None or isinstance(value, bool):
        return value
    raise RowError(field, f"expected true or false, got {value!r}")


def _text(value, field: str):
    """A VARCHAR column's value: strings as they are, numbers as their text; a list or an
    object has no single text and is refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RowError(field, f"expected a string, got {value!r}")


def _object(value, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RowError(field, f"expected an object, got {value!r}")
    return value


def parse_time(text, field: str = "date") -> datetime | None:
    """ISO-8601 (bench writes UTC with an offset) -> naive UTC datetime."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        t = None
    if t is None:
        raise RowError(field, f"expected an ISO-8601 time such as 2026-12-01T10:00:00+00:00, got {text!r}")
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t


def _first_text(row: dict, keys):
    """The first of `keys` with a value (the `op` column takes op, else method, ...)."""
    key = next((k for k in keys if row.get(k)), None)
    return None if key is None else _text(row[key], key)


def run_record(row: dict, source: str) -> dict:
    """The `runs` record of the run a bench row belongs to (RowError: a field its column
    cannot hold)."""
    machine = dict(_object(row.get("machine"), "machine"))
    versions = _object(row.get("versions"), "versions")
    features = machine.get("cpu_features") or []
    if not isinstance(features, (list, tuple)) or not all(isinstance(f, str) for f in features):
        raise RowError("machine.cpu_features", f"expected a list of strings, got {features!r}")
    gpu_key = "gpu_name" if "gpu_name" in machine else "gpu"
    isa_key = "accelops_cpu_isa" if "accelops_cpu_isa" in machine else "cpu_isa"
    return {
        "run_id": str(row["run_id"]),
        "started": parse_time(row.get("date")),
        "git_commit": _text(row.get("git_commit"), "git_commit"),
        "git_dirty": _bool(row.get("git_dirty"), "git_dirty"),
        "machine_fingerprint": _text(machine.get("fingerprint"), "machine.fingerprint") or fingerprint(machine),
        "cpu_model": _text(machine.get("cpu_model"), "machine.cpu_model"),
        "cpu_count": _int(machine.get("cpu_count"), "machine.cpu_count", INT32),
        "cpu_features": list(features),
        "cpu_isa": _text(machine.get(isa_key), f"machine.{isa_key}"),
        "memory_bytes": _int(machine.get("memory_bytes"), "machine.memory_bytes"),
        "gpu_name": _text(machine.get(gpu_key), f"machine.{gpu_key}"),
        "gpu_driver": _text(machine.get("gpu_driver"), "machine.gpu_driver"),
        "platform": _text(machine.get("platform"), "machine.platform"),
        "device": _text(row.get("device"), "device"),
        "accelops_version": _text(versions.get("accelops"), "versions.accelops"),
        "torch_version": _text(versions.get("torch"), "versions.torch"),
        "triton_version": _text(versions.get("triton"), "versions.triton"),
        "python_version": _text(versions.get("python"), "versions.python"),
        "versions": _json(versions),
        "quick": bool(_bool(row.get("quick"), "quick")),
        "env": _json(_object(row.get("env"), "env")),
        "source": source,
    }


def config_of(row: dict) -> dict:
    family = row.get("family")
    fields = CONFIG_FIELDS.get(family)
    if fields is None:
        skip = set(RUN_FIELDS) | set(IDENTITY_FIELDS) | set(MEASUREMENT_FIELDS) | set(BYTES_FIELDS)
        return {
            k: v
            for k, v in row.items()
            if k not in skip and isinstance(v, (str, int, bool)) and not k.endswith(("_s", "_ms", "_us"))
        }
    return {k: row[k] for k in fields if k in row}


def measurement_record(row: dict, seq: int) -> dict:
    """The `measurements` record of one bench row (seq: its position in the run's family;
    RowError: a field its column cannot hold)."""
    config = config_of(row)
    used = set(RUN_FIELDS) | set(IDENTITY_FIELDS) | set(MEASUREMENT_FIELDS) | set(config)
    is_accelops = _bool(row.get("accelops"), "accelops")
    device = _text(row.get("device"), "device")
    backend = _text(row.get("backend"), "backend")
    if backend is None and is_accelops is not None:
        backend = ("cpu" if device == "cpu" else device) if is_accelops else "baseline"
    shape = row.get("shape")
    bytes_key = next((k for k in BYTES_FIELDS if row.get(k) is not None), None)
    bytes_moved = None if bytes_key is None else _int(row[bytes_key], bytes_key)
    used.update(k for k in BYTES_FIELDS if k in row)
    median = _float(row.get("median_us"), "median_us")
    ratio = _float(row.get("speedup_vs_reference"), "speedup_vs_reference")
    baseline_label = baseline_median = None
    if ratio is not None and median is not None:
        baseline_label, baseline_median = "reference", median * ratio
    return {
        "run_id": str(row["run_id"]),
        "family": _text(row.get("family"), "family"),
        "seq": seq,
        "op": _first_text(row, ("op", "method", "variant", "optimizer", "engine")),
        "method": _first_text(row, ("method", "variant", "optimizer", "engine")),
        "label": _text(row.get("label"), "label"),
        "backend": backend,
        "is_accelops": is_accelops,
        "status": _text(row.get("status"), "status"),
        "threads": _int(row.get("threads"), "threads", INT32),
        "device": device,
        "dtype": _first_text(row, ("dtype", "x_dtype")),
        "m": _int(row.get("M"), "M"),
        "n": _int(row.get("N"), "N"),
        "k": _int(row.get("K"), "K"),
        "shape": None
        if shape is None
        else "x".join(map(str, shape))
        if isinstance(shape, (list, tuple))
        else str(shape),
        "config": _json(config),
        "config_key": _json(config),
        "median_us": median,
        "p20_us": _float(row.get("p20_us"), "p20_us"),
        "p80_us": _float(row.get("p80_us"), "p80_us"),
        "min_us": _float(row.get("min_us"), "min_us"),
        "repeats": _int(row.get("repeats"), "repeats", INT32),
        "peak_mem_bytes": _int(row.get("peak_mem_bytes"), "peak_mem_bytes"),
        "bytes_moved": bytes_moved,
        "baseline_label": baseline_label,
        "baseline_median_us": baseline_median,
        "ratio": ratio,
        "loadavg_1m": _float(row.get("loadavg_1m"), "loadavg_1m"),
        "extra": _json({k: v for k, v in row.items() if k not in used}),
    }


def check_row(row) -> None:
    """Raise RowError naming the first field of `row` the database cannot store as its
    column's type (or ValueError when it is no bench row at all), before anything is written."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object (a bench row), got {type(row).__name__}")
    if "run_id" not in row or "family" not in row:
        raise ValueError(f"bench row without run_id/family: {sorted(row)[:8]}...")
    run_record(row, "check")
    measurement_record(row, 0)


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
