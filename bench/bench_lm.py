"""LM family: the real evaluation of accelops' layers in one training run. A character-level
TransformerLM trained on a text file (default ../shared/data/tinyshakespeare.txt beside
the repository; first 90% train, last 10% validation) in each variant, same size, same
data order, same optimizer and steps:

    fp32                  nn.Linear projections, FusedFFN
    bitlinear             BitLinear (ternary weights, int8 activations) projections and FFN
    qat-int8              QATLinear (fake-quant int8 weights and activations), then deployed
                          as Int8Linear (to_int8(): same outputs, integer weights)
    int8 post-training    the trained fp32 model, projections and FFN turned W8A8 (to_int8())
    alternate sharing     fp32, blocks shared in two alternating sets (share_parameters)

Reported per variant: validation loss (mean cross-entropy over every validation window)
and bits per character (loss / ln 2), its ratio to fp32's, parameters (unique / of the
blocks), weight bytes (fp32 and as deployed: ternary packed 2 bits, int8 1 byte, plus
scales), training tokens/s (median over 50-step windows after the first) and evaluation tokens/s.
Targets (issue 5): bitlinear bits/char at most 1.10x fp32's; int8 post-training at most
1.01x; alternate sharing halves the blocks' unique parameters at most 1.05x.

    python bench/bench_lm.py [--quick] [--threads 2] [--results-dir DIR]
                             [--data PATH] [--steps N]

(--data / --steps are also read from ACCELOPS_BENCH_LM_DATA / ACCELOPS_BENCH_LM_STEPS when
the family runs from bench/run.py.) The full run takes about half an hour on 2 cores.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import common
import torch
from torch.utils.data import default_collate

FAMILY = "lm"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGETS = {"bitlinear": 1.10, "int8 post-training": 1.01, "alternate sharing": 1.05}


@dataclasses.dataclass
class Setup:
    """One size for every variant."""

    dim: int
    n_layers: int
    n_heads: int
    hidden: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    log_every: int
    val_windows: int | None  # None: every validation window

    @classmethod
    def for_run(cls, quick: bool, steps: int | None) -> "Setup":
        if quick:
            return cls(
                dim=32,
                n_layers=4,
                n_heads=2,
                hidden=64,
                seq_len=32,
                batch_size=8,
                steps=steps or 4,
                lr=3e-3,
                warmup_steps=1,
                log_every=2,
                val_windows=16,
            )
        # ~0.8M parameters; 1000 steps of 32 x 128 characters = ~4 epochs of the corpus.
        return cls(
            dim=128,
            n_layers=4,
            n_heads=4,
            hidden=352,
            seq_len=128,
            batch_size=32,
            steps=steps or 1000,
            lr=3e-3,
            warmup_steps=50,
            log_every=50,
            val_windows=None,
        )


def _data_path(argv_value: str | None) -> Path:
    value = argv_value or os.environ.get("ACCELOPS_BENCH_LM_DATA")
    return Path(value) if value else DEFAULT_DATA


def _steps(argv_value: int | None) -> int | None:
    if argv_value is not None:
        return argv_value
    env = os.environ.get("ACCELOPS_BENCH_LM_STEPS")
    return int(env) if env else None


@torch.no_grad()
def evaluate(model, windows, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy over the windows (every position weighs the same) -> (loss,
    tokens/s of the evaluation)."""
    model.eval()
    total, count = 0.0, 0
    start = time.perf_counter()
    for s in range(0, len(windows), batch_size):
        x, y = default_collate([windows[i] for i in range(s, min(len(windows), s + batch_size))])
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    elapsed = time.perf_counter() - start
    model.train()
    return total / count, count / elapsed


class _Subset:
    """The first n windows of a dataset (quick mode evaluates on a few)."""

    def __init__(self, data, n):
        self.data, self.n = data, min(n, len(data))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.data[i]


def build_model(setup: Setup, vocab_size: int, quant, sharing, seed: int):
    from accelops.models import TransformerLM, TransformerLMConfig
    from accelops.sharing import share_parameters

    torch.manual_seed(seed)
    cfg = TransformerLMConfig(
        vocab_size=vocab_size,
        dim=setup.dim,
        n_layers=setup.n_layers,
        n_heads=setup.n_heads,
        hidden=setup.hidden,
        max_len=setup.seq_len,
        quant=quant,
    )
    model = TransformerLM(cfg)
    if sharing:
        share_parameters(model, sharing)
    return model


def train(model, setup: Setup, train_data, seed: int, optimizer=None) -> dict:
    """Trains with accelops.train.Trainer (optimizer, default AdamW; cosine schedule with
    warm-up) -> train stats. No evaluation inside: every variant is evaluated the same way
    afterwards. bench_optim trains its optimizers through this too."""
    from accelops.train import Trainer
    from accelops.train.config import build_scheduler

    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = build_scheduler(
        optimizer, {"name": "cosine", "warmup_steps": setup.warmup_steps, "min_lr_ratio": 0.1}, setup.steps
    )
    trainer = Trainer(
        model,
        optimizer,
        train_data,
        None,
        scheduler=scheduler,
        max_steps=setup.steps,
        eval_every=None,
        batch_size=setup.batch_size,
        grad_clip=1.0,
        seed=seed,
        log_every=setup.log_every,
        progress=sys.stderr.isatty(),
        distributed=False,
    )
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    windows = [r["tokens_per_s"] for r in trainer.history[:: setup.log_every]]
    steady = windows[1:] or windows  # the first window holds the warm-up steps
    return {
        "train_loss": result["loss"],
        "train_tokens_per_s": statistics.median(steady),
        "train_tokens_per_s_windows": windows,
        "train_s": trainer.history[-1]["elapsed_s"],
        "tokens_seen": sum(r["tokens"] for r in trainer.history),
    }


def sizes(model) -> dict:
    from accelops.nn import count_parameters

    whole, blocks = count_parameters(model), count_parameters(model.blocks)
    return {
        "parameters": whole.parameters,
        "unique_parameters": whole.unique_parameters,
        "block_unique_parameters": blocks.unique_parameters,
        "fp32_bytes": whole.fp32_bytes,
        "deployed_bytes": whole.deployed_bytes,
    }


def measure(setup, model, val, name, quant, note, extra=None) -> dict:
    loss, eval_tps = evaluate(model, val, setup.batch_size)
    row = {
        "variant": name,
        "quant": quant,
        "note": note,
        "val_loss": loss,
        "val_bpc": loss / math.log(2),
        "eval_tokens_per_s": eval_tps,
        **sizes(model),
        **(extra or {}),
    }
    print(f"lm: {name}: val loss {loss:.4f} ({row['val_bpc']:.4f} bits/char)", file=sys.stderr)
    return row


def run_variants(setup: Setup, data_path: Path, seed: int = 0) -> list[dict]:
    from accelops.train import load_char_corpus

    train_data, val_data, vocab = load_char_corpus(data_path, setup.seq_len, 0.1)
    val = val_data if setup.val_windows is None else _Subset(val_data, setup.val_windows)
    rows = []

    fp32 = build_model(setup, len(vocab), None, None, seed)
    stats = train(fp32, setup, train_data, seed)
    rows.append(measure(setup, fp32, val, "fp32", None, "nn.Linear + FusedFFN", stats))
    ptq = copy.deepcopy(fp32).to_int8()
    rows.append(
        measure(setup, ptq, val, "int8 post-training", "int8", "the fp32 model after to_int8(): W8A8, no retraining")
    )
    del fp32, ptq

    bit = build_model(setup, len(vocab), "bitlinear", None, seed)
    stats = train(bit, setup, train_data, seed)
    rows.append(
        measure(
            setup,
            bit,
            val,
            "bitlinear",
            "bitlinear",
            "BitLinear projections and FFN (ternary weights, int8 activations)",
            stats,
        )
    )
    del bit

    qat = build_model(setup, len(vocab), "qat-int8", None, seed)
    stats = train(qat, setup, train_data, seed)
    rows.append(measure(setup, qat, val, "qat-int8", "qat-int8", "QATLinear, fake-quant training", stats))
    rows.append(
        measure(
            setup,
            qat.to_int8(),
            val,
            "qat-int8, deployed int8",
            "int8",
            "the qat-int8 model after to_int8(): Int8Linear with its trained codes",
        )
    )
    del qat

    shared = build_model(setup, len(vocab), None, "alternate", seed)
    stats = train(shared, setup, train_data, seed)
    rows.append(
        measure(setup, shared, val, "alternate sharing", None, "fp32, blocks shared in two alternating sets", stats)
    )
    del shared

    base = rows[0]
    for row in rows:
        row["val_tokens"] = len(val) * setup.seq_len
        row["bpc_vs_fp32"] = row["val_bpc"] / base["val_bpc"]
        row["block_params_vs_fp32"] = row["block_unique_parameters"] / base["block_unique_parameters"]
        target = TARGETS.get(row["variant"])
        if target is not None:
            row["target_bpc_vs_fp32"] = target
            met = row["bpc_vs_fp32"] <= target
            if row["variant"] == "alternate sharing":
                met = met and row["block_params_vs_fp32"] <= 0.5
            row["target_met"] = met
    return rows


def _tps(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def summarize(rows, cfg, setup: Setup, threads, data_path, wall_s, meta) -> str:
    out = common.run_header(FAMILY, meta, cfg, threads, wall_s, versions=("torch", "python")) + [
        f"Character-level TransformerLM on {data_path.name} (90/10 split, {rows[0]['val_tokens']:,} validation "
        f"characters): dim {setup.dim}, {setup.n_layers} layers, {setup.n_heads} heads, FFN {setup.hidden} "
        f"(SwiGLU), context {setup.seq_len}; {setup.steps} steps of {setup.batch_size} x {setup.seq_len} "
        f"characters, AdamW lr {setup.lr:g} cosine (warm-up {setup.warmup_steps}), grad clip 1, seed 0, the same "
        "for every variant. Validation loss = mean cross-entropy over every validation window; bits/char = "
        f"loss / ln 2. Train tokens/s: median over {setup.log_every}-step windows after the first; eval tokens/s: the validation pass.",
        "",
    ]
    table = []
    for r in rows:
        target = r.get("target_bpc_vs_fp32")
        verdict = "-" if target is None else (f"<= {target:.2f}x: " + ("met" if r["target_met"] else "MISSED"))
        table.append(
            [
                r["variant"],
                f"{r['val_loss']:.4f}",
                f"{r['val_bpc']:.4f}",
                f"{r['bpc_vs_fp32']:.3f}x",
                verdict,
                f"{r['unique_parameters']:,}",
                f"{r['block_unique_parameters']:,}",
                common.fmt_bytes(r["fp32_bytes"]),
                common.fmt_bytes(r["deployed_bytes"]),
                _tps(r.get("train_tokens_per_s")),
                _tps(r["eval_tokens_per_s"]),
            ]
        )
    out += [
        common.md_table(
            [
                "variant",
                "val loss",
                "bits/char",
                "vs fp32",
                "target",
                "unique params",
                "unique block params",
                "fp32 bytes",
                "deployed bytes",
                "train tok/s",
                "eval tok/s",
            ],
            table,
        ),
        "",
    ]
    notes = [f"- {r['variant']}: {r['note']}." for r in rows]
    return "\n".join(out + notes + [""])


def run(cfg: common.Config, data_path: Path | None = None, steps: int | None = None) -> common.FamilyResult:
    meta = common.run_metadata(cfg)
    data_path = _data_path(None) if data_path is None else data_path
    setup = Setup.for_run(cfg.quick, _steps(steps))
    threads = cfg.threads[-1]
    if not data_path.is_file():
        text = (
            f"## Language-model evaluation\n\nskipped: the corpus {data_path} is not there (pass --data PATH "
            "or set ACCELOPS_BENCH_LM_DATA).\n"
        )
        row = {**meta, "family": FAMILY, "status": "skipped", "reason": f"no corpus at {data_path}"}
        common.append_row(cfg.results_file(FAMILY), row)
        return common.FamilyResult(FAMILY, text, [row])
    torch.set_num_threads(threads)
    start = time.perf_counter()
    failures = []
    try:
        rows = run_variants(setup, data_path)
    except Exception as exc:  # a failure row, not a crash of the whole suite
        row = {**meta, "family": FAMILY, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
        common.append_row(cfg.results_file(FAMILY), row)
        return common.FamilyResult(
            FAMILY, f"## Language-model evaluation\n\nerror: {row['reason']}\n", [row], [f"lm: {row['reason']}"]
        )
    wall = time.perf_counter() - start
    for row in rows:
        row.update(
            {
                **meta,
                "family": FAMILY,
                "status": "ok",
                "threads": threads,
                "setup": dataclasses.asdict(setup),
                "data": str(data_path),
                "loadavg_1m": os.getloadavg()[0],
            }
        )
        common.append_row(cfg.results_file(FAMILY), row)
    text = "## Language-model evaluation\n\n" + summarize(rows, cfg, setup, threads, data_path, wall, meta)
    return common.FamilyResult(FAMILY, text, rows, failures)


def main(argv=None) -> int:
    env_flags = {"--data": "ACCELOPS_BENCH_LM_DATA", "--steps": "ACCELOPS_BENCH_LM_STEPS"}
    return common.family_main(__doc__, run, argv, env_flags)


if __name__ == "__main__":
    sys.exit(main())
