"""EvalSuite: run models on several tasks, and compare two models (or two sets of seeds)
task by task, with the difference and its uncertainty.

    suite = EvalSuite(["banking77", "ud_pos"], vocab_size=2000)    # tasks load, tokenizers train
    base = suite.run(lambda task, tok: train_fp32(task, tok))      # a factory, a model, or {task: model}
    cand = suite.run({"banking77": clf, "ud_pos": tagger})
    print(compare(base, cand).markdown())

Every task result keeps its per-example statistics (a row per test example: correct or
not, per-label counts, entities found, NLL of a window, ...) from which each metric is a
function of their sums. That gives the uncertainty of a difference by a paired bootstrap
over the test examples: resample the examples (with replacement, the same resample for
both models), recompute both metrics, take the difference; its standard deviation over
the resamples is the standard error from the test set's finite size. Results of several
seeds (lists, paired by position: baseline seed s against candidate seed s) add the
spread over training runs: the standard error of the mean of the per-seed differences.
The two are independent sources, so `se` combines them as sqrt(se_examples^2 +
se_seeds^2), and ci95 is delta +- 1.96 se.

Differences are in points (x100) for the fraction metrics (accuracy, F1, exact match) and a
ratio (candidate / baseline) for perplexity, the units the issue's targets use.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics as M
from .tasks import TASKS, Task, TaskMismatch

__all__ = ["EvalSuite", "TaskResult", "SuiteResult", "Comparison", "compare", "METRICS", "PRIMARY"]


# --------------------------------------------------------------------------- metrics as sums
#
# Each metric: (kind, fn(arrays, W) -> [B]) where W is [B, n] example weights (a bootstrap
# resample's multiplicities, or ones for the whole split). kind "fraction": higher is better,
# compared in points; "perplexity": lower is better, compared as a ratio.


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return np.where(den > 0, out, 0.0)


def _mean(key):
    return lambda a, W: _ratio(W @ a[key], W.sum(1))


def _macro_f1(a, W):
    tp = W @ a["tp_onehot"]  # [B, L]
    n_pred, n_gold = W @ a["pred_onehot"], W @ a["gold_onehot"]
    p, r = _ratio(tp, n_pred), _ratio(tp, n_gold)
    return _ratio(2 * p * r, p + r).mean(1)


def _entity(which):
    def fn(a, W):
        tp, n_pred, n_gold = W @ a["tp"], W @ a["n_pred"], W @ a["n_gold"]
        if which == "precision":
            return _ratio(tp, n_pred)
        if which == "recall":
            return _ratio(tp, n_gold)
        return _ratio(2 * tp, n_pred + n_gold)

    return fn


def _perplexity(a, W):
    return np.exp(_ratio(W @ a["nll"], W @ a["tokens"]))


METRICS = {
    "banking77": {"accuracy": ("fraction", _mean("correct")), "macro_f1": ("fraction", _macro_f1)},
    "ud_pos": {
        "token_accuracy": ("fraction", lambda a, W: _ratio(W @ a["correct"], W @ a["words"])),
        "sequence_accuracy": ("fraction", _mean("all_correct")),
    },
    "wnut17": {
        "f1": ("fraction", _entity("f1")),
        "precision": ("fraction", _entity("precision")),
        "recall": ("fraction", _entity("recall")),
    },
    "squad": {"f1": ("fraction", _mean("f1")), "exact_match": ("fraction", _mean("em"))},
    "wikitext2": {"perplexity": ("perplexity", _perplexity)},
    # per sentence (the words of one sentence are not independent draws), summed over tokens
    "lemma": {
        "accuracy": ("fraction", lambda a, W: _ratio(W @ a["correct"], W @ a["words"])),
        "unseen_accuracy": ("fraction", lambda a, W: _ratio(W @ a["unseen_correct"], W @ a["unseen"])),
    },
}
# The metric each task's target is stated in (the targets).
PRIMARY = {
    "banking77": "accuracy",
    "ud_pos": "token_accuracy",
    "wnut17": "f1",
    "squad": "f1",
    "wikitext2": "perplexity",
    "lemma": "accuracy",
}


def _onehot(ids, n):
    out = np.zeros((len(ids), n))
    out[np.arange(len(ids)), ids] = 1.0
    return out


@torch.no_grad()
def _per_example(task: Task, model, tokenizer, split: str, batch_size: int):
    """-> (the task's scores as its evaluate() gives them, per-example arrays for METRICS)."""
    if task.name == "banking77":
        task.check_model(model, tokenizer)
        ds = task.encode(split, tokenizer, model.config.max_len)
        pred = torch.cat(task._outputs(model, ds, batch_size)).argmax(-1).numpy()
        gold = ds.tensors[2].numpy()
        n = len(task.labels)
        correct = (pred == gold).astype(float)
        arrays = {
            "correct": correct,
            "tp_onehot": _onehot(gold, n) * correct[:, None],
            "pred_onehot": _onehot(pred, n),
            "gold_onehot": _onehot(gold, n),
        }
        names = [task.labels[i] for i in pred]
        return M.classification_scores(task.split(split).labels, names, labels=task.labels).as_dict(), arrays
    if task.name in ("ud_pos", "wnut17"):
        gold, pred, cut = task.predict(model, tokenizer, split, batch_size=batch_size)
        correct = np.array([sum(g == p for g, p in zip(gs, ps)) for gs, ps in zip(gold, pred)], dtype=float)
        words = np.array([len(gs) for gs in gold], dtype=float)
        if task.name == "ud_pos":
            scores = {
                "token_accuracy": M.token_accuracy(gold, pred),
                "sequence_accuracy": M.sequence_accuracy(gold, pred),
                "words_cut": cut,
            }
            return scores, {"correct": correct, "words": words, "all_correct": (correct == words).astype(float)}
        ents = [(set(M.bio_entities(g)), set(M.bio_entities(p))) for g, p in zip(gold, pred)]
        arrays = {
            "tp": np.array([len(g & p) for g, p in ents], dtype=float),
            "n_pred": np.array([len(p) for _, p in ents], dtype=float),
            "n_gold": np.array([len(g) for g, _ in ents], dtype=float),
        }
        scores = {**M.entity_scores(gold, pred).as_dict(), "token_accuracy": M.token_accuracy(gold, pred)}
        return {**scores, "words_cut": cut}, arrays
    if task.name == "squad":
        pred = task.predict(model, tokenizer, split, batch_size=batch_size)
        gold = task.split(split).gold_answers()
        em = np.array([M.squad_exact_match(pred[q], a) for q, a in gold.items()])
        f1 = np.array([M.squad_f1(pred[q], a) for q, a in gold.items()])
        return M.squad_scores(pred, gold).as_dict(), {"em": em, "f1": f1}
    if task.name == "wikitext2":
        import torch.nn.functional as F

        task.check_model(model, tokenizer)
        ds = task.encode(split, tokenizer, model.config.max_len)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        nll, tokens = [], []
        try:
            for i in range(0, len(ds), batch_size):
                x, y = (t[i : i + batch_size].to(device) for t in ds.tensors)
                logits = model(x).float()
                loss = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")
                nll.append(loss.sum(1).double().cpu())
                tokens.append((y != -100).sum(1).cpu())
        finally:
            model.train(was_training)
        nll, tokens = torch.cat(nll).numpy(), torch.cat(tokens).numpy().astype(float)
        c = task.counts(split)
        scores = M.lm_scores(float(nll.sum()), int(tokens.sum()), num_words=c["words"], num_chars=c["chars"])
        return scores.as_dict(), {"nll": nll, "tokens": tokens}
    if task.name == "lemma":
        gold, pred, cut = task.predict(model, tokenizer, split, batch_size=max(batch_size, 256))
        train_forms = task._train_forms
        forms = [s.words for s in task.split(split)]
        correct, unseen, unseen_correct = [], [], []
        for fs, gs, ps in zip(forms, gold, pred):
            ok = [g == p for g, p in zip(gs, ps)]
            new = [f not in train_forms for f in fs]
            correct.append(sum(ok))
            unseen.append(sum(new))
            unseen_correct.append(sum(o and n for o, n in zip(ok, new)))
        arrays = {
            "correct": np.array(correct, dtype=float),
            "words": np.array([len(gs) for gs in gold], dtype=float),
            "unseen": np.array(unseen, dtype=float),
            "unseen_correct": np.array(unseen_correct, dtype=float),
        }
        return task.scores(split, gold, pred, cut), arrays
    raise ValueError(f"EvalSuite has no per-example metrics for task {task.name!r}; known: {sorted(METRICS)}")


# --------------------------------------------------------------------------- results


@dataclass
class TaskResult:
    """One model on one task's split: scores (the task's metrics, as task.evaluate gives
    them), arrays (per-example statistics for the bootstrap), n examples, eval_s seconds,
    gold (a fingerprint of the split's gold answers: compare() pairs only equal ones)."""

    task: str
    split: str
    scores: dict
    arrays: dict = field(repr=False)
    n: int
    eval_s: float
    gold: str
    info: dict = field(default_factory=dict)

    def metric(self, name: str) -> float:
        return float(METRICS[self.task][name][1](self.arrays, np.ones((1, self.n)))[0])


@dataclass
class SuiteResult:
    """task name -> TaskResult, with a label (e.g. the variant) and the seed."""

    results: dict
    label: str = ""
    seed: int | None = None

    def __getitem__(self, task: str) -> TaskResult:
        return self.results[task]

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def as_dict(self) -> dict:
        return {k: {"split": r.split, "n": r.n, "eval_s": r.eval_s, **r.scores} for k, r in self.results.items()}


def _gold_fingerprint(task: Task, split: str) -> str:
    data = task.split(split)
    return hashlib.sha256(repr(data).encode()).hexdigest()[:16]


class EvalSuite:
    """Tasks (Task instances or names from accelops.eval.tasks.TASKS) and a tokenizer for
    each (given as {task name: Tokenizer}, or trained on the task's training split with
    vocab_size on first use).

    run(model_or_factory): a model (used for every task: it must have each task's head), a
    {task name: model} dict, or a callable factory(task, tokenizer) -> model (trained by
    it). Every model is checked against its task and tokenizer before any is evaluated:
    TaskMismatch (a model without the task's head, or another number of labels) or
    TokenizerMismatch (another vocabulary), naming the task and both sides."""

    def __init__(
        self,
        tasks,
        *,
        tokenizers: dict | None = None,
        vocab_size: int = 2000,
        root=None,
        split: str = "test",
        batch_size: int = 64,
    ):
        if isinstance(tasks, (str, Task)):
            tasks = [tasks]
        self.tasks: dict[str, Task] = {}
        for t in tasks:
            if isinstance(t, str):
                if t not in TASKS:
                    raise ValueError(f"unknown task {t!r}; known tasks: {sorted(TASKS)}")
                t = TASKS[t](root)
            elif not isinstance(t, Task):
                raise TypeError(f"tasks must be Task instances or task names, got {type(t).__name__}")
            if t.name in self.tasks:
                raise ValueError(f"task {t.name!r} is given twice")
            self.tasks[t.name] = t
        if not self.tasks:
            raise ValueError("EvalSuite needs at least one task")
        unknown = set(tokenizers or {}) - set(self.tasks)
        if unknown:
            raise ValueError(f"tokenizers given for task(s) {sorted(unknown)} not in the suite {list(self.tasks)}")
        self.tokenizers = dict(tokenizers or {})
        self.vocab_size, self.split, self.batch_size = vocab_size, split, batch_size

    def tokenizer(self, name: str):
        if name not in self.tokenizers:
            self.tokenizers[name] = self.tasks[name].train_tokenizer(self.vocab_size)
        return self.tokenizers[name]

    def models(self, model_or_factory) -> dict:
        """{task name: model} for run(), checked (see the class)."""
        if isinstance(model_or_factory, torch.nn.Module):
            models = {name: model_or_factory for name in self.tasks}
        elif isinstance(model_or_factory, dict):
            missing = [n for n in self.tasks if n not in model_or_factory]
            extra = [n for n in model_or_factory if n not in self.tasks]
            if missing or extra:
                raise ValueError(
                    f"models given for tasks {sorted(model_or_factory)}; the suite's tasks are {list(self.tasks)}"
                    + (f" (missing {missing})" if missing else "")
                    + (f" (not in the suite: {extra})" if extra else "")
                )
            models = dict(model_or_factory)
        elif callable(model_or_factory):
            models = {name: model_or_factory(task, self.tokenizer(name)) for name, task in self.tasks.items()}
        else:
            raise TypeError(
                "run() takes a model (nn.Module), a {task name: model} dict or a factory(task, tokenizer) -> model, "
                f"got {type(model_or_factory).__name__}"
            )
        for name, model in models.items():
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"the model for task {name!r} must be an nn.Module, got {type(model).__name__}")
            self.tasks[name].check_model(model, self.tokenizer(name))
        return models

    def run(
        self, model_or_factory, *, label: str = "", seed: int | None = None, split: str | None = None
    ) -> SuiteResult:
        split = split or self.split
        models = self.models(model_or_factory)
        out = {}
        for name, model in models.items():
            task = self.tasks[name]
            task.split(split)  # an unknown split names the task
            start = time.perf_counter()
            scores, arrays = _per_example(task, model, self.tokenizer(name), split, self.batch_size)
            n = len(next(iter(arrays.values())))
            out[name] = TaskResult(
                name, split, scores, arrays, n, time.perf_counter() - start, _gold_fingerprint(task, split)
            )
        return SuiteResult(out, label=label, seed=seed)


# --------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    """rows: one dict a (task, metric) -- baseline and candidate (the mean over seeds),
    their spread over seeds, delta (points, or a ratio for perplexity), se_examples (paired
    bootstrap), se_seeds (the per-seed differences; None with one seed), se, ci95."""

    rows: list
    baseline: str
    candidate: str
    n_boot: int

    def row(self, task: str, metric: str | None = None) -> dict:
        metric = metric or PRIMARY[task]
        for r in self.rows:
            if r["task"] == task and r["metric"] == metric:
                return r
        raise KeyError(f"no comparison row for task {task!r}, metric {metric!r}")

    def markdown(self) -> str:
        head = ["task", "metric", self.baseline or "baseline", self.candidate or "candidate", "delta", "se", "95% CI"]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in self.rows:
            pct = r["kind"] == "fraction"

            def v(x, sd):
                s = f"{100 * x:.2f}" if pct else f"{x:.3f}"
                return s + (f" ± {100 * sd if pct else sd:.2f}" if sd is not None else "")

            f = ".2f" if pct else ".3f"  # points, or a ratio near 1
            delta = f"{r['delta']:+.2f} pt" if pct else f"{r['delta']:.3f}x"
            lines.append(
                f"| {r['task']} | {r['metric']} | {v(r['baseline'], r['baseline_std'])} | "
                f"{v(r['candidate'], r['candidate_std'])} | {delta} | {r['se']:{f}} | "
                f"[{r['ci95'][0]:{f}}, {r['ci95'][1]:{f}}] |"
            )
        return "\n".join(lines)


def _as_list(x, name):
    if isinstance(x, SuiteResult):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(r, SuiteResult) for r in x):
        return list(x)
    raise TypeError(f"{name} must be a SuiteResult or a non-empty list of them (one a seed), got {type(x).__name__}")


def compare(baseline, candidate, *, metrics: dict | None = None, n_boot: int = 1000, seed: int = 0) -> Comparison:
    """Per task and metric: the candidate against the baseline (see the module docstring for
    the uncertainty). baseline / candidate: a SuiteResult or a list of them, one a seed,
    paired by position. metrics: {task: [metric names]} (default: every metric the task
    has). Only the tasks both ran are compared; they must have run on the same examples."""
    base, cand = _as_list(baseline, "baseline"), _as_list(candidate, "candidate")
    if len(base) != len(cand):
        raise ValueError(f"baseline has {len(base)} seed result(s), candidate {len(cand)}: they pair seed by seed")
    tasks = [t for t in base[0] if all(t in r for r in base + cand)]
    if not tasks:
        raise ValueError(f"no task in common: baseline ran {list(base[0])}, candidate {list(cand[0])}")
    rng = np.random.default_rng(seed)
    rows = []
    for t in tasks:
        results = [r[t] for r in base + cand]
        ref = results[0]
        for r in results[1:]:
            if (r.split, r.n, r.gold) != (ref.split, ref.n, ref.gold):
                raise ValueError(
                    f"task {t!r}: results of different examples cannot be compared ({ref.split} split, {ref.n} "
                    f"examples vs {r.split} split, {r.n} examples)"
                )
        names = (metrics or {}).get(t) or list(METRICS[t])
        W = rng.multinomial(ref.n, np.full(ref.n, 1.0 / ref.n), size=n_boot).astype(float)
        ones = np.ones((1, ref.n))
        for name in names:
            if name not in METRICS[t]:
                raise ValueError(f"task {t!r} has no metric {name!r}; it has {list(METRICS[t])}")
            kind, fn = METRICS[t][name]
            b = np.array([fn(r[t].arrays, ones)[0] for r in base])
            c = np.array([fn(r[t].arrays, ones)[0] for r in cand])
            boot_b = np.mean([fn(r[t].arrays, W) for r in base], axis=0)
            boot_c = np.mean([fn(r[t].arrays, W) for r in cand], axis=0)
            if kind == "fraction":
                per_seed, boot = 100 * (c - b), 100 * (boot_c - boot_b)
                delta = float(100 * (c.mean() - b.mean()))
            else:
                per_seed, boot = c / b, _ratio(boot_c, boot_b)
                delta = float(c.mean() / b.mean())
            se_ex = float(np.std(boot, ddof=1)) if n_boot > 1 else 0.0
            se_seeds = float(np.std(per_seed, ddof=1) / math.sqrt(len(base))) if len(base) > 1 else None
            se = math.sqrt(se_ex**2 + (se_seeds or 0.0) ** 2)
            rows.append(
                {
                    "task": t,
                    "metric": name,
                    "kind": kind,
                    "unit": "points" if kind == "fraction" else "ratio",
                    "baseline": float(b.mean()),
                    "candidate": float(c.mean()),
                    "baseline_std": float(b.std(ddof=1)) if len(b) > 1 else None,
                    "candidate_std": float(c.std(ddof=1)) if len(c) > 1 else None,
                    "baseline_seeds": b.tolist(),
                    "candidate_seeds": c.tolist(),
                    "delta": delta,
                    "delta_seeds": per_seed.tolist(),
                    "se_examples": se_ex,
                    "se_seeds": se_seeds,
                    "se": se,
                    "ci95": [delta - 1.96 * se, delta + 1.96 * se],
                    "n": ref.n,
                    "seeds": len(base),
                    "split": ref.split,
                }
            )
    return Comparison(rows, base[0].label, cand[0].label, n_boot)


__all__ += ["TaskMismatch"]
