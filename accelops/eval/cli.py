"""`accelops eval CONFIG`: train, deploy and evaluate full-precision, quantized and shared
variants on real tasks (accelops.eval.experiment), compare each with the baseline, store
the rows in the results database (family "eval") and draw a plot.

A config (TOML, or JSON by its suffix):

    [eval]
    tasks = ["banking77", "ud_pos"]              # accelops.eval.tasks.TASKS
    variants = ["fp32", "bitlinear", "int8-ptq"] # accelops.eval.experiment.VARIANTS
    baseline = "fp32"
    seeds = [0, 1, 2]
    split = "test"
    vocab_size = 2000
    bootstrap = 1000                             # paired bootstrap resamples
    threads = 2                                  # torch threads (default: torch's)
    data = "../shared/data/eval"                 # default: $ACCELOPS_DATA, else beside the repository

    [model]                                      # TransformerLMConfig settings
    dim = 128
    n_layers = 4
    n_heads = 4
    max_len = 64

    [train]                                      # fit() settings
    steps = 1000
    batch_size = 32
    lr = 2e-3
    scheduler = { name = "cosine", warmup_steps = 50 }

    [task.ud_pos]                                # one task's own model / train settings
    model = { max_len = 128 }

Relative paths (data) are read from the config file's folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

_EVAL_KEYS = {
    "tasks": {"list"},
    "variants": {"list"},
    "baseline": {"str"},
    "seeds": {"list"},
    "split": {"str"},
    "vocab_size": {"int"},
    "bootstrap": {"int"},
    "threads": {"int"},
    "data": {"str"},
}
_TRAIN_KEYS = {
    "steps": {"int"},
    "batch_size": {"int"},
    "lr": {"float"},
    "weight_decay": {"float"},
    "scheduler": {"dict"},
}
_SECTIONS = ("eval", "model", "train", "task")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("config", help="the experiment (TOML, or .json): [eval], [model], [train], [task.NAME]")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (JSON values: --set eval.seeds=[0,1] --set train.steps=10)",
    )
    parser.add_argument("--db", default=None, help="results database (default: $ACCELOPS_RESULTS_DB or bench/results)")
    parser.add_argument("--no-db", action="store_true", help="do not store the rows in the results database")
    parser.add_argument("--plot", default=None, help="PNG to draw (default: eval_<run id>.png beside the database)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON lines to this file")


def _model_keys() -> set:
    from ..models import TransformerLMConfig

    return {f.name for f in dataclasses.fields(TransformerLMConfig)} - {"vocab_size", "quant"}


def experiment_from_config(config: dict, config_path=None):
    """A parsed config -> accelops.eval.experiment.Experiment (ConfigError naming the key)."""
    from ..train.config import ConfigError, check_types, section, unknown_keys
    from .experiment import Experiment

    unknown = set(config) - set(_SECTIONS)
    if unknown:
        raise unknown_keys("the config", unknown, _SECTIONS, " (sections)")
    ev = section(config, "eval", required=True)
    model, train = section(config, "model"), section(config, "train")
    if set(ev) - set(_EVAL_KEYS):
        raise unknown_keys("eval", set(ev) - set(_EVAL_KEYS), _EVAL_KEYS)
    check_types("eval", ev, _EVAL_KEYS)
    if "tasks" not in ev:
        raise ConfigError('[eval] needs tasks = [...] (e.g. tasks = ["banking77"])')
    for key in ("tasks", "variants"):
        if not all(isinstance(v, str) for v in ev.get(key, [])):
            raise ConfigError(f"eval.{key} must be a list of strings, got {ev[key]!r}")
    for key in ("vocab_size", "bootstrap", "threads"):
        if key in ev and ev[key] < 1:
            raise ConfigError(f"eval.{key} must be at least 1, got {ev[key]!r}")

    def check_model_train(where, m, t):
        keys = _model_keys()
        for k in ("vocab_size", "quant"):
            if k in m:
                raise ConfigError(f"{where}model.{k} is set by the experiment (the tokenizer / the variant)")
        if set(m) - keys:
            raise unknown_keys(f"{where}model", set(m) - keys, keys)
        if set(t) - set(_TRAIN_KEYS):
            raise unknown_keys(f"{where}train", set(t) - set(_TRAIN_KEYS), _TRAIN_KEYS)
        check_types(f"{where}train", t, _TRAIN_KEYS)
        for k in ("steps", "batch_size"):
            if k in t and t[k] < 1:
                raise ConfigError(f"{where}train.{k} must be at least 1, got {t[k]!r}")

    check_model_train("", model, train)
    per_task = {}
    for name, settings in section(config, "task").items():
        if not isinstance(settings, dict) or set(settings) - {"model", "train"}:
            raise ConfigError(f"[task.{name}] may hold model = {{...}} and train = {{...}} only, got {settings!r}")
        m, t = section(settings, "model"), section(settings, "train")
        check_model_train(f"task.{name}.", m, t)
        per_task[name] = {"model": m, "train": t}
    data = ev.get("data")
    if data is not None and config_path is not None and not os.path.isabs(data):
        data = os.path.join(os.path.dirname(os.path.abspath(config_path)), data)
    kw = {k: ev[k] for k in ("variants", "seeds", "baseline", "split", "vocab_size") if k in ev}
    return Experiment(
        tasks=list(ev["tasks"]),
        model=model,
        train=train,
        per_task=per_task,
        root=data,
        n_boot=ev.get("bootstrap", 1000),
        **kw,
    ), ev.get("threads")


def run_metadata(threads: int | None) -> dict:
    """The fields of a results-database run, as bench/common.py records them."""
    import platform
    import subprocess

    import torch

    import accelops

    from .._machine import machine_info

    repo = Path(accelops.__file__).resolve().parents[1]
    commit = dirty = None
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
            st = subprocess.run(
                ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=30,
            )
            dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "run_id": uuid.uuid4().hex[:12],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "device": "cpu",
        "machine": machine_info(),
        "versions": {"accelops": accelops.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "quick": False,
        "threads": threads or torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0],
    }


def store(rows: list[dict], meta: dict, db_path=None) -> str:
    """rows (run_experiment's) with the run's metadata into the results database -> its path."""
    from ..results import ResultsDB

    db = ResultsDB(db_path)
    db.write_rows([{**meta, **row, "status": "ok"} for row in rows], source="accelops eval")
    return str(db.path)


def run_args(args, out=None) -> int:
    import json

    from ..train.config import apply_overrides, load_config

    out = out or sys.stdout
    config = apply_overrides(load_config(args.config), args.set)
    exp, threads = experiment_from_config(config, args.config)
    import torch

    from .experiment import plot, run_experiment, summary_table

    if threads:
        torch.set_num_threads(threads)
    meta = run_metadata(threads)
    rows = run_experiment(exp, log=lambda m: print(f"accelops eval: {m}", file=sys.stderr, flush=True))
    meta["loadavg_1m"] = os.getloadavg()[0]
    print(summary_table(rows), file=out)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({**meta, **row}) + "\n")
    db_path = None
    if not args.no_db:
        db_path = store(rows, meta, args.db)
        print(f"{len(rows)} eval rows stored in {db_path} (run {meta['run_id']})", file=out)
    plot_path = args.plot
    if plot_path is None:
        from ..results import default_path

        base = Path(db_path) if db_path else Path(args.db) if args.db else default_path()
        plot_path = base.parent / f"eval_{meta['run_id']}.png"
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, plot_path)
    print(f"plot written to {plot_path}", file=out)
    return 0
