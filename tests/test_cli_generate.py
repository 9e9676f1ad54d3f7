"""`accelops generate`: text from a checkpoint of `accelops train` (a model that learned a
character cycle continues it), tokens/s on stderr, --convert, and user errors as one line
with exit code 2 (run for real in a subprocess) or typed exceptions from main(argv)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from accelops.cli import main
from accelops.train import CheckpointError, load_model
from accelops.train.config import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CYCLE = "quant bf16\n"  # every character has one successor: greedy decoding must continue the cycle


pytestmark = pytest.mark.one_thread


def _train(tmp_path: Path, **model) -> str:
    text = tmp_path / "cycle.txt"
    text.write_text(CYCLE * 120, encoding="utf-8")
    config = {
        "data": {"path": str(text), "seq_len": 32},
        "model": {"type": "transformer", "dim": 32, "n_layers": 2, "n_heads": 2, **model},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "train": {
            "max_steps": 30,
            "batch_size": 8,
            "eval_every": 30,
            "eval_batches": 1,
            "progress": False,
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "log_dir": str(tmp_path / "log"),
        },
    }
    trainer, _ = build(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return str(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # the new architecture options through the trainer's [model] table
    return _train(tmp_path_factory.mktemp("gen"), pos_emb="rope", norm="rmsnorm", n_kv_heads=1)


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELOPS_DEBUG", "WORLD_SIZE", "RANK")}
    env.update(
        PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]), OMP_NUM_THREADS="1"
    )
    return subprocess.run(
        [sys.executable, "-m", "accelops.cli", "generate", *args], env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_line(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("accelops generate: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_greedy_continues_the_cycle(ckpt):
    proc = cli(ckpt, "--prompt", "quant b", "--max-new-tokens", "20", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = (CYCLE * 4)[len("quant b") :][:20]
    assert proc.stdout == "quant b" + expected + "\n"
    assert "20 tokens in" in proc.stderr and "tokens/s" in proc.stderr
    assert "decode step: eager modules" in proc.stderr  # layernorm, learned positions: not the fused op
    # the same as the API on the same checkpoint
    model, vocab = load_model(ckpt)
    assert vocab.decode(model.generate(vocab.encode("quant b"), 20, temperature=0)[0]) == expected


def test_sampling_options_and_convert(ckpt, capsys):
    args = [
        "generate",
        ckpt,
        "--prompt",
        "bf",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.7",
        "--top-k",
        "3",
        "--top-p",
        "0.9",
        "--seed",
        "5",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("bf") and len(first) == 2 + 12 + 1
    for mode in ("ternary", "int8"):
        assert main(["generate", ckpt, "--prompt", "q", "--max-new-tokens", "5", "--convert", mode]) == 0
        assert len(capsys.readouterr().out) == 1 + 5 + 1


@pytest.mark.slow
def test_compile_gives_the_eager_tokens(ckpt, capsys):
    """--compile: the decode steps through torch.compile continue the cycle as eager does."""
    args = ["generate", ckpt, "--prompt", "quant b", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(args) == 0
    eager = capsys.readouterr()
    assert main([*args, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out == "quant b" + (CYCLE * 4)[len("quant b") :][:20] + "\n"
    assert (
        "20 tokens in" in compiled.err and "tokens/s" in compiled.err and "decode step: torch.compile" in compiled.err
    )


def test_user_errors_are_one_line(ckpt, tmp_path):
    assert_one_line(cli(ckpt, "--prompt", "quant?"), "character '?' is not in the vocabulary")
    assert_one_line(cli(ckpt, "--prompt", "q", "--max-new-tokens", "40"), "max_new_tokens=40 runs past", "max_len=32")
    assert_one_line(cli(str(tmp_path / "nope"), "--prompt", "q"), "does not exist")
    assert_one_line(cli(ckpt, "--prompt", "q", "--temperature", "0", "--top-p", "0.5"), "temperature=0 is greedy")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--top-p", "1.5"], "top_p must be a number in"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--top-k", "0"], "top_k must be >= 1"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--temperature", "0", "--top-k", "3"], r"temperature=0 is greedy decoding.*\(top_k=3\)"),
    ],
)
def test_bad_options_raise_from_python(ckpt, extra, match):
    with pytest.raises(ValueError, match=match):
        main(["generate", ckpt, "--prompt", "q", *extra])


def test_default_length_and_prompts_that_do_not_fit(ckpt, tmp_path, capsys):
    assert main(["generate", ckpt, "--prompt", "quant", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out) == 32 + 1  # by default the rest of the context (max_len 32)
    with pytest.raises(ValueError, match="fill the model's context max_len=32: no room"):
        main(["generate", ckpt, "--prompt", (CYCLE * 3)[:32]])
    with pytest.raises(ValueError, match="prompt 0 has 33 tokens, longer than the model's context max_len=32"):
        main(["generate", ckpt, "--prompt", (CYCLE * 3)[:33], "--max-new-tokens", "1"])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        main(["generate", ckpt, "--prompt", ""])
    assert capsys.readouterr().out == ""  # nothing printed before the arguments are accepted


def test_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        main(["generate", str(bad), "--prompt", "q"])


def test_rnn_checkpoints_are_refused(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(CYCLE * 20, encoding="utf-8")
    trainer, _ = build(
        {
            "data": {"path": str(text), "seq_len": 8},
            "model": {"type": "rnn", "dim": 8, "hidden": 8, "n_layers": 1},
            "train": {
                "max_steps": 1,
                "batch_size": 2,
                "eval_every": 1,
                "eval_batches": 1,
                "progress": False,
                "checkpoint_dir": str(tmp_path / "ckpt"),
                "log_dir": str(tmp_path / "log"),
            },
        }
    )
    try:
        trainer.fit()
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="generate needs a TransformerLM checkpoint.*RNNLM"):
        main(["generate", str(tmp_path / "ckpt"), "--prompt", "q"])
