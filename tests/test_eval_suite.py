"""accelops.eval.suite / experiment / cli: EvalSuite runs models on tasks with the scores
task.evaluate gives, compare() gives the difference and its uncertainty (checked against
hand-worked cases), the variants deploy as the layers they name, `accelops eval CONFIG`
stores its rows and draws its plot, and every bad input is refused naming what is wrong.
All on tiny synthetic data files (the real data: docs/eval.md, bench/bench_eval.py)."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from accelops.eval import data as D  # noqa: E402
from accelops.eval.experiment import (  # noqa: E402
    Experiment,
    merge_seed_rows,
    run_experiment,
    summary_table,
    train_variants,
)
from accelops.eval.suite import METRICS, EvalSuite, SuiteResult, TaskResult, compare  # noqa: E402
from accelops.eval.tasks import Banking77, TaskMismatch  # noqa: E402
from accelops.eval.tokenize import TokenizerMismatch  # noqa: E402
from accelops.models import EncoderForQuestionAnswering, TransformerLMConfig  # noqa: E402
from tests import test_eval_tasks as T  # noqa: E402

pytestmark = pytest.mark.one_thread

LABELS = ["card_arrival", "top_up", "refund"]
TEXTS = {
    "card_arrival": ["where is my card", "my card has not arrived", "card still missing", "when will the card come"],
    "top_up": ["how do I top up", "top up failed", "add money to my account", "top-up is pending"],
    "refund": ["I want a refund", "refund my purchase", "money back please", "how long does a refund take"],
}


def _csv(rows):
    return "text,category\n" + "".join(f"{t},{c}\n" for t, c in rows)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """test_eval_tasks' synthetic files for every task, and a tiny BANKING77."""
    r = T.write_synthetic_data(tmp_path_factory.mktemp("evaldata"))
    b = r / "banking77"
    b.mkdir()
    (b / "categories.json").write_text(json.dumps(LABELS))
    rows = [(t, c) for c in LABELS for t in TEXTS[c]]
    (b / "train.csv").write_text(_csv(rows * 3))
    (b / "test.csv").write_text(_csv(rows))
    return r


CFG = dict(dim=16, n_layers=4, n_heads=2, max_len=32)


@pytest.fixture(scope="module")
def suite(root):
    return EvalSuite(["banking77", "ud_pos", "wnut17", "squad", "wikitext2"], vocab_size=300, root=root)


# --------------------------------------------------------------------------- EvalSuite


def test_run_gives_the_tasks_own_scores(suite):
    """Untrained models: the suite's scores are task.evaluate's, and every metric recomputed
    from the per-example sums equals the task's own."""
    torch.manual_seed(0)
    res = suite.run(lambda task, tok: task.build_model(tok, **CFG), label="fp32", seed=0)
    assert list(res) == ["banking77", "ud_pos", "wnut17", "squad", "wikitext2"] and res.label == "fp32"
    for name, task in suite.tasks.items():
        r = res[name]
        assert r.split == "test" and r.eval_s >= 0
        for metric in METRICS[name]:
            assert math.isclose(r.metric(metric), r.scores[metric], rel_tol=1e-9, abs_tol=1e-12), (name, metric)
    assert res["banking77"].n == 12 and res["ud_pos"].n == 3 and res["squad"].n == 3
    # the same model through task.evaluate
    torch.manual_seed(1)
    tok = suite.tokenizer("ud_pos")
    model = suite.tasks["ud_pos"].build_model(tok, **CFG)
    again = suite.run(
        {**{n: suite.tasks[n].build_model(suite.tokenizer(n), **CFG) for n in suite.tasks}, "ud_pos": model}
    )
    assert again["ud_pos"].scores == suite.tasks["ud_pos"].evaluate(model, tok)
    bank = suite.tasks["banking77"]
    m = bank.build_model(suite.tokenizer("banking77"), **CFG)
    assert EvalSuite([bank], tokenizers={"banking77": suite.tokenizer("banking77")}).run(m)["banking77"].scores == (
        bank.evaluate(m, suite.tokenizer("banking77")).as_dict()
    )


def test_oracle_scores_perfectly(root):
    """A model answering the gold labels scores 1 on every metric of the per-example sums."""
    task = Banking77(root)
    suite = EvalSuite([task], vocab_size=300)
    tok = suite.tokenizer("banking77")
    ds = task.encode("test", tok, 32)
    table = {tuple(x.tolist()): torch.nn.functional.one_hot(y, 3).float() * 10 for x, _, y in zip(*ds.tensors)}
    oracle = T.Oracle("sequence", tok.vocab_size, 32, table, num_labels=3)
    r = suite.run(oracle)["banking77"]
    assert r.metric("accuracy") == 1.0 and r.metric("macro_f1") == 1.0 and r.scores["accuracy"] == 1.0


def test_models_are_checked_before_any_runs(suite):
    """A model without the head a task needs, or of another vocabulary: the error names the
    task and both sides, before any task is evaluated."""
    calls = []
    tok = suite.tokenizer("banking77")
    good = suite.tasks["banking77"].build_model(tok, **CFG)
    good.register_forward_hook(lambda *a: calls.append(1))
    qa = EncoderForQuestionAnswering(TransformerLMConfig(vocab_size=suite.tokenizer("ud_pos").vocab_size, **CFG))
    two = EvalSuite([suite.tasks["banking77"], suite.tasks["ud_pos"]], tokenizers=_toks(suite, "banking77", "ud_pos"))
    with pytest.raises(
        TaskMismatch,
        match="task 'ud_pos' needs a model with a 'token' head, got model EncoderForQuestionAnswering with head 'span'",
    ):
        two.run({"banking77": good, "ud_pos": qa})
    assert calls == []
    with pytest.raises(
        TokenizerMismatch, match=f"has a vocabulary of {tok.vocab_size} tokens but model has vocab_size=301"
    ):
        two.run({"banking77": suite.tasks["banking77"].build_model(_Vocab(301), **CFG), "ud_pos": qa})
    with pytest.raises(ValueError, match=r"missing \['ud_pos'\]"):
        two.run({"banking77": good})
    with pytest.raises(TypeError, match="factory"):
        two.run("model.pt")
    with pytest.raises(TaskMismatch, match="task 'ud_pos' needs a model with a 'token' head"):
        two.run(good)  # one model for every task: it lacks the tagging head
    assert calls == []


def _toks(suite, *names):
    return {n: suite.tokenizer(n) for n in names}


class _Vocab:
    """A stand-in tokenizer of a given vocabulary size (build_model reads only that)."""

    def __init__(self, n):
        self.vocab_size = n


def test_suite_arguments(root, suite):
    with pytest.raises(ValueError, match="unknown task 'banking'; known tasks"):
        EvalSuite(["banking"], root=root)
    with pytest.raises(ValueError, match="task 'ud_pos' is given twice"):
        EvalSuite(["ud_pos", suite.tasks["ud_pos"]], root=root)
    with pytest.raises(ValueError, match=r"tokenizers given for task\(s\) \['squad'\]"):
        EvalSuite(["ud_pos"], root=root, tokenizers={"squad": None})
    with pytest.raises(ValueError, match="task 'banking77' has no split 'valid'"):
        EvalSuite([suite.tasks["banking77"]], tokenizers=_toks(suite, "banking77")).run(
            lambda t, tok: t.build_model(tok, **CFG), split="valid"
        )


def test_bad_data_files_name_file_and_line(root, tmp_path):
    """A label not in the label set, an answer span outside its context: the suite refuses
    the file with its name, line (or JSON path) and the reason."""
    bad = tmp_path / "data"
    (bad / "banking77").mkdir(parents=True)
    for name in ("categories.json", "train.csv"):
        (bad / "banking77" / name).write_text((root / "banking77" / name).read_text())
    (bad / "banking77" / "test.csv").write_text(_csv([("where is my card", "card_arrival"), ("hello", "greeting")]))
    with pytest.raises(D.DataFormatError, match=r"test.csv:3: .*'greeting'"):
        EvalSuite(["banking77"], root=bad)
    (bad / "xquad_en").mkdir()
    (bad / "squad_v1.1").mkdir()
    (bad / "squad_v1.1" / "dev-v1.1.json").write_text((root / "squad_v1.1" / "dev-v1.1.json").read_text())
    broken = json.loads((root / "xquad_en" / "xquad.en.json").read_text())
    broken["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 500
    (bad / "xquad_en" / "xquad.en.json").write_text(json.dumps(broken))
    with pytest.raises(
        D.DataFormatError,
        match=r"xquad.en.json:data\[0\].paragraphs\[0\].qas\[0\].answers\[0\]: "
        r"answer span \[500, 507\) lies outside its context",
    ):
        EvalSuite(["squad"], root=bad)
    with pytest.raises(FileNotFoundError, match="wnut17train.conll: no such file"):
        EvalSuite(["wnut17"], root=bad)


# --------------------------------------------------------------------------- compare


def _result(task, arrays, label="", seed=None, n=None, gold="g"):
    n = n or len(next(iter(arrays.values())))
    r = TaskResult(task, "test", {}, {k: np.asarray(v, dtype=float) for k, v in arrays.items()}, n, 0.0, gold)
    return SuiteResult({task: r}, label=label, seed=seed)


def _acc(correct, label=""):
    correct = np.asarray(correct, dtype=float)
    n = len(correct)
    onehot = np.zeros((n, 2))
    onehot[:, 0] = 1
    return _result(
        "banking77",
        {"correct": correct, "tp_onehot": onehot * correct[:, None], "pred_onehot": onehot, "gold_onehot": onehot},
        label,
    )


def test_compare_identical_and_hand_worked():
    n, k = 400, 20
    base = _acc(np.ones(n), "fp32")
    same = compare(base, base, n_boot=200)
    r = same.row("banking77")
    assert (r["delta"], r["se"], r["se_examples"], r["se_seeds"]) == (0.0, 0.0, 0.0, None)
    # the candidate gets k of n wrong: delta -100k/n points, and the paired bootstrap's se is
    # that of a mean of n Bernoulli(k/n) differences, 100 sqrt(p(1 - p) / n)
    cand = _acc(np.r_[np.zeros(k), np.ones(n - k)], "bitlinear")
    r = compare(base, cand, n_boot=4000, seed=1).row("banking77", "accuracy")
    p = k / n
    assert r["delta"] == pytest.approx(-100 * p) and r["unit"] == "points"
    assert r["se_examples"] == pytest.approx(100 * math.sqrt(p * (1 - p) / n), rel=0.08)
    assert r["ci95"] == pytest.approx([r["delta"] - 1.96 * r["se"], r["delta"] + 1.96 * r["se"]])
    assert "| banking77 | accuracy | 100.00 | 95.00 | -5.00 pt |" in compare(base, cand).markdown()


def test_compare_over_seeds_adds_their_spread():
    """Seeds pair by position: the delta is the mean of the per-seed differences, se_seeds
    their standard error, se combines it with the examples' bootstrap se."""
    n = 100
    bases = [_acc(np.ones(n)) for _ in range(3)]
    cands = [_acc(np.r_[np.zeros(w), np.ones(n - w)]) for w in (1, 3, 8)]
    r = compare(bases, cands, n_boot=500).row("banking77")
    deltas = [-1.0, -3.0, -8.0]
    assert r["delta"] == pytest.approx(np.mean(deltas)) and r["delta_seeds"] == pytest.approx(deltas)
    assert r["se_seeds"] == pytest.approx(np.std(deltas, ddof=1) / math.sqrt(3))
    assert r["se"] == pytest.approx(math.hypot(r["se_seeds"], r["se_examples"]))
    assert r["candidate_std"] == pytest.approx(np.std([0.99, 0.97, 0.92], ddof=1)) and r["seeds"] == 3


def test_compare_perplexity_is_a_ratio():
    base = _result("wikitext2", {"nll": [10.0, 20.0], "tokens": [10, 10]})
    cand = _result("wikitext2", {"nll": [11.0, 22.0], "tokens": [10, 10]})
    r = compare(base, cand, n_boot=100).row("wikitext2")
    assert r["unit"] == "ratio" and r["baseline"] == pytest.approx(math.exp(1.5))
    assert r["delta"] == pytest.approx(math.exp(1.65) / math.exp(1.5))


def test_compare_errors():
    a = _acc(np.ones(10))
    with pytest.raises(ValueError, match="baseline has 1 seed result"):
        compare(a, [a, a])
    with pytest.raises(ValueError, match="results of different examples cannot be compared"):
        compare(a, _acc(np.ones(11)))
    with pytest.raises(ValueError, match="results of different examples"):
        compare(a, _result("banking77", dict(a["banking77"].arrays), gold="other"))
    with pytest.raises(ValueError, match="no task in common"):
        compare(a, _result("wikitext2", {"nll": [1.0], "tokens": [1]}))
    with pytest.raises(TypeError, match="baseline must be a SuiteResult"):
        compare({"banking77": 1}, a)
    with pytest.raises(ValueError, match="task 'banking77' has no metric 'f1'"):
        compare(a, a, metrics={"banking77": ["f1"]})


# --------------------------------------------------------------------------- variants


@pytest.mark.slow  # trains models: ~5 s alone, more on a loaded machine
def test_variants_deploy_as_named(root):
    from accelops.nn import Int8Linear, TernaryLinear

    task = Banking77(root)
    tok = task.train_tokenizer(300)
    got = {
        v: (m, info)
        for v, m, info in train_variants(
            task, tok, ["bitlinear", "int8-ptq", "qat-int8", "alternate"], CFG, {"steps": 2, "batch_size": 4}, 0
        )
    }
    assert list(got) == ["bitlinear", "int8-ptq", "qat-int8", "alternate"]  # fp32 trained for int8-ptq, not given
    q = {v: type(m.blocks[0].attn.q_proj) for v, (m, _) in got.items()}
    assert q == {
        "bitlinear": TernaryLinear,
        "int8-ptq": Int8Linear,
        "qat-int8": Int8Linear,
        "alternate": torch.nn.Linear,
    }
    assert got["alternate"][0].blocks[0] is got["alternate"][0].blocks[2]
    sizes = {v: info["deployed_bytes"] for v, (_, info) in got.items()}
    fp32 = got["bitlinear"][1]["fp32_bytes"]
    # (at dim 16 the ternary rows are padded to a packing block: smaller than int8 only from ~128)
    assert sizes["int8-ptq"] == sizes["qat-int8"] < fp32 and sizes["bitlinear"] < fp32
    assert got["alternate"][1]["block_unique_parameters"] * 2 == got["bitlinear"][1]["block_unique_parameters"]
    assert all(not m.training for m, _ in got.values())


@pytest.mark.slow  # trains models: ~5 s alone, more on a loaded machine
def test_experiment_rows(root):
    exp = Experiment(
        tasks=["banking77"],
        variants=["fp32", "int8-ptq", "alternate"],
        seeds=[0, 1],
        vocab_size=300,
        model=CFG,
        train={"steps": 2, "batch_size": 4},
        root=str(root),
        n_boot=50,
    )
    rows = run_experiment(exp)
    assert [r["variant"] for r in rows] == ["fp32", "int8-ptq", "alternate"]
    by = {r["variant"]: r for r in rows}
    assert by["fp32"]["delta"] == 0 and by["fp32"]["n"] == 12 and len(by["fp32"]["value_seeds"]) == 2
    assert by["alternate"]["block_params_vs_baseline"] == 0.5 and by["int8-ptq"]["target"] == 0.5
    assert isinstance(by["int8-ptq"]["target_met"], bool) and "target" not in by["fp32"]
    assert "| banking77 | alternate | accuracy |" in summary_table(rows)
    json.dumps(rows)  # rows go to JSON lines and the results database


@pytest.mark.slow  # trains models: ~10 s alone, more on a loaded machine
def test_merge_seed_rows_matches_one_run(root):
    """Rows of a seed-0 run and a seed-1 run pool into what one run of seeds [0, 1] gives:
    the same values, deltas and seed spread; the bootstrap se an upper bound of the exact."""

    def rows(seeds):
        exp = Experiment(
            tasks=["banking77"],
            variants=["fp32", "bitlinear", "alternate"],
            seeds=seeds,
            vocab_size=300,
            model=CFG,
            train={"steps": 3, "batch_size": 4},
            root=str(root),
            n_boot=400,
        )
        return run_experiment(exp)

    merged, whole = merge_seed_rows([rows([0]), rows([1])]), rows([0, 1])
    assert [(r["task"], r["variant"]) for r in merged] == [(r["task"], r["variant"]) for r in whole]
    for m, w in zip(merged, whole):
        assert m["seeds"] == [0, 1]
        for key in ("value", "value_std", "baseline_value", "delta", "se_seeds", "train_loss"):
            assert m[key] == pytest.approx(w[key], abs=1e-12), key
        assert m["value_seeds"] == pytest.approx(w["value_seeds"]) and m["delta_seeds"] == pytest.approx(
            w["delta_seeds"]
        )
        assert m["scores"] == pytest.approx(w["scores"])
        # an upper bound; the 1.25: the two bootstraps draw their own resamples
        assert m["se_examples"] * 1.25 >= w["se_examples"]
        assert m["se_examples_bound"] is (m["variant"] != "fp32")
        assert m.get("target_met") == (None if "target" not in m else m["delta"] >= -m["target"])
    json.dumps(merged)


def _row(**kw):
    base = {
        "task": "banking77",
        "variant": "bitlinear",
        "baseline": "fp32",
        "split": "test",
        "n": 10,
        "metric": "accuracy",
        "delta_unit": "points",
        "model_config": {},
        "train_config": {},
        "vocab_size": 300,
        "seeds": [0],
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    "runs, match",
    [
        ([[_row()]], "at least two runs"),
        ([[_row()], [_row(variant="alternate")]], "run 1 has"),
        ([[_row()], [_row(n=11)]], "run 1 has n 11, run 0 10"),
        ([[_row()], [_row()]], "seeds overlap"),
        ([[_row(delta_unit="ratio")], [_row(delta_unit="ratio", seeds=[1])]], "only fraction metrics"),
        ([[_row(), _row()], [_row(seeds=[1])]], "two rows for task"),
    ],
)
def test_merge_seed_rows_errors(runs, match):
    with pytest.raises(ValueError, match=match):
        merge_seed_rows(runs)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tasks=["mnli"]), "unknown task 'mnli'"),
        (dict(variants=["fp16"]), "unknown variant 'fp16'"),
        (dict(variants=["bitlinear"]), "the baseline 'fp32' is not among the variants"),
        (dict(seeds=[0, 0]), "seeds must be distinct"),
        (dict(seeds=[]), "seeds must be a non-empty list"),
        (dict(model={"quant": "bitlinear"}), "model.quant is set by the experiment"),
        (dict(per_task={"squad": {}}), r"settings for task\(s\) \['squad'\]"),
    ],
)
def test_experiment_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        Experiment(**{"tasks": ["banking77"], **kw})


# --------------------------------------------------------------------------- accelops eval


def _config(tmp_path, root, text=""):
    path = tmp_path / "eval.toml"
    path.write_text(
        f'[eval]\ntasks = ["banking77"]\nvariants = ["fp32", "int8-ptq"]\nseeds = [0]\nvocab_size = 300\n'
        f'bootstrap = 20\nthreads = 1\ndata = "{root}"\n[model]\ndim = 16\nn_layers = 2\nn_heads = 2\nmax_len = 32\n'
        f"[train]\nsteps = 2\nbatch_size = 4\n{text}"
    )
    return path


@pytest.mark.slow  # trains models: ~5 s alone, more on a loaded machine
def test_cli_stores_rows_and_plots(tmp_path, root):
    import duckdb

    from accelops.cli import main

    db, png = tmp_path / "r.duckdb", tmp_path / "eval.png"
    cfg = _config(tmp_path, root, "[task.banking77]\nmodel = { max_len = 24 }\n")
    assert main(["eval", str(cfg), "--db", str(db), "--plot", str(png), "--json", str(tmp_path / "rows.jsonl")]) == 0
    assert png.stat().st_size > 0
    con = duckdb.connect(str(db), read_only=True)
    got = con.execute("SELECT family, op, method, status FROM measurements ORDER BY seq").fetchall()
    assert got == [("eval", "banking77", "fp32", "ok"), ("eval", "banking77", "int8-ptq", "ok")]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert rows[1]["model_config"]["max_len"] == 24 and rows[1]["run_id"] == rows[0]["run_id"]
    # `accelops report` draws the eval rows too
    from accelops.results import ResultsDB
    from accelops.results.report import build_plots

    _, plots = build_plots(ResultsDB(db))
    assert [p.kind for p in plots if p.family == "eval"] == ["measures"]


@pytest.mark.parametrize(
    "extra, match",
    [
        ("[eval2]\n", r"\[the config\] has unknown key\(s\) \['eval2'\]"),
        ("[task.banking77]\nmodel = { quant = 'int8' }\n", "task.banking77.model.quant is set by the experiment"),
        ("[task.banking77]\ntrain = { step = 3 }\n", "'step': did you mean 'steps'"),
        ("[task.banking77]\nmodels = 1\n", r"\[task.banking77\] may hold model"),
    ],
)
def test_cli_config_errors(tmp_path, root, extra, match):
    from accelops.cli import main
    from accelops.train import ConfigError

    with pytest.raises(ConfigError, match=match):
        main(["eval", str(_config(tmp_path, root, extra)), "--no-db"])


def test_cli_value_errors(tmp_path, root):
    from accelops.cli import main
    from accelops.train import ConfigError

    cfg = _config(tmp_path, root)
    with pytest.raises(ConfigError, match=r"train.steps must be an int, got '2' \(a string\)"):
        main(["eval", str(cfg), "--no-db", "--set", 'train.steps="2"'])
    with pytest.raises(ValueError, match="unknown variant 'ternary'"):
        main(["eval", str(cfg), "--no-db", "--set", 'eval.variants=["fp32", "ternary"]'])
    with pytest.raises(ConfigError, match="unknown key.*'dims'"):
        main(["eval", str(cfg), "--no-db", "--set", "model.dims=3"])
    with pytest.raises(FileNotFoundError, match="config file .*nothere.toml"):
        main(["eval", str(tmp_path / "nothere.toml")])


@pytest.mark.slow
def test_cli_user_error_is_one_line(tmp_path, root):
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = _config(tmp_path, root, "")
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELOPS_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "accelops.cli", "eval", str(cfg), "--set", 'eval.tasks=["mnli"]'],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"accelops eval: error: unknown task 'mnli'; known tasks: {sorted(['banking77', 'ud_pos', 'wnut17', 'squad', 'wikitext2', 'lemma'])}"
    ]


def test_docs_config_is_valid():
    """The example config of docs/eval.md parses into the experiment it describes."""
    import re
    from pathlib import Path

    import tomllib

    from accelops.eval.cli import experiment_from_config

    text = (Path(__file__).resolve().parents[1] / "docs" / "eval.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    exp, threads = experiment_from_config(tomllib.loads(block))
    assert exp.tasks == ["banking77", "ud_pos"] and exp.seeds == [0, 1, 2] and threads == 2
    assert exp.settings("ud_pos")[0]["max_len"] == 80 and exp.settings("banking77")[0]["max_len"] == 48
