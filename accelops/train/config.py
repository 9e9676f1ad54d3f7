"""The configuration of `accelops train`: reading a JSON or TOML file (load_config,
apply_overrides, check_config_shape), checking it (ConfigError names the key and what it
must be) and building what it describes (build_model, build_optimizer, build_scheduler,
build: the model, optimizer, scheduler, data and Trainer). No command line here: that is
accelops/train/run.py, which imports this module (as do accelops.planner, accelops.tune,
load_model and the HPO objective).

A character-level TransformerLM or RNNLM trained on a text file, everything set by the file:

    [data]                  # a relative path: the working directory's file, else the one beside this config
    path = "../shared/data/tinyshakespeare.txt"   # (for a config in the repository root)
    seq_len = 128
    val_fraction = 0.1      # the last 10% of the file validates; or val_path = "other.txt" (a whole file)

    [model]                 # TransformerLMConfig / RNNLMConfig fields; vocab_size comes from the data,
    type = "transformer"    # max_len defaults to seq_len. type: "transformer" | "rnn"
    dim = 128
    n_layers = 4
    n_heads = 4
    quant = "bitlinear"     # TOML has no null: leave it out (or "none") for fp32

    [sharing]               # optional: accelops.sharing.share_parameters arguments
    pattern = "alternate"

    [optimizer]             # "adamw" (default) | "adam" | "sgd"; other keys go to the optimizer
    name = "adamw"
    lr = 3e-3
    weight_decay = 0.1

    [scheduler]             # optional: "constant" | "cosine" | "linear" with warmup_steps, min_lr_ratio
    name = "cosine"
    warmup_steps = 50

    [train]                 # the Trainer's keywords (trainer_config.KEYWORDS): max_steps, batch_size, ...
    max_steps = 2000
    strategy = "ddp"        # "ddp" | "fsdp" | "zero1" | "pipeline" (or --strategy); pipeline_schedule, ...
    batch_size = 32
    checkpoint_dir = "runs/shakespeare/ckpt"
    log_dir = "runs/shakespeare"
    seed = 0                # seeds the model's initialisation, dropout and the data order
    early_stopping = { monitor = "val_loss", patience = 5, min_delta = 0.0, mode = "min" }   # optional
    mlflow = true           # optional (or --mlflow): a table with tracking_uri, experiment, run_name

    [lr_find]               # optional: settings of `accelops train CONFIG --lr-find` (accelops.train.lr_find)
    min_lr = 1e-7
    max_lr = 1.0
    num_steps = 100
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import random

import torch

from .trainer_config import KEYWORDS, TrainerConfig

__all__ = [
    "ConfigError",
    "SECTIONS",
    "load_config",
    "apply_overrides",
    "check_config_shape",
    "section",
    "check_types",
    "unknown_keys",
    "resolve_data_paths",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "seed_everything",
    "build",
    "lr_find_options",
]

SECTIONS = ("data", "model", "sharing", "optimizer", "scheduler", "train", "lr_find")
_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
_SCHEDULES = ("constant", "cosine", "linear")


class ConfigError(ValueError):
    """A configuration file that cannot be used (the message names the key)."""


# Bounds on what a config may hold, so a hostile or broken file gets one clear error: a
# file nested 100,000 deep raised a raw RecursionError (~200 KB of traceback), and a 10 MB
# string was echoed whole into an error message.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16
MAX_CONFIG_STRING = 4096


def check_config_shape(config, source: str) -> None:
    """Refuse nesting deeper than MAX_CONFIG_DEPTH and strings longer than MAX_CONFIG_STRING
    anywhere in `config` (iteratively: no recursion limit to hit), naming the key."""
    stack = [(config, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: {where or 'the config'} nests deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(value, str) and len(value) > MAX_CONFIG_STRING:
            raise ConfigError(
                f"{source}: {where} is a string of {len(value):,} characters (at most "
                f"{MAX_CONFIG_STRING:,}): {value[:40]!r}..."
            )
        if isinstance(value, dict):
            for k, v in value.items():
                key = str(k)
                if len(key) > 200:
                    raise ConfigError(f"{source}: a key of {len(key):,} characters under {where or 'the top level'}")
                stack.append((v, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                stack.append((v, f"{where}[{i}]", depth + 1))


def load_config(path) -> dict:
    """A JSON (.json) or TOML (any other suffix) file -> dict of its sections."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".json"):
            config = json.loads(raw)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                try:
                    import tomli as tomllib
                except ModuleNotFoundError:
                    raise ConfigError(
                        f"{path!r}: reading TOML needs Python 3.11+ (tomllib) or the tomli "
                        "package; or write the config as .json"
                    ) from None
            config = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"config file {path!r} does not parse: {_clip(str(exc))}") from exc
    except RecursionError:
        raise ConfigError(
            f"config file {path!r} nests too deep to parse (at most {MAX_CONFIG_DEPTH} levels are allowed)"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path!r} must hold a table/object of sections, got {type(config).__name__}")
    check_config_shape(config, f"config file {path!r}")
    return config


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def apply_overrides(config: dict, overrides) -> dict:
    """["train.max_steps=10", 'model.quant="int8"'] -> a copy of config with those set; a value
    is read as JSON when it parses (numbers, true/false/null, quoted strings, lists) and
    as a plain string otherwise."""
    config = copy.deepcopy(config)
    for item in overrides or ():
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, name = key.split(".", 1)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        config.setdefault(section, {})[name] = parsed
    check_config_shape(config, "the config with its overrides")
    return config


def section(config: dict, name: str, required: bool = False) -> dict:
    """A copy of the [name] table of config ({} when it is absent, unless required)."""
    value = config.get(name)
    if value is None:
        if required:
            raise ConfigError(f"config has no [{name}] section")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table of settings, got {type(value).__name__}")
    return dict(value)


def _none(value):
    return None if isinstance(value, str) and value.lower() in ("none", "null", "fp32", "") else value


# --------------------------------------------------------------------------- value types

# What a config value may be, from the annotation of the argument it becomes ("int | None").
# TOML and JSON give str, int, float, bool, tables and lists, so these words are all a config
# can be checked against; an annotation naming anything else is left to the code that uses it.
_KINDS = {
    "int": "an int",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "dict": "a table",
    "list": "a list",
    "tuple": "a list",
    "None": "null",
}


def _kinds(annotation):
    """An annotation (a type, or its text under `from __future__ import annotations`) -> the
    set of _KINDS words it allows, or None when it names something else."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    words = {w.strip().replace("NoneType", "None") for w in text.split("|")}
    return words if words <= set(_KINDS) else None


def _fits(value, kinds) -> bool:
    for kind in kinds:
        if (
            (kind == "None" and value is None)
            or (kind == "bool" and isinstance(value, bool))
            or (kind == "str" and isinstance(value, str))
            or (kind == "dict" and isinstance(value, dict))
            or (kind in ("list", "tuple") and isinstance(value, (list, tuple)))
        ):
            return True
        if (
            kind in ("int", "float")
            and not isinstance(value, bool)
            and isinstance(value, int if kind == "int" else (int, float))
        ):
            return True
    return False


def _describe(value) -> str:
    kind = {
        bool: "true/false",
        int: "an int",
        float: "a float",
        str: "a string",
        list: "a list",
        dict: "a table",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def check_types(section: str, values: dict, kinds: dict) -> None:
    """ConfigError naming section.key and the type expected for the first value of `values`
    whose kind is not among kinds[key] (keys without kinds are not checked)."""
    for key, value in values.items():
        allowed = kinds.get(key)
        if allowed is None or _fits(value, allowed):
            continue
        want = " or ".join(
            dict.fromkeys(
                _KINDS[k] for k in ("int", "float", "str", "bool", "dict", "list", "tuple", "None") if k in allowed
            )
        )
        hint = ""
        if isinstance(value, str) and _fits(_unquoted(value), allowed):
            hint = f": write {key} = {value.strip()} without quotes"
        raise ConfigError(f"{section}.{key} must be {want}, got {_describe(value)}{hint}")


def _unquoted(text: str):
    """What a quoted TOML/JSON value would have been without the quotes (or the text itself)."""
    try:
        return json.loads(text.strip().lower() if text.strip().lower() in ("true", "false") else text)
    except ValueError:
        return text


def _signature_kinds(fn) -> dict:
    """{argument: allowed kinds} from fn's annotations (unannotated arguments: not checked)."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        kinds = _kinds(p.annotation)
        if kinds is not None:
            out[name] = kinds
    return out


def _default_kinds(fn) -> dict:
    """{argument: allowed kinds} from the defaults of fn's arguments (torch's optimizers
    annotate lr as float | Tensor): a float or int default takes a number, a bool one a bool."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if isinstance(p.default, bool):
            out[name] = {"bool"}
        elif isinstance(p.default, (int, float)):
            out[name] = {"float"}
    return out


_DATA_KINDS = {
    "path": {"str"},
    "seq_len": {"int"},
    "val_fraction": {"float"},
    "val_path": {"str", "None"},
    "stride": {"int", "None"},
}
# Trainer arguments (not TrainerConfig settings) that a config cannot set: accelops train makes
# them from other sections.
_TRAIN_RESERVED = {
    "scheduler": "is built from the [scheduler] section",
    "metadata": "is written by accelops train (the config and the vocabulary)",
    "loss_fn": "is a Python callable: pass it to accelops.train.Trainer in Python",
}


def unknown_keys(section: str, unknown, known, extra: str = "") -> ConfigError:
    """The error for keys a section does not have: each with the nearest known key when
    one is close (a typo), then every known key."""
    import difflib

    close = {k: difflib.get_close_matches(k, list(known), n=1) for k in unknown}
    hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m)
    return ConfigError(
        f"[{section}] has unknown key(s) {sorted(unknown)}{extra}{' (' + hint + ')' if hint else ''}; "
        f"known: {sorted(known)}"
    )


def _check_train_section(train_cfg: dict) -> None:
    """[train] holds the Trainer's keyword arguments (accelops.train.trainer_config.KEYWORDS):
    an unknown key is listed with the known ones (as [model] and [data] do), a value of the
    wrong type names the key and the type its TrainerConfig field is annotated with."""
    for key in train_cfg:
        if key in _TRAIN_RESERVED:
            raise ConfigError(f"train.{key} cannot be set in a config: it {_TRAIN_RESERVED[key]}")
    known = sorted(KEYWORDS)
    unknown = sorted(set(train_cfg) - set(known))
    if unknown:
        raise unknown_keys("train", unknown, known)
    check_types(
        "train", train_cfg, {n: k for n in KEYWORDS if (k := _kinds(TrainerConfig.keyword_annotation(n))) is not None}
    )


def resolve_data_paths(config: dict, config_path) -> dict:
    """The [data] path and val_path of a config read from `config_path`, for `accelops train`:
    a relative path names the file in the working directory when there is one (what it has
    always meant, so no existing config changes), else the file beside the config, so a
    config finds its data wherever it is run from. FileNotFoundError naming both places when
    neither has it."""
    data = config.get("data")
    if not isinstance(data, dict):
        return config
    base = os.path.dirname(os.path.abspath(os.fspath(config_path)))
    for key in ("path", "val_path"):
        value = data.get(key)
        if not isinstance(value, str) or not value or os.path.isabs(value) or os.path.exists(value):
            continue
        beside = os.path.join(base, value)
        if not os.path.exists(beside):
            where = (
                f"in the working directory {os.getcwd()!r}, which holds the config file too"
                if base == os.getcwd()
                else f"in the working directory {os.getcwd()!r} nor beside the config file in {base!r}"
            )
            raise FileNotFoundError(f"data.{key} {value!r} is not a file: not {where}")
        data[key] = beside
    return config


def build_model(model_cfg: dict, vocab_size: int, seq_len: int):
    """The [model] section -> a TransformerLM (type "transformer", the default) or RNNLM (type
    "rnn") over vocab_size tokens, max_len seq_len unless given. Consumes model_cfg (pass a
    copy to keep it)."""
    from ..models import RNNLM, RNNLMConfig, TransformerLM, TransformerLMConfig

    kind = model_cfg.pop("type", "transformer")
    classes = {"transformer": (TransformerLM, TransformerLMConfig), "rnn": (RNNLM, RNNLMConfig)}
    if kind not in classes:
        raise ConfigError(f"model.type must be one of {sorted(classes)}, got {kind!r}")
    model_cls, cfg_cls = classes[kind]
    if "vocab_size" in model_cfg and model_cfg["vocab_size"] != vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg['vocab_size']} but the data has {vocab_size} characters: "
            "leave vocab_size out (it comes from the data)"
        )
    model_cfg["vocab_size"] = vocab_size
    model_cfg.setdefault("max_len", seq_len)
    if "quant" in model_cfg:
        model_cfg["quant"] = _none(model_cfg["quant"])
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(model_cfg) - fields)
    if unknown:
        raise unknown_keys("model", unknown, fields, f" for type {kind!r}")
    check_types("model", model_cfg, {f.name: k for f in dataclasses.fields(cfg_cls) if (k := _kinds(f.type))})
    if model_cfg["max_len"] < seq_len:
        raise ConfigError(f"model.max_len={model_cfg['max_len']} is shorter than data.seq_len={seq_len}")
    try:
        config = cfg_cls(**model_cfg)
    except (ValueError, TypeError) as exc:  # the dataclass's own checks (dim divisible by n_heads, ...)
        raise ConfigError(f"[model] {exc}") from exc
    return model_cls(config)


def build_optimizer(model, optim_cfg: dict):
    """The [optimizer] section (name: "adamw" (default) | "adam" | "sgd"; the other keys are
    the optimizer's arguments, lr 1e-3 unless given) -> the optimizer over model.parameters().
    Consumes optim_cfg (pass a copy to keep it)."""
    name = optim_cfg.pop("name", "adamw")
    if name not in _OPTIMIZERS:
        raise ConfigError(f"optimizer.name must be one of {sorted(_OPTIMIZERS)}, got {name!r}")
    check_types("optimizer", optim_cfg, _default_kinds(_OPTIMIZERS[name]))
    if "betas" in optim_cfg:
        optim_cfg["betas"] = tuple(optim_cfg["betas"])
    optim_cfg.setdefault("lr", 1e-3)
    try:
        return _OPTIMIZERS[name](model.parameters(), **optim_cfg)
    except TypeError as exc:
        raise ConfigError(f"[optimizer] {name}: {exc}") from exc


def build_scheduler(optimizer, sched_cfg: dict, max_steps: int):
    """The [scheduler] section -> a LambdaLR over max_steps optimizer steps (None for an empty
    section). Consumes sched_cfg (pass a copy to keep it)."""
    if not sched_cfg:
        return None
    name = sched_cfg.pop("name", "cosine")
    warmup = sched_cfg.pop("warmup_steps", 0)
    floor = sched_cfg.pop("min_lr_ratio", 0.0)
    if sched_cfg:
        raise ConfigError(
            f"[scheduler] has unknown key(s) {sorted(sched_cfg)}; known: name, warmup_steps, min_lr_ratio"
        )
    if name not in _SCHEDULES:
        raise ConfigError(f"scheduler.name must be one of {_SCHEDULES}, got {name!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"scheduler.warmup_steps must be an int >= 0, got {warmup!r}")
    if not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ConfigError(f"scheduler.min_lr_ratio must be in [0, 1], got {floor!r}")

    def factor(step: int) -> float:  # step = optimizer steps taken; the lr of the next one
        if step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if name == "cosine" else 1.0 - t
        return floor + (1.0 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), Python's random and numpy (when installed)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def build(config: dict):
    """config -> (Trainer, CharVocab): data, model (+ sharing), optimizer, scheduler, trainer."""
    from ..sharing import share_parameters
    from .data import load_char_corpus
    from .trainer import Trainer

    for key in config:
        if key not in SECTIONS:
            raise ConfigError(f"config has an unknown section [{key}]; sections: {SECTIONS}")
    data_cfg = section(config, "data", required=True)
    model_cfg = section(config, "model")
    sharing_cfg = section(config, "sharing")
    optim_cfg = section(config, "optimizer")
    sched_cfg = section(config, "scheduler")
    train_cfg = section(config, "train")

    # Every key and type is checked before the data is read (a typo should not wait for it).
    if "compression" in train_cfg:
        train_cfg["compression"] = _none(train_cfg["compression"])
    if "grad_clip" in train_cfg:
        train_cfg["grad_clip"] = _none(train_cfg["grad_clip"])
    _check_train_section(train_cfg)
    unknown = sorted(set(data_cfg) - set(_DATA_KINDS))
    if unknown:
        raise unknown_keys("data", unknown, _DATA_KINDS)
    check_types("data", data_cfg, _DATA_KINDS)
    if "path" not in data_cfg:
        raise ConfigError("[data] needs path = the text file to train on")
    seq_len = data_cfg.pop("seq_len", 128)
    val_path = data_cfg.pop("val_path", None)
    if val_path is not None and "val_fraction" in data_cfg:
        raise ConfigError(
            "[data] has both val_path and val_fraction: validate on a separate file or on a fraction of path, not both"
        )
    train_data, val_data, vocab = load_char_corpus(
        data_cfg.pop("path"),
        seq_len,
        None if val_path is not None else data_cfg.pop("val_fraction", 0.1),
        data_cfg.pop("stride", None),
        val_path=val_path,
    )

    seed = train_cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"train.seed must be an int >= 0, got {seed!r}")
    seed_everything(seed)  # the model's initialisation (and sharing); the trainer seeds the rest again
    model = build_model(model_cfg, len(vocab), seq_len)
    if sharing_cfg:
        if "pattern" not in sharing_cfg:
            raise ConfigError("[sharing] needs pattern = 'alternate' | 'sequential' | 'sandwich' | [[groups]]")
        check_types("sharing", sharing_cfg, _signature_kinds(share_parameters))
        report = share_parameters(model, sharing_cfg.pop("pattern"), **sharing_cfg)
        if os.environ.get("RANK", "0") == "0":
            logging.getLogger("accelops.train").info("%s", report)

    optimizer = build_optimizer(model, optim_cfg)
    max_steps = train_cfg.get("max_steps", 1000)
    scheduler = build_scheduler(optimizer, sched_cfg, max_steps)
    metadata = {"config": config, "vocab": "".join(vocab.chars)}
    try:
        trainer_config = TrainerConfig.from_keywords(**train_cfg)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise ConfigError(f"[train]: {exc}") from exc
        raise
    trainer = Trainer(
        model, optimizer, train_data, val_data, config=trainer_config, scheduler=scheduler, metadata=metadata
    )
    return trainer, vocab


LR_FIND_KEYS = ("min_lr", "max_lr", "num_steps", "beta", "diverge_threshold", "skip_start", "skip_end")


def lr_find_options(config: dict) -> dict:
    """The [lr_find] section, checked: the keyword arguments of accelops.train.lr_find that
    `accelops train CONFIG --lr-find` passes on."""
    from .lr_find import lr_find

    options = section(config, "lr_find")
    unknown = sorted(set(options) - set(LR_FIND_KEYS))
    if unknown:
        raise ConfigError(f"[lr_find] has unknown key(s) {unknown}; known: {list(LR_FIND_KEYS)}")
    check_types("lr_find", options, _signature_kinds(lr_find))
    return options
