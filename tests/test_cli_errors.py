"""Command-line errors: each user error of `accelops train | results | report | tune | plan`
(run for real, in a subprocess) is one line on stderr naming the problem, exit code 2; a bug
keeps its traceback; ACCELOPS_DEBUG=1 shows every traceback; called from Python the same
errors raise their types. Also the [train] key and value-type checks, and relative data
paths found beside the config file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from accelops.train import ConfigError, list_checkpoints, load_checkpoint
from accelops.train.config import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "to be or not to be, that is the question.\n" * 40


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELOPS_DEBUG", "WORLD_SIZE", "RANK")}
    env.update(
        PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


def cli(cwd, *args, code=None, **env):
    """Runs `python -m accelops.cli ARGS` in cwd -> CompletedProcess."""
    if code is not None:  # the command after some set-up code in the same process
        cmd = [
            sys.executable,
            "-c",
            f"import sys\n{code}\nfrom accelops.cli import main\n"
            f"sys.argv = ['accelops', *{list(args)!r}]\nsys.exit(main())",
        ]
    else:
        cmd = [sys.executable, "-m", "accelops.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)


def assert_one_line(proc, *fragments, prog="accelops train"):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _config(tmp_path, **sections):
    (tmp_path / "corpus.txt").write_text(TEXT)
    config = {
        "data": {"path": "corpus.txt", "seq_len": 16},
        "model": {"type": "transformer", "dim": 16, "n_layers": 1, "n_heads": 2},
        "train": {
            "max_steps": 1,
            "batch_size": 2,
            "eval_every": 1,
            "eval_batches": 1,
            "progress": False,
            "checkpoint_dir": "ckpt",
        },
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def _toml(path, config):
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- accelops train


def test_train_user_errors_are_one_line_and_exit_2(tmp_path):
    _toml(tmp_path / "typo.toml", _config(tmp_path, model={"nlayers": 2}))
    assert_one_line(
        cli(tmp_path, "train", "typo.toml"), "[model] has unknown key(s) ['nlayers']", "did you mean 'n_layers'?"
    )
    _toml(tmp_path / "nodata.toml", _config(tmp_path, data={"path": "missing.txt"}))
    assert_one_line(cli(tmp_path, "train", "nodata.toml"), "data.path 'missing.txt' is not a file")
    assert_one_line(cli(tmp_path, "train", "absent.toml"), "config file 'absent.toml' not found")
    (tmp_path / "broken.toml").write_text("[data\npath = 1\n")
    assert_one_line(cli(tmp_path, "train", "broken.toml"), "config file 'broken.toml' does not parse")
    _toml(tmp_path / "seq.toml", _config(tmp_path, data={"seq_len": "64"}))
    assert_one_line(cli(tmp_path, "train", "seq.toml"), "data.seq_len must be an int, got '64'", "without quotes")
    line = assert_one_line(
        cli(tmp_path, "train", "seq.toml", "--set", "data.seq_len=16", "--set", "train.max_step=3"),
        "[train] has unknown key(s) ['max_step']",
        "max_steps",
    )
    assert "known: [" in line and "'batch_size'" in line and "'precision'" in line


def test_train_errors_of_every_rank_under_torchrun_are_one_line(tmp_path):
    _toml(tmp_path / "typo.toml", _config(tmp_path, model={"nlayers": 2}))
    proc = cli(tmp_path, "train", "typo.toml", "--nproc-per-node", "2")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    # each rank that gets to its error prints it on one line (torchrun stops the other ranks
    # once one fails, so the slower one may be stopped first); torchrun adds its own log lines
    ranks = [x for x in lines if x.startswith("accelops train [rank ")]
    assert ranks and all(": error: [model] has unknown key(s) ['nlayers']" in x for x in ranks), proc.stderr
    assert len(ranks) == len({x.split("]")[0] for x in ranks}) <= 2
    assert lines[-1].startswith("accelops train: error: worker process(es) failed: rank "), proc.stderr
    assert "exit code 2" in lines[-1]


def test_a_bug_keeps_its_traceback_and_debug_shows_every_traceback(tmp_path):
    _toml(tmp_path / "run.toml", _config(tmp_path))
    # an internal error (not one of the user-error types): the traceback, exit 1
    bug = "import accelops.train.run as r\ndef boom(config):\n    raise KeyError('internal')\nr.run = boom"
    proc = cli(tmp_path, "train", "run.toml", code=bug)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'internal'" in proc.stderr
    _toml(tmp_path / "typo.toml", _config(tmp_path, model={"nlayers": 2}))
    proc = cli(tmp_path, "train", "typo.toml", ACCELOPS_DEBUG="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "accelops.train.config.ConfigError: [model] has unknown key(s) ['nlayers']" in proc.stderr


def test_the_python_api_raises_the_typed_errors(tmp_path, monkeypatch):
    from accelops.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"\[model\] has unknown key\(s\) \['nlayers'\]"):
        build(_config(tmp_path, model={"nlayers": 2}))
    with pytest.raises(
        ConfigError,
        match=r"\[train\] has unknown key\(s\) \['max_step'\].*did you mean "
        r"'max_steps'.*known: \[.*'batch_size'.*'max_steps'.*'seed'",
    ):
        build(_config(tmp_path, train={"max_step": 3}))
    with pytest.raises(ConfigError, match=r"train\.scheduler cannot be set in a config.*\[scheduler\]"):
        build(_config(tmp_path, train={"scheduler": "cosine"}))
    # a string where a number is expected, in each section: the key and the type
    for section, key, value, want in (
        ("data", "seq_len", "64", "an int"),
        ("model", "dim", "16", "an int"),
        ("model", "dropout", "0.1", "a number"),
        ("model", "tie_embeddings", "true", "true or false"),
        ("train", "max_steps", "10", "an int"),
        ("train", "grad_clip", "1.5", "a number or null"),
        ("optimizer", "lr", "3e-3", "a number"),
        ("lr_find", "num_steps", "5", "an int"),
    ):
        config = _config(tmp_path, **{section: {key: value}})
        with pytest.raises(
            ConfigError,
            match=rf"^{section}\.{key} must be {want}, got '{value}' \(a string\): "
            rf"write {key} = {value} without quotes$",
        ):
            if section == "lr_find":
                from accelops.train.run import run_lr_find

                run_lr_find(config)
            else:
                build(config)
    with pytest.raises(ConfigError, match=r"train\.batch_size must be an int, got 2\.5 \(a float\)$"):
        build(_config(tmp_path, train={"batch_size": 2.5}))
    # main() with an argv list is the Python API: it raises, it does not print and return 2
    _toml(tmp_path / "typo.toml", _config(tmp_path, model={"nlayers": 2}))
    with pytest.raises(ConfigError, match="nlayers"):
        main(["train", "typo.toml"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["results", "--db", str(tmp_path / "none.duckdb"), "query", "SELECT 1"])


# --------------------------------------------------------------------------- relative data paths


def test_relative_data_path_is_found_beside_the_config(tmp_path, monkeypatch):
    from accelops.cli import main

    (tmp_path / "configs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config = _config(tmp_path / "configs")  # corpus.txt beside the config
    config["train"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    _toml(tmp_path / "configs" / "run.toml", config)
    monkeypatch.chdir(tmp_path / "elsewhere")  # run from another directory
    assert main(["train", str(tmp_path / "configs" / "run.toml")]) == 0
    state = load_checkpoint(list_checkpoints(tmp_path / "ckpt")[0][1])
    assert state["metadata"]["vocab"] == "".join(sorted(set(TEXT)))
    assert state["metadata"]["config"]["data"]["path"] == str(tmp_path / "configs" / "corpus.txt")
    # a file of that name in the working directory is still the one used, as before
    (tmp_path / "elsewhere" / "corpus.txt").write_text("abcdefgh " * 200)
    config["train"]["checkpoint_dir"] = str(tmp_path / "ckpt2")
    _toml(tmp_path / "configs" / "run.toml", config)
    assert main(["train", str(tmp_path / "configs" / "run.toml")]) == 0
    state = load_checkpoint(list_checkpoints(tmp_path / "ckpt2")[0][1])
    assert state["metadata"]["vocab"] == " abcdefgh"
    # neither: both places named
    config["data"]["path"] = "nowhere.txt"
    _toml(tmp_path / "configs" / "run.toml", config)
    with pytest.raises(
        FileNotFoundError,
        match=r"'nowhere\.txt' is not a file: not in the working directory "
        r"'.*elsewhere' nor beside the config file in '.*configs'",
    ):
        main(["train", str(tmp_path / "configs" / "run.toml")])


# --------------------------------------------------------------------------- the other commands


def test_results_report_tune_plan_user_errors_are_one_line(tmp_path):
    db = str(tmp_path / "r.duckdb")
    assert_one_line(
        cli(tmp_path, "results", "--db", db, "query", "SELECT 1"),
        "results database",
        "does not exist",
        "accelops results import",
        prog="accelops results",
    )
    from accelops.results import ResultsDB

    from .test_results import matmul_run

    ResultsDB(db).write_rows(matmul_run("r1"))
    assert_one_line(
        cli(tmp_path, "results", "--db", db, "query", "SELECT * FROM nowhere"),
        "Catalog Error",
        "nowhere",
        prog="accelops results",
    )
    assert_one_line(
        cli(tmp_path, "report", "--db", db, "--window", "0"), "--window must be >= 1", prog="accelops report"
    )
    assert_one_line(
        cli(tmp_path, "tune", "--ops", "fused_ffn", "--table", str(tmp_path / "t.json")),
        "['fused_ffn'] are not tuned ops",
        prog="accelops tune",
    )
    _toml(tmp_path / "typo.toml", {"model": {"nlayers": 2, "vocab_size": 10}})
    assert_one_line(cli(tmp_path, "plan", "--model", "typo.toml"), "unknown key(s) ['nlayers']", prog="accelops plan")
