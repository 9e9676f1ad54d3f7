"""The evaluation tasks' standard metrics, computed the way their reference tools compute them.

- language modelling: perplexity, bits per token, bits per character (`lm_scores`);
- sentence classification: accuracy and macro-averaged precision / recall / F1
  (`classification_scores`, as scikit-learn's precision_recall_fscore_support(average="macro"));
- POS tagging: token accuracy and sequence (whole-sentence) accuracy;
- NER: entity-level micro precision / recall / F1 over BIO spans (`entity_scores`), as
  seqeval's default mode (the conlleval rules) counts them;
- lemmatisation: exact-match lemma accuracy over the tokens and the mean character edit
  (Levenshtein) distance of the predictions (`lemma_scores`), as the CoNLL 2018 shared
  task's LEMMA accuracy counts every word;
- extractive QA: exact match and F1 with the answer normalisation of SQuAD v1.1's official
  evaluation script (`squad_scores`).

Every score is a fraction in [0, 1] (multiply by 100 for the percentages papers and the
SQuAD script print). Mismatched inputs (lengths, unknown labels, malformed tags) raise
ValueError naming the argument and the position rather than being scored.
"""

from __future__ import annotations

import math
import numbers
import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "perplexity",
    "bits_per_unit",
    "LMScores",
    "lm_scores",
    "PRF",
    "ClassificationScores",
    "classification_scores",
    "token_accuracy",
    "sequence_accuracy",
    "bio_entities",
    "EntityScores",
    "entity_scores",
    "edit_distance",
    "lemma_scores",
    "normalize_answer",
    "squad_exact_match",
    "squad_f1",
    "SquadScores",
    "squad_scores",
]


# --------------------------------------------------------------------------- language modelling


def _check_nll(nll_sum, count, unit: str) -> None:
    if (
        isinstance(nll_sum, bool)
        or not isinstance(nll_sum, numbers.Real)
        or not (math.isfinite(nll_sum) and nll_sum >= 0)
    ):
        raise ValueError(f"nll_sum must be a finite sum of negative log-likelihoods >= 0 (nats), got {nll_sum!r}")
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"the number of {unit} must be a positive int, got {count!r}")


def perplexity(nll_sum: float, count: int) -> float:
    """exp(nll_sum / count): nll_sum the summed negative log-likelihood in nats (natural log,
    as F.cross_entropy gives it) over `count` predicted units."""
    _check_nll(nll_sum, count, "units")
    return math.exp(nll_sum / count)


def bits_per_unit(nll_sum: float, count: int) -> float:
    """nll_sum / (count * ln 2): the code length in bits per token, per word or per character,
    whatever `count` counts."""
    _check_nll(nll_sum, count, "units")
    return nll_sum / (count * math.log(2))


@dataclass
class LMScores:
    """A language model's scores on a text: nll the summed negative log-likelihood (nats) of
    its `tokens` predicted tokens. words / chars: the same text's word and character counts,
    when known: a subword model's perplexity is only comparable with a word-level model's
    when normalised per word (the total NLL is the same text's, whatever the tokenizer)."""

    nll: float
    tokens: int
    words: int | None = None
    chars: int | None = None

    @property
    def loss(self) -> float:
        """Mean cross-entropy per token (nats)."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        """Per token."""
        return perplexity(self.nll, self.tokens)

    @property
    def bits_per_token(self) -> float:
        return bits_per_unit(self.nll, self.tokens)

    @property
    def word_perplexity(self) -> float | None:
        return None if self.words is None else perplexity(self.nll, self.words)

    @property
    def bits_per_char(self) -> float | None:
        return None if self.chars is None else bits_per_unit(self.nll, self.chars)

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "word_perplexity": self.word_perplexity,
            "bits_per_char": self.bits_per_char,
            "tokens": self.tokens,
            "words": self.words,
            "chars": self.chars,
        }


def lm_scores(
    nll_sum: float, num_tokens: int, *, num_words: int | None = None, num_chars: int | None = None
) -> LMScores:
    _check_nll(nll_sum, num_tokens, "tokens")
    if num_words is not None:
        _check_nll(nll_sum, num_words, "words")
    if num_chars is not None:
        _check_nll(nll_sum, num_chars, "characters")
    return LMScores(
        float(nll_sum),
        int(num_tokens),
        None if num_words is None else int(num_words),
        None if num_chars is None else int(num_chars),
    )


# --------------------------------------------------------------------------- classification


@dataclass
class PRF:
    precision: float
    recall: float
    f1: float
    support: int  # gold examples (or gold entities) of the label


def _prf(tp: int, n_pred: int, n_gold: int) -> PRF:
    # 0 where a ratio is undefined (no predictions, no gold): scikit-learn's zero_division=0
    # and seqeval's convention; F1 = 2PR / (P + R), 0 when P + R = 0.
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return PRF(p, r, f, n_gold)


def _check_pair(gold, pred, gold_name: str = "gold", pred_name: str = "pred") -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{gold_name} has {len(gold)} items but {pred_name} has {len(pred)}")
    if not gold:
        raise ValueError(f"{gold_name} and {pred_name} are empty: nothing to score")


@dataclass
class ClassificationScores:
    """accuracy; macro_* the unweighted means over the labels of the per-label precision,
    recall and F1 (macro F1 is the mean of the per-label F1s, not the F1 of the macro P and
    R, as scikit-learn computes it); per_label: each label's PRF."""

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_label: dict = field(default_factory=dict)
    n: int = 0

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "n": self.n,
        }


def classification_scores(gold, pred, labels=None) -> ClassificationScores:
    """Accuracy and macro precision / recall / F1 of predicted labels against gold ones.

    labels: the labels to average over; by default those that occur in gold or pred (as
    scikit-learn does). Given explicitly (e.g. a task's whole label set), a label that
    neither gold nor pred holds scores 0 and still counts in the mean, and a gold or
    predicted label outside `labels` is an error."""
    gold, pred = list(gold), list(pred)
    _check_pair(gold, pred)
    if labels is None:
        labels = sorted(set(gold) | set(pred), key=str)
    else:
        labels = list(labels)
        known = set(labels)
        if len(known) != len(labels):
            raise ValueError("labels lists a label twice")
        for name, seq in (("gold", gold), ("pred", pred)):
            for i, y in enumerate(seq):
                if y not in known:
                    raise ValueError(f"{name}[{i}] = {y!r} is not one of the {len(labels)} labels")
    tp, n_pred, n_gold = Counter(), Counter(pred), Counter(gold)
    for g, p in zip(gold, pred):
        if g == p:
            tp[g] += 1
    per = {y: _prf(tp[y], n_pred[y], n_gold[y]) for y in labels}
    k = len(labels)
    return ClassificationScores(
        accuracy=sum(tp.values()) / len(gold),
        macro_precision=sum(s.precision for s in per.values()) / k,
        macro_recall=sum(s.recall for s in per.values()) / k,
        macro_f1=sum(s.f1 for s in per.values()) / k,
        per_label=per,
        n=len(gold),
    )


# --------------------------------------------------------------------------- tagging


def _check_sequences(gold, pred) -> None:
    _check_pair(gold, pred)
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: gold has {len(g)} tags but pred has {len(p)}")


def token_accuracy(gold, pred) -> float:
    """Correct tags over all tags; gold and pred are lists of per-sentence tag lists."""
    _check_sequences(gold, pred)
    total = sum(len(g) for g in gold)
    if not total:
        raise ValueError("no tokens to score")
    return sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p)) / total


def sequence_accuracy(gold, pred) -> float:
    """Sentences whose every tag is right, over all sentences."""
    _check_sequences(gold, pred)
    return sum(list(g) == list(p) for g, p in zip(gold, pred)) / len(gold)


# --------------------------------------------------------------------------- lemmatisation


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and
    substitutions turning a into b."""
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError(f"edit_distance compares two strings, got {type(a).__name__} and {type(b).__name__}")
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def lemma_scores(gold, pred) -> dict:
    """Lemmatisation over a flat list of tokens: `accuracy` (predicted lemma == gold lemma,
    exactly: case and characters) and `mean_edit_distance` (characters), with `n` tokens."""
    _check_pair(gold, pred)
    for name, seq in (("gold", gold), ("pred", pred)):
        for i, x in enumerate(seq):
            if not isinstance(x, str):
                raise TypeError(f"{name}[{i}] must be a str (a lemma), got {type(x).__name__}")
    n = len(gold)
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / n,
        "mean_edit_distance": sum(edit_distance(g, p) for g, p in zip(gold, pred)) / n,
        "n": n,
    }


# --------------------------------------------------------------------------- entities

_BIO_TAG = re.compile(r"O|[BI]-.+")


def bio_entities(tags) -> list[tuple[str, int, int]]:
    """The entities of one sentence's BIO tags as (type, first, last) token indices, last
    inclusive, by the conlleval rules that seqeval's default mode implements: an entity starts
    at B-x, and also at an I-x that follows O, another type or the sentence start (IOB1 style:
    an I- without its B- still starts an entity); it continues over I-x of the same type and
    ends before anything else (O, B-, I- of another type, the sentence end)."""
    entities = []
    start = etype = None
    for i, tag in enumerate(list(tags) + ["O"]):
        if not isinstance(tag, str) or not _BIO_TAG.fullmatch(tag):
            raise ValueError(f"tag {i} = {tag!r} is not O, B-<type> or I-<type>")
        kind, typ = ("O", None) if tag == "O" else (tag[0], tag[2:])
        if start is not None and (kind != "I" or typ != etype):
            entities.append((etype, start, i - 1))
            start = None
        if kind == "B" or (kind == "I" and start is None):
            start, etype = i, typ
    return entities


@dataclass
class EntityScores:
    """Micro-averaged entity precision / recall / F1 (seqeval's default average): an entity
    counts as correct when its type, first and last token all match a gold entity. per_type:
    each type's PRF (over the types in gold or pred); macro_f1 their mean."""

    precision: float
    recall: float
    f1: float
    num_gold: int
    num_pred: int
    num_correct: int
    per_type: dict = field(default_factory=dict)

    @property
    def macro_f1(self) -> float:
        return sum(s.f1 for s in self.per_type.values()) / len(self.per_type) if self.per_type else 0.0

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "num_gold": self.num_gold,
            "num_pred": self.num_pred,
            "num_correct": self.num_correct,
        }


def entity_scores(gold, pred) -> EntityScores:
    """Entity-level scores of predicted BIO tag sequences (one list of tags a sentence)
    against gold ones. Entities never cross sentences (seqeval joins sentences with an O)."""
    _check_sequences(gold, pred)
    gold_set, pred_set = set(), set()
    for name, seqs, out in (("gold", gold, gold_set), ("pred", pred, pred_set)):
        for s, tags in enumerate(seqs):
            try:
                out.update((s, *e) for e in bio_entities(tags))
            except ValueError as exc:
                raise ValueError(f"{name} sentence {s}: {exc}") from None
    correct = gold_set & pred_set
    total = _prf(len(correct), len(pred_set), len(gold_set))
    types = sorted({e[1] for e in gold_set | pred_set})
    per_type = {
        t: _prf(sum(e[1] == t for e in correct), sum(e[1] == t for e in pred_set), sum(e[1] == t for e in gold_set))
        for t in types
    }
    return EntityScores(total.precision, total.recall, total.f1, len(gold_set), len(pred_set), len(correct), per_type)


# --------------------------------------------------------------------------- SQuAD

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's official normalisation (evaluate-v1.1.py), in its order: lower-case,
    drop ASCII punctuation (string.punctuation), replace the words a / an / the by a space,
    collapse whitespace runs to one space and strip."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:  # also when either side normalises to nothing (v1.1 scores that 0)
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _answers(gold) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    gold = list(gold)
    if not gold:
        raise ValueError("a question needs at least one gold answer")
    return gold


def squad_exact_match(prediction: str, gold) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer (gold: a str or
    a list of them), else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in _answers(gold)))


def squad_f1(prediction: str, gold) -> float:
    """Token-overlap F1 of the normalised prediction, the maximum over the gold answers."""
    return max(_f1(prediction, g) for g in _answers(gold))


@dataclass
class SquadScores:
    exact_match: float
    f1: float
    n: int
    missing: int  # gold questions without a prediction (scored 0, as the official script does)

    def as_dict(self) -> dict:
        return {"exact_match": self.exact_match, "f1": self.f1, "n": self.n, "missing": self.missing}


def squad_scores(predictions: dict, gold: dict) -> SquadScores:
    """Mean exact match and F1 over the gold questions ({id: [answer texts]}, e.g.
    SquadData.gold_answers()) of predictions ({id: answer text}). As the official script: a
    question without a prediction scores 0 (with a warning). Unlike it, a prediction for an
    id that is not a gold question is an error (it means the predictions are of another
    split or file)."""
    if not gold:
        raise ValueError("gold holds no questions")
    extra = set(predictions) - set(gold)
    if extra:
        raise ValueError(f"{len(extra)} prediction(s) for ids that are not gold questions (e.g. {sorted(extra)[0]!r})")
    em = f1 = 0.0
    missing = 0
    for qid, answers in gold.items():
        if qid not in predictions:
            missing += 1
            continue
        pred = predictions[qid]
        if not isinstance(pred, str):
            raise ValueError(f"prediction for {qid!r} must be a str, got {type(pred).__name__}")
        em += squad_exact_match(pred, answers)
        f1 += squad_f1(pred, answers)
    if missing:
        warnings.warn(f"{missing} of {len(gold)} questions have no prediction and score 0", stacklevel=2)
    return SquadScores(em / len(gold), f1 / len(gold), len(gold), missing)
