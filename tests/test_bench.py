"""Smoke test of the benchmark suite: `bench/run.py --quick` on tiny shapes, through the same
code path as `make bench` (correctness checks, compiled baselines, torchao, timing, memory,
recording, summary), writing to a temporary results directory. No timing is asserted."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "ternary",
    "ternary_lut",
    "ternary_base3",
    "int8",
    "ternary_tuned",
    "int8_tuned",
    "ternary_auto",
    "int8_auto",
    "fp32",
    "bf16",
    "int_mm",
    "ref_ternary_compiled",
    "ref_int8_compiled",
    "torchao",
    "torchao_compiled",
    "stream_read",
}
COMM_OPS = {
    "bucket_flatten",
    "bucket_unflatten_",
    "cast_div",
    "topk_compress_",
    "topk_decompress",
    "sign_compress_",
    "sign_decompress",
    "int8_compress_",
    "int8_decompress",
    "orthogonalize_",
}
LM_VARIANTS = ["fp32", "int8 post-training", "bitlinear", "qat-int8", "qat-int8, deployed int8", "alternate sharing"]


def _run_quick(tmp_path, *only, timeout=900):  # every family: generate adds ~2 min
    env = dict(os.environ)
    # conftest turns the Triton interpreter on for the tests; the bench must run the real
    # backends (on a GPU machine the interpreter would take CUDA tensors through Python).
    env.pop("TRITON_INTERPRET", None)
    env.pop("ACCELOPS_BACKEND", None)
    proc = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--quick",
            *(("--only", *only) if only else ()),
            "--threads",
            "1",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_matmul_quick(tmp_path) -> list[dict]:
    """The matmul family's quick rows (after a row written before the run) -> the run's rows."""
    results = tmp_path / "matmul_quick.jsonl"
    lines = results.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": "row"}
    rows = [json.loads(line) for line in lines[1:]]
    assert {r["method"] for r in rows} == METHODS
    assert {r["M"] for r in rows} == {1, 32}
    assert len({r["run_id"] for r in rows}) == 1

    for r in rows:
        for key in ("date", "git_commit", "device", "threads", "M", "N", "K", "weight_bytes", "status", "quick"):
            assert key in r, key
        assert r["threads"] == 1 and r["quick"] is True
        assert set(r["versions"]) >= {"accelops", "torch", "triton", "torchao", "python"}
        assert r["versions"]["torch"]
        assert {"cpu_model", "cpu_count"} <= set(r["machine"])

    by = {(r["method"], r["M"]): r for r in rows}
    assert by[("int_mm", 1)]["status"] == "skipped"  # torch._int_mm needs M > 16
    for key in ("ternary_tuned", "int8_tuned"):  # a table tuned for the case, its choice recorded
        for m in (1, 32):
            assert by[(key, m)]["status"] == "ok" and by[(key, m)]["check"]["ok"]
            assert by[(key, m)]["tuned_choice"]["backend"] in ("native", "aten_int_mm", "reference")
    for key in ("ternary_auto", "int8_auto"):  # autotuned on the first call: its choice and cost recorded
        for m in (1, 32):
            r = by[(key, m)]
            assert r["status"] == "ok" and r["check"]["ok"] and r["autotune_first_call_s"] > 0
            assert r["tuned_choice"]["backend"] in ("native", "aten_int_mm", "reference")
    for key in ("ternary", "int8"):
        for m in (1, 32):
            r = by[(key, m)]
            assert r["status"] == "ok", r.get("reason")
            assert r["check"]["ok"] and r["check"]["against"] == "accelops.reference"
    # The lut3 format's GEMV: checked and timed at M=1, skipped with the reason at M=32.
    assert by[("ternary_lut", 1)]["status"] == "ok" and by[("ternary_lut", 1)]["check"]["ok"]
    assert by[("ternary_lut", 32)]["status"] == "skipped" and "GEMV" in by[("ternary_lut", 32)]["reason"]
    # The same for the base3 format's GEMV.
    assert by[("ternary_base3", 1)]["status"] == "ok" and by[("ternary_base3", 1)]["check"]["ok"]
    assert by[("ternary_base3", 32)]["status"] == "skipped" and "GEMV" in by[("ternary_base3", 32)]["reason"]
    # The memory limit of the M=1 case: one streaming read of the ternary case's bytes (packed
    # weight + an fp32 x row) per shape and thread count, and the ternary row's fraction of it.
    assert [r["method"] for r in rows].count("stream_read") == 1
    stream, tern = by[("stream_read", 1)], by[("ternary", 1)]
    assert stream["status"] == "ok" and stream["gb_per_s"] > 0 and not stream["accelops"]
    assert stream["bytes_moved"] >= tern["weight_bytes"] + tern["K"] * 4
    assert tern["stream_read_us"] == stream["median_us"]
    assert tern["bandwidth_fraction"] == stream["median_us"] / tern["median_us"]
    for r in rows:
        if r["status"] == "ok":
            assert r["p20_us"] <= r["median_us"] <= r["p80_us"]
            assert r["repeats"] >= 3
            assert "peak_mem_bytes" in r
            assert r["method"] == "stream_read" or r["rel_err_vs_fp32_linear"] >= 0
            # cold weights: each row says how many copies rotate, the bytes they hold and the
            # target (max(2x L3, 1 GiB); --quick caps the copies of its tiny weights at 64)
            assert r["weight_copies"] >= 2 and r["cold_target_bytes"] >= 1 << 30
            assert r["cold_bytes"] == r["weight_copies"] * r["weight_bytes"]
        elif r["method"].startswith("torchao"):
            # Only acceptable if torchao is absent here, and then the row says so.
            assert r["status"] == "skipped" and "torchao" in r["reason"]

    summary = (tmp_path / "matmul_summary_quick.md").read_text()
    assert "ternary vs fp32" in summary and "Targets:" in summary
    assert "Memory limit at M=1" in summary and "streaming read" in summary
    return rows


def test_matmul_bench_quick(tmp_path):
    """bench_matmul alone (the full smoke run below covers it too, with every family)."""
    (tmp_path / "matmul_quick.jsonl").write_text('{"earlier": "row"}\n')  # rows are appended, never overwritten
    proc = _run_quick(tmp_path, "matmul")
    check_matmul_quick(tmp_path)
    assert "accelops ternary_matmul" in proc.stdout


def test_quick_bench_appends_rows_with_metadata(tmp_path):
    (tmp_path / "matmul_quick.jsonl").write_text('{"earlier": "row"}\n')  # rows are appended, never overwritten
    proc = _run_quick(tmp_path)
    rows = check_matmul_quick(tmp_path)

    # The comm family: each kernel checked against its pure-PyTorch reference, both timed.
    comm = [json.loads(line) for line in (tmp_path / "comm_quick.jsonl").read_text().splitlines()]
    kernel_rows = [r for r in comm if r["method"].startswith("kernel:")]
    reference_rows = [r for r in comm if r["method"].startswith("reference:")]
    assert {r["method"] for r in kernel_rows} == {f"kernel:{op}" for op in COMM_OPS}
    assert {r["method"] for r in reference_rows} == {f"reference:{op}" for op in COMM_OPS}
    for r in kernel_rows + reference_rows:
        assert r["family"] == "comm" and r["threads"] == 1 and r["quick"] is True
        assert r["status"] == "ok", r.get("reason")
        assert r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert {"cpu_model", "cpu_count"} <= set(r["machine"]) and r["versions"]["torch"]
    for r in kernel_rows:
        assert r["check"]["ok"] and r["speedup_vs_reference"] > 0
    assert "Targets:" in (tmp_path / "comm_summary_quick.md").read_text()
    assert "accelops int8_linear" in proc.stdout

    # The lm family: every variant trained (or derived) and evaluated on the shared corpus,
    # or one row saying why not when ../shared is not beside the repository.
    lm = [json.loads(line) for line in (tmp_path / "lm_quick.jsonl").read_text().splitlines()]
    lm_summary = (tmp_path / "lm_summary_quick.md").read_text()
    if (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").is_file():
        assert [r["variant"] for r in lm] == LM_VARIANTS
        for r in lm:
            assert r["status"] == "ok" and r["quick"] is True and r["threads"] == 1
            assert 0 < r["val_loss"] < 10 and abs(r["val_bpc"] * 0.6931471805599453 - r["val_loss"]) < 1e-9
            assert r["eval_tokens_per_s"] > 0 and r["unique_parameters"] <= r["parameters"]
        by = {r["variant"]: r for r in lm}
        assert by["alternate sharing"]["block_params_vs_fp32"] == 0.5
        assert (
            by["bitlinear"]["deployed_bytes"]
            < by["int8 post-training"]["deployed_bytes"]
            < by["fp32"]["deployed_bytes"]
        )
        assert "bits/char" in lm_summary
    else:
        assert [r["status"] for r in lm] == ["skipped"] and "skipped" in lm_summary

    # The hpo family: every optimiser on every problem at equal budget (peers skipped, with the
    # reason, where they are not installed), and the time BOHB takes to choose a configuration.
    hpo = [json.loads(line) for line in (tmp_path / "hpo_quick.jsonl").read_text().splitlines()]
    regret = [r for r in hpo if r.get("kind") == "regret"]
    assert {r["problem"] for r in regret} == {"branin", "hartmann6", "digits_mlp"}
    assert {r["optimizer"] for r in regret} == {
        "random",
        "hyperband",
        "bohb",
        "bohb_compat",
        "bohb_fixed",
        "bohb_multivariate",
        "bohb_hpbandster",
        "hpbandster_bohb",
        "optuna_tpe_hb",
    }
    assert all(r["accounting"] == "resume" for r in regret)
    assert len({r["run_id"] for r in hpo}) == 1 and all(r["quick"] is True for r in hpo)
    for r in regret:
        if r["accelops"]:
            assert r["status"] == "ok", r.get("reason")
            assert len(r["final_regret"]) == 2 and min(r["final_regret"]) >= 0
            assert r["budget_spent_mean"] <= r["total_budget"]
            assert len(r["curve"]["median"]) == len(r["curve"]["budget"])
            lo, hi = r["final_regret_ci95"]
            assert lo <= r["final_regret_mean"] <= hi
        else:
            assert r["status"] == "ok" or (r["status"] == "skipped" and "not importable" in r["reason"]), r
    ask = [r for r in hpo if r.get("kind") == "ask_time" and r["optimizer"] == "bohb"]
    assert ask and all(r["status"] == "ok" and r["observations"] == 100 for r in ask)
    assert all(0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in ask)
    assert "Targets:" in (tmp_path / "hpo_summary_quick.md").read_text()
    assert (tmp_path / "hpo_regret_quick.png").is_file()

    # The scaleout family: every strategy trained on 2 gloo ranks, each rank's throughput,
    # memory (measured and computed) and collective payload recorded.
    scale = [json.loads(line) for line in (tmp_path / "scaleout_quick.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["rank"]) for r in scale) == sorted(
        (s, k)
        for s in ("ddp", "fsdp", "fsdp-submodule", "fsdp-submodule-noprefetch", "zero1", "pipeline")
        for k in (0, 1)
    )
    for r in scale:
        assert r["status"] == "ok", r.get("reason")
        assert r["family"] == "scaleout" and r["quick"] is True and r["world_size"] == 2 and r["optimizer"] == "adamw"
        assert r["tokens_per_s"] > 0 and r["state_bytes"] > 0 and r["payload_bytes_per_step"] > 0
        assert r["memory_method"] in ("rss_hwm_delta", "unavailable")
    by = {(r["method"], r["rank"]): r for r in scale}
    assert by[("fsdp", 0)]["param_bytes"] < by[("ddp", 0)]["param_bytes"]  # sharded weights
    assert by[("fsdp-submodule-noprefetch", 0)]["trainer_kw"] == {
        "strategy": "fsdp",
        "fsdp_units": "submodule",
        "fsdp_backward_prefetch": False,
    }
    assert by[("zero1", 0)]["optimizer_state_bytes"] < by[("ddp", 0)]["optimizer_state_bytes"]
    assert "Targets:" in (tmp_path / "scaleout_summary_quick.md").read_text()

    # The dispatch family: tuned vs default vs exhaustive search on each shape, and the
    # lookup cost; the user's own dispatch table file is never written by the bench.
    disp = [json.loads(line) for line in (tmp_path / "dispatch_quick.jsonl").read_text().splitlines()]
    assert {r["method"] for r in disp} == {"default", "tuned", "best", "dispatch_overhead"}
    for r in disp:
        assert r["status"] == "ok" and r["threads"] == 1
        if r["method"] != "dispatch_overhead":
            assert r["p20_us"] <= r["median_us"] <= r["p80_us"]
            assert {c["threads"] for c in r["candidates"]} == {1}
    assert "tuned vs best" in (tmp_path / "dispatch_summary_quick.md").read_text()

    # Every family's rows of this run are in the results database too, in one run.
    import duckdb

    con = duckdb.connect(str(tmp_path / "accelops_quick.duckdb"), read_only=True)
    stored = dict(con.execute("SELECT family, count(*) FROM measurements GROUP BY 1").fetchall())
    assert set(stored) >= {
        "matmul",
        "comm",
        "fake_quant",
        "ffn",
        "lm",
        "hpo",
        "dispatch",
        "optim",
        "scaleout",
        "layers",
        "eval",
    }
    assert stored["matmul"] == len(rows) and stored["dispatch"] == len(disp)
    assert con.execute("SELECT count(DISTINCT run_id) FROM runs").fetchone()[0] == 1
    con.close()
    check_optim_quick(tmp_path)
    check_layers_quick(tmp_path)
    check_generate_quick(tmp_path)


GENERATE_ENGINES = {"accelops", "accelops_base3", "accelops_hf", "hf_bf16", "hf_fp32", "torchao"}


def check_generate_quick(results_dir: Path, threads: int = 1) -> None:
    """The generate family's quick rows: every engine at batch 1 and 4 (torchao skipped with the
    reason where it is not importable), each checked greedy against its own no-cache forward
    before timing, with TTFT, prefill and decode tokens/s, peak RSS and model bytes; the
    accelops engine's decode-step breakdown."""
    rows = [json.loads(line) for line in (results_dir / "generate_quick.jsonl").read_text().splitlines()]
    assert {r["engine"] for r in rows} == GENERATE_ENGINES
    assert sorted((r["engine"], r["batch"]) for r in rows) == sorted((e, b) for e in GENERATE_ENGINES for b in (1, 4))
    assert len({r["run_id"] for r in rows}) == 1
    for r in rows:
        assert r["family"] == "generate" and r["quick"] is True and r["threads"] == threads and r["shape"] == "tiny"
        if r["engine"] == "torchao" and r["status"] != "ok":
            assert r["status"] == "skipped" and "torchao" in r["reason"]
            continue
        assert r["status"] == "ok", r.get("reason")
        assert r["check"]["ok"]
        assert 0 < r["ttft_p20_s"] <= r["ttft_s"] <= r["ttft_p80_s"]
        assert r["decode_step_p20_s"] <= r["decode_step_s"] <= r["decode_step_p80_s"]
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert r["peak_rss_bytes"] > 0 and r["model_bytes"] > 0
        assert {"cpu_model", "cpu_count"} <= set(r["machine"]) and r["versions"]["torch"]
    by = {(r["engine"], r["batch"]): r for r in rows}
    # int8 tied head/embedding and packed ternary layers: smaller than the bf16 model
    assert by[("accelops", 1)]["model_bytes"] < by[("hf_bf16", 1)]["model_bytes"] < by[("hf_fp32", 1)]["model_bytes"]
    bd = by[("accelops", 1)]["breakdown"]
    assert {"ternary matmuls", "LM head (int8_linear)", "norms", "sampling (argmax)"} <= set(bd["parts_s"])
    assert 0 <= bd["outside_matmuls_fraction"] <= 1 and "skipped" in bd["compiled"]
    summary = (results_dir / "generate_summary_quick.md").read_text()
    assert "Targets" in summary and "Decode step of the accelops engine" in summary
    # the report draws these rows as the bench wrote them (tests/data holds an older copy)
    if importlib.util.find_spec("duckdb") and importlib.util.find_spec("matplotlib"):
        from tests.test_report_plots import check_generate_plot

        (results_dir / "generate_plot").mkdir()
        check_generate_plot(rows, results_dir / "generate_plot")


EVAL_VARIANTS = ["fp32", "bitlinear", "int8-ptq", "qat-int8", "alternate"]
LEMMA_VARIANTS = ["fp32", "bitlinear", "int8-ptq", "encoder-decoder"]


def test_eval_bench_quick(tmp_path):
    """bench_eval --quick: every variant of BANKING77, and the lemmatisation task's, trained a
    few steps, deployed and compared with fp32 (or one skipped row when the evaluation data
    are not there)."""
    from accelops.eval.data import data_root

    _run_quick(tmp_path, "eval", timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "eval_quick.jsonl").read_text().splitlines()]
    summary = (tmp_path / "eval_summary_quick.md").read_text()
    if not (data_root() / "banking77").is_dir():
        assert [r["status"] for r in rows] == ["skipped"] and "skipped" in summary
        return
    assert [(r["task"], r["variant"]) for r in rows] == [("banking77", v) for v in EVAL_VARIANTS] + [
        ("lemma", v) for v in LEMMA_VARIANTS
    ]
    assert len({r["run_id"] for r in rows}) == 1
    lemma = {r["variant"]: r for r in rows if r["task"] == "lemma"}
    assert lemma["encoder-decoder"]["block_params_vs_baseline"] < 0.6 and "target" not in lemma["bitlinear"]
    assert lemma["fp32"]["n"] == 2077  # test sentences (the bootstrap's unit)
    assert "| lemma | encoder-decoder | accuracy |" in summary and "copy-the-form baseline" in summary
    rows = [r for r in rows if r["task"] == "banking77"]
    for r in rows:
        assert r["status"] == "ok" and r["quick"] is True and r["task"] == "banking77" and r["n"] == 3080
        assert 0 <= r["value"] <= 1 and r["ci95"][0] <= r["delta"] <= r["ci95"][1]
        assert r["deployed_bytes"] <= r["fp32_bytes"] and r["train_s"] > 0 and r["eval_s"] > 0
    by = {r["variant"]: r for r in rows}
    assert by["fp32"]["delta"] == 0 and by["alternate"]["block_params_vs_baseline"] == 0.5
    assert by["int8-ptq"]["target"] == 0.5 and isinstance(by["bitlinear"]["target_met"], bool)
    assert "| banking77 | bitlinear | accuracy |" in summary and "Targets missed:" in summary
    import duckdb

    con = duckdb.connect(str(tmp_path / "accelops_quick.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM measurements WHERE family = 'eval'").fetchone() == (9,)


def test_generate_bench_quick(tmp_path):
    """bench_generate alone (the full smoke run above covers it too, with every family)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("ACCELOPS_BACKEND", None)
    proc = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--quick",
            "--only",
            "generate",
            "--threads",
            "1",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_generate_quick(tmp_path)


LAYER_METHODS = {"bitlinear_eval", "ternary_linear", "linear", "bitlinear_train"}


def check_layers_quick(results_dir: Path, threads: int = 1) -> None:
    """The layers family's quick rows: BitLinear eval checked bit-exact against TernaryLinear
    and its training forward, then every layer timed at M=1, BitLinear eval and TernaryLinear
    also in alternating batches (the paired ratio the 1.5x target is judged on)."""
    layers = [json.loads(line) for line in (results_dir / "layers_quick.jsonl").read_text().splitlines()]
    assert {r["method"] for r in layers} == LAYER_METHODS
    assert len({r["run_id"] for r in layers}) == 1
    for r in layers:
        assert r["family"] == "layers" and r["quick"] is True and r["threads"] == threads and r["M"] == 1
        assert r["status"] == "ok", r.get("reason")
        assert r["p20_us"] <= r["median_us"] <= r["p80_us"] and r["repeats"] >= 3
        assert {"cpu_model", "cpu_count"} <= set(r["machine"]) and r["versions"]["torch"]
    bit_eval = next(r for r in layers if r["method"] == "bitlinear_eval")
    assert bit_eval["check"]["ok"] and bit_eval["check"]["equal_ternary_linear"]
    assert bit_eval["check"]["equal_training_forward"]
    pair = bit_eval["paired_vs_ternary_linear"]
    assert 0 < pair["p20"] <= pair["median"] <= pair["p80"] and pair["rounds"] >= 5
    summary = (results_dir / "layers_summary_quick.md").read_text()
    assert "Targets:" in summary and "BitLinear eval vs TernaryLinear" in summary


def test_layers_bench_quick(tmp_path):
    """bench_layers alone (the full smoke run above covers it too, with every family)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("ACCELOPS_BACKEND", None)
    proc = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--quick",
            "--only",
            "layers",
            "--threads",
            "1",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_layers_quick(tmp_path)


def test_family_main_puts_a_familys_own_flags_in_the_environment(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    env_flags = {"--steps": "ACCELOPS_TEST_STEPS", "--data": "ACCELOPS_TEST_DATA"}
    for env in env_flags.values():
        monkeypatch.delenv(env, raising=False)  # and restored to unset afterwards
    seen = []

    def run(cfg):
        seen.append({env: os.environ.get(env) for env in env_flags.values()})
        return common.FamilyResult("envflags", "summary\n", [], [])

    common_args = ["--results-dir", str(tmp_path), "--no-db", "--threads", "1"]
    assert common.family_main("doc", run, ["--steps", "7", *common_args], env_flags) == 0
    assert seen == [{"ACCELOPS_TEST_STEPS": "7", "ACCELOPS_TEST_DATA": None}]
    with pytest.raises(SystemExit) as exc:  # a flag without its value: argparse's usage error
        common.family_main("doc", run, [*common_args, "--steps"], env_flags)
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err and len(seen) == 1


def test_hpo_bench_accounting():
    """bench_hpo's cost rule: with "resume" a configuration evaluated again at a larger budget
    continues its run and pays what it adds (the MLP gives the loss of a run trained in one
    go); with "full" every evaluation pays its budget."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_hpo
        import hpo_problems
    finally:
        sys.path.remove(str(ROOT / "bench"))
    mlp = hpo_problems.make_problems(quick=True)[-1]
    config = {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-4, "width": 32, "log2_batch": 6, "activation": "relu"}
    for accounting, want in (("resume", [1, 2, 6]), ("full", [1, 3, 9])):
        runs, costs, losses = bench_hpo.Runs(mlp, accounting), [], []
        for budget in (1, 3, 9):
            costs.append(runs.cost(7, budget))
            losses.append(runs.evaluate(7, config, budget, None))
        assert costs == want and runs.cost(8, 9) == 9
        assert losses[-1] == mlp.evaluate(config, 9, None)
    problem = hpo_problems.make_problems(quick=False)[0]
    assert bench_hpo._hpbandster_iterations(problem, "resume") > bench_hpo._hpbandster_iterations(problem, "full")
    values = [0.0, 1.0, 0.5, 0.25]
    lo, hi = bench_hpo.bootstrap_ci(values)
    assert 0.0 <= lo < sum(values) / 4 < hi <= 1.0
    lo, hi = bench_hpo.bootstrap_diff_ci([5.0, 5.1, 4.9], [1.0, 1.1, 0.9])
    assert 3.5 < lo <= hi < 4.5


OPTIM_METHODS = {
    "adamw8bit",
    "adamw8bit_fp8",
    "torch_adamw_foreach",
    "torch_adamw_fused",
    "sgd8bit",
    "torch_sgd_foreach",
}


def check_optim_quick(results_dir: Path, threads: int = 1) -> None:
    """The optim family's quick rows: each optimizer's step timed (torch's fused AdamW may be
    skipped, with the reason), accelops' kernel checked bit-exact first, the state-bytes ratio
    (memory, not time) within its target, and both LM runs (or one skipped row)."""
    optim = [json.loads(line) for line in (results_dir / "optim_quick.jsonl").read_text().splitlines()]
    steps = [r for r in optim if r.get("kind") == "step_time"]
    assert {r["method"] for r in steps} == OPTIM_METHODS
    assert len({r["run_id"] for r in optim}) == 1 and all(r["quick"] is True for r in optim)
    for r in steps:
        assert r["family"] == "optim" and r["threads"] == threads
        if r["method"] == "torch_adamw_fused" and r["status"] != "ok":
            assert r["status"] == "skipped" and r["reason"]
            continue
        assert r["status"] == "ok", r.get("reason")
        assert r["p20_us"] <= r["median_us"] <= r["p80_us"] and r["repeats"] >= 3
        assert {"cpu_model", "cpu_count"} <= set(r["machine"]) and r["versions"]["torch"]
    by = {r["method"]: r for r in steps}
    for method in ("adamw8bit", "adamw8bit_fp8"):
        assert by[method]["check"]["ok"]
        assert by[method]["state_bytes_vs_torch_adamw_foreach"] <= 0.27
    assert by["sgd8bit"]["time_vs_torch_sgd_foreach"] > 0
    lm = [r for r in optim if r.get("kind") == "lm"]
    if (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").is_file():
        assert [r["method"] for r in lm] == ["lm_torch_adamw", "lm_adamw8bit", "lm_adamw8bit_fp8"]
        assert all(r["status"] == "ok" and 0 < r["val_loss"] < 10 for r in lm)
        assert lm[1]["val_loss_vs_torch_adamw"] > 0 and lm[2]["val_loss_vs_torch_adamw"] > 0
    else:
        assert [r["status"] for r in lm] == ["skipped"]
    assert "Targets:" in (results_dir / "optim_summary_quick.md").read_text()


def test_hpo_dev_harness(tmp_path):
    """bench/hpo_dev.py: refuses the evaluation seeds and bad variants, runs BOHB exactly as
    bench_hpo does (same evaluations for the same seed), and reports one row per variant."""
    import pytest

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_hpo
        import hpo_dev
        import hpo_problems
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from accelops import hpo

    assert hpo_dev.parse_seeds("100:103") == [100, 101, 102] and hpo_dev.parse_seeds("150,120") == [150, 120]
    for bad in ("0:10", "99,100", "5"):
        with pytest.raises(ValueError, match="evaluation seeds"):
            hpo_dev.parse_seeds(bad)
    with pytest.raises(ValueError, match="names no seed"):
        hpo_dev.parse_seeds("200:100")
    assert hpo_dev.parse_variant('floor0={"bandwidth_floor": 0}') == ("floor0", {"bandwidth_floor": 0})
    for bad in ("floor0", "=[1]", "x=[1]", "optuna={}"):
        with pytest.raises(ValueError):
            hpo_dev.parse_variant(bad)

    problem = hpo_problems.make_problems(quick=True)[0]
    want = bench_hpo.run_accelops("bohb", problem, 123, bench_hpo._noise_rng(0, 123))["evals"]
    space = hpo_problems.accelops_space(problem.params)
    opt = hpo.BOHB(space, problem.min_budget, problem.max_budget, problem.eta, seed=123)
    assert hpo_dev.run_optimizer(opt, problem, bench_hpo._noise_rng(0, 123))["evals"] == want

    with pytest.raises(ValueError, match="peer names"):
        hpo_dev.compare({"hpbandster": {}}, [0], [100], peers=(), quick=True)
    rows = hpo_dev.compare(
        {
            "defaults": {},
            "hpbandster_algorithm": {"bandwidth_floor": 0.0, "kde": "multivariate", "random_placement": "every"},
        },
        [0, 1],
        [100, 101],
        peers=(),
        cache_path=str(tmp_path / "cache.json"),
        jobs=1,
        quick=True,
    )
    assert [(r["problem"], r["name"]) for r in rows] == [
        ("branin", "defaults"),
        ("branin", "hpbandster_algorithm"),
        ("hartmann6", "defaults"),
        ("hartmann6", "hpbandster_algorithm"),
    ]
    assert all(r["mean"] >= 0 and r["seeds"] == 2 and r["full_budget"] > 0 for r in rows)
    assert (tmp_path / "cache.json").is_file()
