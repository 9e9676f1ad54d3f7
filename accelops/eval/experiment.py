"""Full precision against quantized and shared models, task by task: what `accelops eval
CONFIG` and bench/bench_eval.py run.

For each task and seed, every variant is built from the same seed (torch.manual_seed before
the build: the same initial weights where the shapes agree) and trained on the same data in
the same order (fit(seed=...)), then deployed and evaluated on the chosen split:

    fp32        nn.Linear projections + FusedFFN
    bitlinear   BitLinear QAT (ternary weights, int8 activations), deployed with
                accelops.convert(model, "ternary"): TernaryLinear (2-bit packed weights)
    int8-ptq    the trained fp32 model after to_int8(): Int8Linear W8A8, no retraining
    qat-int8    QATLinear QAT, deployed with to_int8(): Int8Linear with its trained codes
    alternate   fp32, blocks shared in two alternating sets (half the block parameters)
    encoder-decoder  fp32, an encoder-decoder whose decoder blocks reuse the encoder
                blocks' self-attention projections and FFN (seq2seq tasks: lemma)

Each variant is compared with the baseline (fp32) by accelops.eval.suite.compare: the mean
over seeds, the difference in points (a ratio for perplexity) and its standard error from a
paired bootstrap over the test examples and the spread of the per-seed differences.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .suite import METRICS, PRIMARY, EvalSuite, compare
from .tasks import TASKS, fit

__all__ = [
    "VARIANTS",
    "TARGETS",
    "Experiment",
    "train_variants",
    "run_experiment",
    "target_of",
    "merge_seed_rows",
]

VARIANTS = {
    "fp32": "nn.Linear projections + FusedFFN, fp32",
    "bitlinear": "BitLinear QAT (ternary weights, int8 activations), deployed by convert(model, 'ternary') "
    "as TernaryLinear",
    "int8-ptq": "the trained fp32 model after to_int8(): Int8Linear W8A8, no retraining",
    "qat-int8": "QATLinear QAT (fake-quant int8), deployed by to_int8() as Int8Linear with its trained codes",
    "alternate": "fp32, blocks shared in two alternating sets (share_parameters 'alternate'): half the block "
    "parameters",
    "encoder-decoder": "fp32, encoder-decoder sharing (share_encoder_decoder): each decoder block reuses its encoder "
    "block's self-attention projections and FFN; its norms and cross-attention are its own",
}
_TRAINED = {"fp32": None, "bitlinear": "bitlinear", "qat-int8": "qat-int8", "alternate": None, "encoder-decoder": None}
# Variants that need a model of one kind: the head the task's model has.
_NEEDS_HEAD = {"encoder-decoder": "seq2seq"}
_NO_HEAD = {"alternate": "seq2seq"}  # share_parameters finds no single block list in an encoder-decoder

# The targets (judged on test): points a fraction metric may lose, or the most a
# perplexity may grow (ratio).
_POINTS = {"bitlinear": 2.0, "int8-ptq": 0.5, "alternate": 2.0}
_PPL = {"bitlinear": 1.10, "int8-ptq": 1.01}
TARGETS = {
    (v, t): (_PPL[v] if t == "wikitext2" else (3.0 if (v, t) == ("bitlinear", "squad") else _POINTS[v]))
    for v in _POINTS
    for t in TASKS
    if (t != "wikitext2" or v in _PPL) and t != "lemma"  # the issue sets no target for lemmatisation
}


def target_of(variant: str, task: str):
    """(limit, unit) of the target for the variant on the task's primary metric, or None."""
    limit = TARGETS.get((variant, task))
    if limit is None:
        return None
    return limit, ("ratio" if task == "wikitext2" else "points")


@dataclass
class Experiment:
    """What to run. model: TransformerLMConfig settings (vocab_size comes from the
    tokenizer, quant from the variant); train: fit() settings (steps, batch_size, lr,
    weight_decay, scheduler); per_task: {task: {"model": {...}, "train": {...}}} overriding
    those for one task (e.g. a longer max_len for QA); limit: evaluate on the split's first
    examples only (None: all; quick runs)."""

    tasks: list
    variants: list = field(default_factory=lambda: ["fp32", "bitlinear", "int8-ptq"])
    seeds: list = field(default_factory=lambda: [0])
    baseline: str = "fp32"
    split: str = "test"
    vocab_size: int = 2000
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    per_task: dict = field(default_factory=dict)
    root: str | None = None
    n_boot: int = 1000

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("an experiment needs at least one task")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; known tasks: {sorted(TASKS)}")
        if not self.variants:
            raise ValueError("an experiment needs at least one variant")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; known variants: {list(VARIANTS)}")
        if self.baseline not in self.variants:
            raise ValueError(f"the baseline {self.baseline!r} is not among the variants {self.variants}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of ints, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds!r}")
        for key in ("vocab_size", "quant"):
            if key in self.model:
                raise ValueError(f"model.{key} is set by the experiment (the tokenizer / the variant), not the config")
        for v in self.variants:
            for t in self.tasks:
                head = TASKS[t].head
                if v in _NEEDS_HEAD and head != _NEEDS_HEAD[v]:
                    raise ValueError(f"variant {v!r} needs a {_NEEDS_HEAD[v]!r} task, task {t!r} has head {head!r}")
                if v in _NO_HEAD and head == _NO_HEAD[v]:
                    raise ValueError(f"variant {v!r} does not apply to task {t!r} (head {head!r})")
        unknown = set(self.per_task) - set(self.tasks)
        if unknown:
            raise ValueError(f"settings for task(s) {sorted(unknown)} that the experiment does not run {self.tasks}")

    def settings(self, task: str) -> tuple[dict, dict]:
        extra = self.per_task.get(task, {})
        return {**self.model, **extra.get("model", {})}, {**self.train, **extra.get("train", {})}


def _sizes(model) -> dict:
    from ..nn import count_parameters

    block_list = model.block_modules() if hasattr(model, "block_modules") else model.blocks
    whole, blocks = count_parameters(model), count_parameters(block_list)
    return {
        "parameters": whole.parameters,
        "unique_parameters": whole.unique_parameters,
        "block_unique_parameters": blocks.unique_parameters,
        "fp32_bytes": whole.fp32_bytes,
        "deployed_bytes": whole.deployed_bytes,
    }


def train_variants(task, tokenizer, variants, model_cfg: dict, train_cfg: dict, seed: int, log=None):
    """Yield (variant, deployed model in eval mode, info) for each variant, in the order
    given; int8-ptq is derived from fp32's trained model (trained for it when fp32 is not
    asked for). info: train_s, deployed sizes (accelops.nn.count_parameters), the final
    training loss."""
    from .. import convert
    from ..sharing import share_parameters

    train_cfg = dict(train_cfg)
    steps = train_cfg.pop("steps", 500)
    fp32 = fp32_info = None  # int8-ptq is derived from these
    order = list(variants)
    if "int8-ptq" in order and "fp32" not in order:
        order.insert(order.index("int8-ptq"), "fp32")
    for variant in order:
        if variant == "int8-ptq":
            model = copy.deepcopy(fp32).to_int8().eval()
            info = {"train_s": fp32_info["train_s"], "train_loss": fp32_info["train_loss"], "derived_from": "fp32"}
        else:
            torch.manual_seed(seed)
            extra = {"sharing": "encoder-decoder"} if variant == "encoder-decoder" else {}
            model = task.build_model(tokenizer, quant=_TRAINED[variant], **model_cfg, **extra)
            if variant == "alternate":
                share_parameters(model, "alternate")
            start = time.perf_counter()
            summary = fit(task, model, tokenizer, steps=steps, seed=seed, **train_cfg)
            info = {"train_s": time.perf_counter() - start, "train_loss": float(summary["loss"])}
            if variant == "bitlinear":
                convert(model, "ternary")
            elif variant == "qat-int8":
                model.to_int8()
            model.eval()
            if variant == "fp32":
                fp32, fp32_info = model, info
        info.update(_sizes(model))
        if log:
            log(f"{task.name} seed {seed}: {variant} trained ({info['train_s']:.1f} s, loss {info['train_loss']:.3f})")
        if variant in variants:
            yield variant, model, info


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def run_experiment(exp: Experiment, log=None) -> list[dict]:
    """Train, deploy and evaluate every variant of every task for every seed -> one row a
    (task, variant): the primary metric and every other one (mean and std over seeds), the
    comparison with the baseline (delta, se, ci95, target), sizes and times."""
    rows = []
    for name in exp.tasks:
        suite = EvalSuite([name], vocab_size=exp.vocab_size, root=exp.root, split=exp.split)
        task = suite.tasks[name]
        tok = suite.tokenizer(name)
        model_cfg, train_cfg = exp.settings(name)
        results = {v: [] for v in exp.variants}
        infos = {v: [] for v in exp.variants}
        for seed in exp.seeds:
            for variant, model, info in train_variants(task, tok, exp.variants, model_cfg, train_cfg, seed, log):
                res = suite.run({name: model}, label=variant, seed=seed)
                info["eval_s"] = res[name].eval_s
                results[variant].append(res)
                infos[variant].append(info)
                if log:
                    primary = PRIMARY[name]
                    log(f"{name} seed {seed}: {variant} {primary} {res[name].metric(primary):.4f}")
                del model
            gc.collect()
        base_info = infos[exp.baseline][0]
        for variant in exp.variants:
            cmp = compare(results[exp.baseline], results[variant], n_boot=exp.n_boot, seed=0)
            primary = cmp.row(name)
            info = infos[variant]
            train_s, train_s_std = _stats([i["train_s"] for i in info])
            eval_s, _ = _stats([i["eval_s"] for i in info])
            row = {
                "family": "eval",
                "task": name,
                "variant": variant,
                "op": name,
                "method": variant,
                "label": f"{name} {variant}",
                "note": VARIANTS[variant],
                "task_notes": task.notes,
                "split": exp.split,
                "n": primary["n"],
                "seeds": list(exp.seeds),
                "baseline": exp.baseline,
                "metric": primary["metric"],
                "value": primary["candidate"],
                "value_std": primary["candidate_std"],
                "value_seeds": primary["candidate_seeds"],
                "baseline_value": primary["baseline"],
                "delta": primary["delta"],
                "delta_unit": primary["unit"],
                "delta_seeds": primary["delta_seeds"],
                "se": primary["se"],
                "se_examples": primary["se_examples"],
                "se_seeds": primary["se_seeds"],
                "ci95": primary["ci95"],
                "scores": {m: _stats([r[name].metric(m) for r in results[variant]])[0] for m in METRICS[name]},
                "scores_full": [r[name].scores for r in results[variant]],
                "comparison": [
                    {k: r[k] for k in ("metric", "baseline", "candidate", "delta", "unit", "se", "ci95")}
                    for r in cmp.rows
                ],
                "train_s": train_s,
                "train_s_std": train_s_std,
                "eval_s": eval_s,
                "train_loss": _stats([i["train_loss"] for i in info])[0],
                **{k: info[0][k] for k in ("parameters", "unique_parameters", "block_unique_parameters")},
                "fp32_bytes": info[0]["fp32_bytes"],
                "deployed_bytes": info[0]["deployed_bytes"],
                "deployed_vs_baseline": info[0]["deployed_bytes"] / base_info["deployed_bytes"],
                "block_params_vs_baseline": info[0]["block_unique_parameters"] / base_info["block_unique_parameters"],
                "model_config": model_cfg,
                "train_config": {k: v for k, v in train_cfg.items()},
                "vocab_size": tok.vocab_size,
            }
            target = target_of(variant, name)
            if target is not None and variant != exp.baseline:
                limit, unit = target
                row["target"] = limit
                met = row["delta"] <= limit if unit == "ratio" else row["delta"] >= -limit
                if variant == "alternate":
                    met = met and row["block_params_vs_baseline"] <= 0.5
                row["target_met"] = bool(met)
            rows.append(row)
        del results
        gc.collect()
    return rows


# Settings that must agree for rows of separate runs to be pooled as seeds of one experiment.
_SAME = ("split", "n", "metric", "baseline", "delta_unit", "model_config", "train_config", "vocab_size")


def merge_seed_rows(runs: list[list[dict]]) -> list[dict]:
    """Pool run_experiment rows of separate runs over disjoint seeds (the same tasks,
    variants and settings) into rows over all their seeds, as one run of those seeds would
    give them, except the bootstrap part of the uncertainty: the rows keep no per-example
    statistics, so se_examples is an upper bound (the seed-weighted mean of the runs'
    se_examples: the standard deviation of a weighted sum is at most the weighted sum of
    the standard deviations), and `se_examples_bound` says so. The value, delta, their
    per-seed lists, se_seeds, scores, sizes and mean times are exact. Fraction metrics only
    (a perplexity ratio's bootstrap does not combine linearly). Rows come in the order of
    the first run."""
    if len(runs) < 2:
        raise ValueError(f"merge_seed_rows needs the rows of at least two runs, got {len(runs)}")
    keyed = []
    for i, rows in enumerate(runs):
        by = {}
        for r in rows:
            key = (r["task"], r["variant"])
            if key in by:
                raise ValueError(f"run {i}: two rows for task {key[0]!r} variant {key[1]!r}")
            by[key] = r
        keyed.append(by)
    keys = list(keyed[0])
    for i, by in enumerate(keyed[1:], 1):
        if set(by) != set(keys):
            raise ValueError(f"run {i} has (task, variant) rows {sorted(by)}, run 0 has {sorted(keys)}")
    merged = []
    for key in keys:
        parts = [by[key] for by in keyed]
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            for f in _SAME:
                if p.get(f) != first.get(f):
                    raise ValueError(f"{key[0]} {key[1]}: run {i} has {f} {p.get(f)!r}, run 0 {first.get(f)!r}")
        if first["delta_unit"] != "points":
            raise ValueError(f"{key[0]} {key[1]}: only fraction metrics merge (its delta is a {first['delta_unit']})")
        seeds = [s for p in parts for s in p["seeds"]]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{key[0]} {key[1]}: the runs' seeds overlap: {[p['seeds'] for p in parts]}")
        w = [len(p["seeds"]) / len(seeds) for p in parts]
        values = [v for p in parts for v in p["value_seeds"]]
        deltas = [d for p in parts for d in p["delta_seeds"]]
        row = dict(first)
        mean, std = _stats(values)
        delta = sum(deltas) / len(deltas)
        is_base = first["variant"] == first["baseline"]
        se_ex = sum(wi * p["se_examples"] for wi, p in zip(w, parts))
        se_seeds = _stats(deltas)[1] / math.sqrt(len(deltas))
        se = math.sqrt(se_ex**2 + se_seeds**2)
        row.update(
            seeds=seeds,
            value=mean,
            value_std=std,
            value_seeds=values,
            baseline_value=sum(wi * p["baseline_value"] for wi, p in zip(w, parts)),
            delta=delta,
            delta_seeds=deltas,
            se=se,
            se_examples=se_ex,
            se_examples_bound=not is_base,
            se_seeds=se_seeds,
            ci95=[delta - 1.96 * se, delta + 1.96 * se],
            scores={m: sum(wi * p["scores"][m] for wi, p in zip(w, parts)) for m in first["scores"]},
            scores_full=[s for p in parts for s in p["scores_full"]],
            # the other metrics' deltas pool exactly; their se would need the examples
            comparison=[
                {
                    **c,
                    "delta": sum(wi * p["comparison"][j]["delta"] for wi, p in zip(w, parts)),
                    "se": None,
                    "ci95": None,
                }
                for j, c in enumerate(first["comparison"])
            ],
            train_s=sum(wi * p["train_s"] for wi, p in zip(w, parts)),
            train_s_std=None,
            eval_s=sum(wi * p["eval_s"] for wi, p in zip(w, parts)),
            train_loss=sum(wi * p["train_loss"] for wi, p in zip(w, parts)),
            merged_from=[p.get("run_id") for p in parts],
        )
        if "target" in row:
            met = delta >= -row["target"]
            if row["variant"] == "alternate":
                met = met and row["block_params_vs_baseline"] <= 0.5
            row["target_met"] = bool(met)
        merged.append(row)
    return merged


def summary_table(rows: list[dict]) -> str:
    """A markdown table of run_experiment's rows."""
    head = [
        "task",
        "variant",
        "metric",
        "value (mean ± std over seeds)",
        "delta vs baseline",
        "se (examples, seeds)",
        "95% CI",
        "target",
        "deployed weights",
        "block params",
        "train s",
        "eval s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        pct = r["delta_unit"] == "points"
        scale = 100 if pct else 1
        value = f"{scale * r['value']:.2f}" + (f" ± {scale * r['value_std']:.2f}" if r["value_std"] is not None else "")
        if r["variant"] == r["baseline"]:
            delta = se = ci = "-"
        else:
            delta = f"{r['delta']:+.2f} pt" if pct else f"{r['delta']:.3f}x"
            f = ".2f" if pct else ".3f"  # points, or a ratio near 1
            seeds = "-" if r["se_seeds"] is None else f"{r['se_seeds']:{f}}"
            se = f"{r['se']:{f}} ({r['se_examples']:{f}}, {seeds})"
            ci = f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]" if pct else f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        if "target" in r:
            bound = f">= -{r['target']:g} pt" if pct else f"<= {r['target']:.2f}x"
            target = f"{bound}: " + ("met" if r["target_met"] else "MISSED")
        else:
            target = "-"
        lines.append(
            f"| {r['task']} | {r['variant']} | {r['metric']} | {value} | {delta} | {se} | {ci} | {target} | "
            f"{r['deployed_bytes'] / 1024:,.0f} KiB | {r['block_unique_parameters']:,} | {r['train_s']:.0f} | "
            f"{r['eval_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """A PNG: per task, each variant's difference from the baseline on the primary metric
    with its 95% interval, and the target where the issue sets one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(
        len(tasks), 1, figsize=(7, 1.2 + 0.5 * max(len(rows) / len(tasks), 2) * len(tasks)), squeeze=False
    )
    for ax, t in zip(axes[:, 0], tasks):
        rs = [r for r in rows if r["task"] == t and r["variant"] != r["baseline"]]
        unit = rs[0]["delta_unit"] if rs else "points"
        for i, r in enumerate(rs):
            lo, hi = r["ci95"]
            ax.errorbar(
                [r["delta"]], [i], xerr=[[r["delta"] - lo], [hi - r["delta"]]], fmt="o", color="tab:blue", capsize=3
            )
            if "target" in r:
                ax.plot([r["target"] if unit == "ratio" else -r["target"]], [i], "x", color="tab:red")
        ax.axvline(1.0 if unit == "ratio" else 0.0, color="grey", lw=0.8)
        ax.set_yticks(range(len(rs)), [r["variant"] for r in rs])
        metric = rs[0]["metric"] if rs else ""
        ax.set_title(
            f"{t}: {metric} vs {rows[0]['baseline']} ({'ratio' if unit == 'ratio' else 'points'}; x = target)",
            fontsize=9,
        )
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def experiment_dict(exp: Experiment) -> dict:
    return asdict(exp)
