"""Evaluation tasks: each ties a data set's splits, a tokenizer trained on its training
split, the model head it needs, the encoding into tensors and its standard metrics.

    task = Banking77()                       # loads and checks the files
    tok = task.train_tokenizer(2000)         # on task.train only
    model = task.build_model(tok, dim=128, n_layers=2, n_heads=4, max_len=64)
    fit(task, model, tok, steps=500)         # accelops.train.Trainer on the training split
    task.evaluate(model, tok, "dev")         # choose settings on dev ...
    task.evaluate(model, tok, "test")        # ... report on test

Splits (train on train, choose on dev, report on test), with what this data forces:

- Banking77: train.csv / test.csv; no dev split is published, so dev is a seeded 10% of
  train (removed from train).
- UDPos (UD English EWT, 17 UPOS): train / dev / test as released.
- Wnut17 (NER, 6 types, BIO): train / dev / test as released.
- Squad: no SQuAD train split here. Train on the SQuAD v1.1 dev paragraphs XQuAD does not
  use (dev: a seeded 10% of those paragraphs), report on XQuAD English's 240 paragraphs.
- WikiText2: no train split here. Train on valid.txt (dev: its last 10% of lines), report
  on test.txt.
- Lemma (UD English EWT, word form -> lemma, characters): train / dev / test as released;
  trained and scored on every token.

Every task's `notes` says so, for the report that quotes its numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data as D
from . import metrics as M
from .tokenize import Tokenizer, check_vocab

__all__ = [
    "Task",
    "Banking77",
    "UDPos",
    "Wnut17",
    "Squad",
    "WikiText2",
    "Lemma",
    "TASKS",
    "EncodedDataset",
    "fit",
    "TaskMismatch",
]

IGNORE_INDEX = -100


class TaskMismatch(ValueError):
    """A model that cannot do the task: the wrong head, or a head of the wrong size."""


class EncodedDataset(torch.utils.data.Dataset):
    """A map-style dataset of equal-length tensors, one tuple a sample (what
    accelops.train.Trainer and default_collate take): (tokens, attention_mask, labels) for
    the encoder tasks, (tokens, targets) for language modelling."""

    def __init__(self, *tensors: torch.Tensor):
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("every tensor needs one row a sample")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)


def _pad(rows: list[list[int]], pad_id: int):
    """Right-pad id lists to the longest -> (tokens [n, t], attention_mask [n, t])."""
    t = max(len(r) for r in rows)
    # one tensor from nested lists: a tensor a row is ~10x slower for thousands of rows
    tokens = torch.tensor([r + [pad_id] * (t - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[True] * len(r) + [False] * (t - len(r)) for r in rows], dtype=torch.bool)
    return tokens, mask


def _holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of range(n) -> (kept, held out), each in the original order; both
    non-empty."""
    if not 0 < fraction < 1:
        raise ValueError(f"dev_fraction must lie in (0, 1), got {fraction!r}")
    if n < 2:
        raise ValueError(f"cannot hold a dev split out of {n} example(s)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(order[:k])
    return [i for i in range(n) if i not in held], sorted(held)


class Task:
    """Base: name, head (the model head it needs: "sequence", "token", "span", "lm" or
    "seq2seq"),
    splits (dict of split name -> examples), notes (how the splits were made)."""

    name: str = ""
    head: str = ""
    notes: str = ""
    splits: dict

    def __init__(self):
        self.splits = {}

    def split(self, name: str):
        if name not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    @property
    def train(self):
        return self.split("train")

    def training_texts(self) -> list[str]:
        raise NotImplementedError

    def train_tokenizer(self, vocab_size: int, **kw) -> Tokenizer:
        """A byte-level BPE trained on this task's training split only."""
        info = {"task": self.name, "split": "train"}
        return Tokenizer.train(self.training_texts(), vocab_size, info=info, **kw)

    def num_labels(self) -> int | None:
        return None

    def check_model(self, model, tokenizer: Tokenizer) -> None:
        """TaskMismatch unless `model` has this task's head (of the right size);
        TokenizerMismatch unless it was built for the tokenizer's vocabulary."""
        kind = getattr(model, "head_kind", None)
        if self.head == "lm":
            from ..models import LanguageModel

            if not isinstance(model, LanguageModel):
                raise TaskMismatch(
                    f"task {self.name!r} needs a language model (TransformerLM, RNNLM), got model "
                    f"{type(model).__name__}"
                )
        elif kind != self.head:
            raise TaskMismatch(
                f"task {self.name!r} needs a model with a {self.head!r} head, got model "
                f"{type(model).__name__} with head {kind!r}"
            )
        n = self.num_labels()
        if n is not None and getattr(model, "num_labels", None) != n:
            raise TaskMismatch(f"task {self.name!r} has {n} labels, model has num_labels={model.num_labels}")
        check_vocab(tokenizer, model)

    def build_model(self, tokenizer: Tokenizer, **config):
        """A freshly initialised model for this task: TransformerLMConfig(vocab_size=the
        tokenizer's, **config) with this task's head."""
        from ..models import (
            EncoderForQuestionAnswering,
            EncoderForSequenceClassification,
            EncoderForTokenClassification,
            TransformerLM,
            TransformerLMConfig,
        )

        cfg = TransformerLMConfig(vocab_size=tokenizer.vocab_size, **config)
        if self.head == "sequence":
            return EncoderForSequenceClassification(cfg, self.num_labels())
        if self.head == "token":
            return EncoderForTokenClassification(cfg, self.num_labels())
        if self.head == "span":
            return EncoderForQuestionAnswering(cfg)
        return TransformerLM(cfg)

    def encode(self, split: str, tokenizer: Tokenizer, max_len: int) -> EncodedDataset:
        raise NotImplementedError

    def evaluate(self, model, tokenizer: Tokenizer, split: str = "test", *, batch_size: int = 64):
        raise NotImplementedError

    @staticmethod
    @torch.no_grad()
    def _outputs(model, dataset: EncodedDataset, batch_size: int, n_inputs: int = 2):
        """The model's outputs on the dataset's first n_inputs tensors, batch by batch (eval
        mode, restored after), on the model's device, gathered on the CPU."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = []
        try:
            for i in range(0, len(dataset), batch_size):
                inputs = [t[i : i + batch_size].to(device) for t in dataset.tensors[:n_inputs]]
                out.append(model(*inputs).float().cpu())
        finally:
            model.train(was_training)
        return out


# --------------------------------------------------------------------------- classification


class Banking77(Task):
    """BANKING77 intent classification (77 labels): accuracy and macro P/R/F1."""

    name, head = "banking77", "sequence"
    notes = "BANKING77 publishes no dev split: dev is a seeded 10% of train.csv, removed from train."

    def __init__(self, root=None, *, dev_fraction: float = 0.1, seed: int = 0):
        super().__init__()
        self.labels = D.load_label_set(D.data_path("banking77", "categories.json", root=root))
        full = D.load_classification(D.data_path("banking77", "train.csv", root=root), labels=self.labels)
        test = D.load_classification(D.data_path("banking77", "test.csv", root=root), labels=self.labels)
        kept, held = _holdout(len(full), dev_fraction, seed)

        def pick(idx):
            return D.ClassificationData(
                full.path,
                [full.texts[i] for i in idx],
                [full.labels[i] for i in idx],
                self.labels,
                [full.line_numbers[i] for i in idx],
            )

        self.splits = {"train": pick(kept), "dev": pick(held), "test": test}

    def training_texts(self) -> list[str]:
        return self.train.texts

    def num_labels(self) -> int:
        return len(self.labels)

    def encode(self, split, tokenizer, max_len):
        """[BOS] text [EOS], cut to max_len tokens; labels the label ids."""
        d = self.split(split)
        rows = [[tokenizer.bos_id] + ids[: max_len - 2] + [tokenizer.eos_id] for ids in tokenizer.encode_batch(d.texts)]
        tokens, mask = _pad(rows, tokenizer.pad_id)
        return EncodedDataset(tokens, mask, torch.tensor(d.label_ids(), dtype=torch.long))

    def evaluate(self, model, tokenizer, split="test", *, batch_size=64, max_len=None):
        self.check_model(model, tokenizer)
        ds = self.encode(split, tokenizer, max_len or model.config.max_len)
        logits = torch.cat(self._outputs(model, ds, batch_size))
        pred = [self.labels[i] for i in logits.argmax(-1).tolist()]
        return M.classification_scores(self.split(split).labels, pred, labels=self.labels)


# --------------------------------------------------------------------------- tagging


class _Tagging(Task):
    """Word-level tagging with a subword encoder: [BOS] pieces [EOS]; each word's label sits
    on its first piece (the others get -100), and the word's prediction is read there.
    Words past max_len (a long sentence cut) get `fallback` and are counted."""

    head = "token"
    fallback = "O"

    def __init__(self):
        super().__init__()
        self.labels: list[str] = []

    def num_labels(self) -> int:
        return len(self.labels)

    def _sentences(self, split):
        """[(words, tags)] of the split."""
        raise NotImplementedError

    def training_texts(self) -> list[str]:
        # joined with spaces: encode_words reads each word as if a space preceded it
        return [" ".join(words) for words, _ in self._sentences("train")]

    def _encode(self, split, tokenizer, max_len):
        index = {t: i for i, t in enumerate(self.labels)}
        rows, labels, firsts = [], [], []
        for words, tags in self._sentences(split):
            ids, word_ids = tokenizer.encode_words(words)
            ids, word_ids = ids[: max_len - 2], word_ids[: max_len - 2]
            lab = [IGNORE_INDEX] * (len(ids) + 2)
            first = {}
            for pos, w in enumerate(word_ids):
                if w not in first:
                    first[w] = pos + 1  # +1: after BOS
                    lab[pos + 1] = index[tags[w]]
            rows.append([tokenizer.bos_id] + ids + [tokenizer.eos_id])
            labels.append(lab)
            firsts.append(first)
        tokens, mask = _pad(rows, tokenizer.pad_id)
        lab, _ = _pad(labels, IGNORE_INDEX)
        return EncodedDataset(tokens, mask, lab), firsts

    def encode(self, split, tokenizer, max_len):
        return self._encode(split, tokenizer, max_len)[0]

    def predict(self, model, tokenizer, split="test", *, batch_size=64, max_len=None):
        """-> (gold tag lists, predicted tag lists, number of words cut off by max_len)."""
        self.check_model(model, tokenizer)
        ds, firsts = self._encode(split, tokenizer, max_len or model.config.max_len)
        # _pad gave every row the same width, so the batches concatenate
        preds = torch.cat([o.argmax(-1) for o in self._outputs(model, ds, batch_size)])
        gold, pred, cut = [], [], 0
        for (words, tags), first, row in zip(self._sentences(split), firsts, preds):
            p = []
            for w in range(len(words)):
                if w in first:
                    p.append(self.labels[int(row[first[w]])])
                else:
                    p.append(self.fallback)
                    cut += 1
            gold.append(list(tags))
            pred.append(p)
        return gold, pred, cut


class UDPos(_Tagging):
    """UD English EWT part-of-speech tagging (17 UPOS tags): token and sentence accuracy."""

    name = "ud_pos"
    notes = "UD English EWT r2.16: train / dev / test as released; UPOS over syntactic words."
    fallback = "NOUN"  # for words cut off by max_len: the most frequent tag

    def __init__(self, root=None):
        super().__init__()
        self.labels = list(D.UPOS_TAGS)
        self.splits = {
            s: D.load_conllu(D.data_path("ud_english_ewt", f"en_ewt-ud-{s}.conllu", root=root))
            for s in ("train", "dev", "test")
        }

    def _sentences(self, split):
        return [(s.words, s.upos) for s in self.split(split)]

    def evaluate(self, model, tokenizer, split="test", *, batch_size=64, max_len=None):
        gold, pred, cut = self.predict(model, tokenizer, split, batch_size=batch_size, max_len=max_len)
        return {
            "token_accuracy": M.token_accuracy(gold, pred),
            "sequence_accuracy": M.sequence_accuracy(gold, pred),
            "words_cut": cut,
        }


class Wnut17(_Tagging):
    """WNUT-17 emerging entities (6 types, BIO): entity-level micro P/R/F1 (seqeval's way)."""

    name = "wnut17"
    notes = "WNUT-17: train / dev / test as released (the test split of the HF wnut_17 loader)."
    TYPES = ("corporation", "creative-work", "group", "location", "person", "product")
    FILES = {"train": "wnut17train.conll", "dev": "emerging.dev.conll", "test": "emerging.test.annotated"}

    def __init__(self, root=None):
        super().__init__()
        self.labels = ["O"] + [f"{p}-{t}" for t in self.TYPES for p in "BI"]
        self.splits = {
            s: D.load_conll_bio(D.data_path("wnut17", f, root=root), entity_types=list(self.TYPES))
            for s, f in self.FILES.items()
        }

    def _sentences(self, split):
        return [(s.tokens, s.tags) for s in self.split(split)]

    def evaluate(self, model, tokenizer, split="test", *, batch_size=64, max_len=None):
        gold, pred, cut = self.predict(model, tokenizer, split, batch_size=batch_size, max_len=max_len)
        scores = M.entity_scores(gold, pred)
        return {**scores.as_dict(), "token_accuracy": M.token_accuracy(gold, pred), "words_cut": cut}


# --------------------------------------------------------------------------- extractive QA


@dataclass
class _Window:
    """One model input of a question: [BOS] question [EOS] context pieces [EOS]."""

    question: int  # index into the split's question list
    offset: int  # sequence position of the window's first context piece
    pieces: list[int]  # indices into the context's pieces


class Squad(Task):
    """Extractive QA, SQuAD v1.1 format: exact match and F1 (the official normalisation).

    Contexts longer than a model input are read in overlapping windows (stride half a
    window); the answer is the best span (start logit + end logit, end >= start, at most
    max_answer_pieces pieces) over a question's windows, cut from the context by the
    pieces' character spans. A training window that does not hold the (first) gold answer
    points at position 0 (BOS), as BERT's SQuAD recipe does."""

    name, head = "squad", "span"
    notes = (
        "No SQuAD train split here: train on the SQuAD v1.1 dev paragraphs that XQuAD does not use (dev: a "
        "seeded 10% of those paragraphs), report on XQuAD English (240 paragraphs, 1,190 questions)."
    )

    def __init__(self, root=None, *, dev_fraction: float = 0.1, seed: int = 0, max_answer_pieces: int = 30):
        super().__init__()
        squad = D.load_squad(D.data_path("squad_v1.1", "dev-v1.1.json", root=root))
        xquad = D.load_squad(D.data_path("xquad_en", "xquad.en.json", root=root))
        pool = D.split_squad_by_xquad(squad, xquad)
        kept, held = _holdout(len(pool.paragraphs), dev_fraction, seed)
        self.splits = {
            "train": D.SquadData(pool.path, pool.version, [pool.paragraphs[i] for i in kept]),
            "dev": D.SquadData(pool.path, pool.version, [pool.paragraphs[i] for i in held]),
            "test": xquad,
        }
        self.max_answer_pieces = max_answer_pieces

    def training_texts(self) -> list[str]:
        out = []
        for p in self.train.paragraphs:
            out.append(p.context)
            out.extend(q.question for q in p.questions)
        return out

    @staticmethod
    def _answer_pieces(offsets, start: int, end: int):
        """First and last piece overlapping the characters [start, end), or None."""
        hit = [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]
        return (hit[0], hit[-1]) if hit else None

    def _windows(self, split, tokenizer, max_len):
        """-> (rows of ids, (start, end) labels, a _Window per row, (context, piece spans) per question)."""
        rows, spans, windows, contexts = [], [], [], []
        max_question = max_len // 4  # leave most of the input to the context
        for para in self.split(split).paragraphs:
            c_ids, c_off = tokenizer.encode_offsets(para.context)
            for q in para.questions:
                qi = len(contexts)
                contexts.append((para.context, c_off))
                q_ids = tokenizer.encode(q.question)[:max_question]
                width = max_len - len(q_ids) - 3
                if width < 1:
                    raise ValueError(f"max_len={max_len} leaves no room for the context of question {q.id}")
                stride = max(1, width // 2)
                gold = self._answer_pieces(c_off, q.answers[0].start, q.answers[0].end)
                offset = len(q_ids) + 2
                start = 0
                while True:
                    pieces = list(range(start, min(start + width, len(c_ids))))
                    rows.append(
                        [tokenizer.bos_id]
                        + q_ids
                        + [tokenizer.eos_id]
                        + [c_ids[i] for i in pieces]
                        + [tokenizer.eos_id]
                    )
                    if gold is not None and pieces and pieces[0] <= gold[0] and gold[1] <= pieces[-1]:
                        spans.append((offset + gold[0] - pieces[0], offset + gold[1] - pieces[0]))
                    else:
                        spans.append((0, 0))
                    windows.append(_Window(qi, offset, pieces))
                    if start + width >= len(c_ids):
                        break
                    start += stride
        return rows, spans, windows, contexts

    def encode(self, split, tokenizer, max_len):
        rows, spans, _, _ = self._windows(split, tokenizer, max_len)
        tokens, mask = _pad(rows, tokenizer.pad_id)
        return EncodedDataset(tokens, mask, torch.tensor(spans, dtype=torch.long))

    def predict(self, model, tokenizer, split="test", *, batch_size=64, max_len=None) -> dict[str, str]:
        """{question id: predicted answer text}."""
        self.check_model(model, tokenizer)
        max_len = max_len or model.config.max_len
        rows, _, windows, contexts = self._windows(split, tokenizer, max_len)
        tokens, mask = _pad(rows, tokenizer.pad_id)
        logits = [row for o in self._outputs(model, EncodedDataset(tokens, mask), batch_size) for row in o]
        best: dict[int, tuple[float, str]] = {}
        for w, lg in zip(windows, logits):
            context, c_off = contexts[w.question]
            n = len(w.pieces)
            if n == 0:
                continue
            s = lg[w.offset : w.offset + n, 0]
            e = lg[w.offset : w.offset + n, 1]
            # score[i, j] = s[i] + e[j] for i <= j < i + max_answer_pieces
            score = s[:, None] + e[None, :]
            allowed = torch.ones(n, n, dtype=torch.bool).triu() & ~torch.ones(n, n, dtype=torch.bool).triu(
                self.max_answer_pieces
            )
            score = score.masked_fill(~allowed, float("-inf"))
            flat = int(score.argmax())
            i, j = divmod(flat, n)
            value = float(score[i, j])
            a, b = c_off[w.pieces[i]][0], c_off[w.pieces[j]][1]
            if w.question not in best or value > best[w.question][0]:
                best[w.question] = (value, context[a:b])
        ids = [q.id for p in self.split(split).paragraphs for q in p.questions]
        return {qid: best[qi][1] if qi in best else "" for qi, qid in enumerate(ids)}

    def evaluate(self, model, tokenizer, split="test", *, batch_size=64, max_len=None):
        pred = self.predict(model, tokenizer, split, batch_size=batch_size, max_len=max_len)
        return M.squad_scores(pred, self.split(split).gold_answers())


# --------------------------------------------------------------------------- language modelling


class WikiText2(Task):
    """Word-level WikiText-2 modelled with subwords: each line is its words joined by single
    spaces, then EOS (the tokenizer's end token standing for WikiText's <eos>). Scores: the
    summed NLL of every token of the split (a leading EOS is the first context, so the first
    word is predicted too) per subword token, per word (WikiText's word count, <eos>
    included: comparable with word-level perplexities) and per character of those lines
    (one newline a line)."""

    name, head = "wikitext2", "lm"
    notes = "No WikiText-2 train split here: train on valid.txt (dev: its last 10% of lines), report on test.txt."

    def __init__(self, root=None, *, dev_fraction: float = 0.1):
        super().__init__()
        valid = D.load_lm_text(D.data_path("wikitext-2", "valid.txt", root=root))
        test = D.load_lm_text(D.data_path("wikitext-2", "test.txt", root=root))
        cut = len(valid.lines) - max(1, round(len(valid.lines) * dev_fraction))
        self.splits = {"train": valid.lines[:cut], "dev": valid.lines[cut:], "test": test.lines}

    def training_texts(self) -> list[str]:
        return [" ".join(line.split()) for line in self.train if line.strip()]

    def train_tokenizer(self, vocab_size: int, **kw) -> Tokenizer:
        kw.setdefault("added_tokens", ["<unk>"])  # WikiText's unknown-word marker stays one piece
        return super().train_tokenizer(vocab_size, **kw)

    def stream(self, split, tokenizer) -> list[int]:
        ids = [tokenizer.eos_id]
        lines = [" ".join(line.split()) for line in self.split(split)]
        for enc in tokenizer.encode_batch(lines):
            ids.extend(enc)
            ids.append(tokenizer.eos_id)
        return ids

    def counts(self, split) -> dict:
        lines = self.split(split)
        return {
            "words": sum(len(line.split()) + 1 for line in lines),
            "chars": sum(len(" ".join(line.split())) + 1 for line in lines),
        }

    def encode(self, split, tokenizer, max_len):
        """Windows of max_len inputs and their next tokens, overlapping by one token so every
        token after the leading EOS is a target exactly once (the last window is padded with
        targets -100)."""
        ids = self.stream(split, tokenizer)
        xs, ys = [], []
        for i in range(0, len(ids) - 1, max_len):
            x, y = ids[i : i + max_len], ids[i + 1 : i + max_len + 1]
            xs.append(x + [tokenizer.pad_id] * (max_len - len(x)))
            ys.append(y + [IGNORE_INDEX] * (max_len - len(y)))
        return EncodedDataset(torch.tensor(xs), torch.tensor(ys))

    @torch.no_grad()
    def evaluate(self, model, tokenizer, split="test", *, batch_size=16, max_len=None):
        self.check_model(model, tokenizer)
        ds = self.encode(split, tokenizer, max_len or model.config.max_len)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        nll, n = 0.0, 0
        try:
            for i in range(0, len(ds), batch_size):
                x, y = (t[i : i + batch_size].to(device) for t in ds.tensors)
                logits = model(x).float()
                nll += float(
                    F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
                    )
                )
                n += int((y != IGNORE_INDEX).sum())
        finally:
            model.train(was_training)
        c = self.counts(split)
        return M.lm_scores(nll, n, num_words=c["words"], num_chars=c["chars"])


# --------------------------------------------------------------------------- lemmatisation


class Lemma(Task):
    """UD English EWT lemmatisation, character level and context-free: each word form
    (FORM) -> its lemma (LEMMA), by an encoder-decoder (accelops.models.TransformerSeq2Seq,
    head "seq2seq") over a character vocabulary (CharVocab) built on the training split's
    forms and lemmas.

    Training (train_on="tokens", the default): every token of train, so the model sees the
    words as often as the test does (the usual treebank-trained lemmatiser's data); or
    train_on="pairs": the unique (form, lemma) pairs, each once, in first-seen order.
    Chosen on dev (fp32, dim 64, 2+2 blocks, 600 steps of 256, seed 0): tokens 91.88% dev
    accuracy, pairs 77.65% (the copy baseline 77.07%). Examples too long for the model
    (form > max_len or lemma > max_len - 1 characters) are left out (train_skipped).
    Scoring: token level, over every syntactic word of the split (as the CoNLL 2018 shared
    task scores LEMMA), so frequent words count as often as they occur; type_accuracy is
    over the split's unique (form, lemma) pairs, unseen_accuracy over the tokens whose form
    never occurs in train (what memorising cannot do). A form longer than the model's
    max_len is not decoded: its prediction is the form itself (copied; forms_cut counts
    them: URLs and e-mail addresses, whose lemma is the form). copy_accuracy is the
    copy-the-form baseline on the same tokens."""

    name, head = "lemma", "seq2seq"
    notes = (
        "UD English EWT r2.16 lemmatisation (form -> lemma, characters, no sentence context): train on every "
        "(form, lemma) token of train; dev / test scored token by token (every syntactic word)."
    )

    UNITS = ("pairs", "tokens")

    def __init__(self, root=None, *, train_on: str = "tokens"):
        super().__init__()
        if train_on not in self.UNITS:
            raise ValueError(f"train_on must be one of {self.UNITS}, got {train_on!r}")
        self.train_on = train_on
        self.splits = {
            s: D.load_conllu(D.data_path("ud_english_ewt", f"en_ewt-ud-{s}.conllu", root=root))
            for s in ("train", "dev", "test")
        }
        self.train_skipped = 0
        self._train_forms = {f for sent in self.splits["train"] for f in sent.words}

    def tokens(self, split) -> list[tuple[str, str]]:
        """(form, lemma) of every word of the split, in order."""
        return [(f, lemma) for sent in self.split(split) for f, lemma in zip(sent.words, sent.lemmas)]

    def pairs(self, split) -> list[tuple[str, str]]:
        """The split's unique (form, lemma) pairs, in first-seen order."""
        return list(dict.fromkeys(self.tokens(split)))

    def training_texts(self) -> list[str]:
        return [t for pair in self.pairs("train") for t in pair]

    def train_tokenizer(self, vocab_size=None, **kw):
        """The CharVocab of the training split's forms and lemmas (every character they
        hold; vocab_size is not used: a character vocabulary has no size to choose)."""
        from .chars import CharVocab

        return CharVocab.build(self.training_texts(), info={"task": self.name, "split": "train"})

    def build_model(self, tokenizer, *, sharing=None, **config):
        """A TransformerSeq2Seq(TransformerLMConfig(vocab_size=the vocabulary's, **config),
        sharing=sharing) starting and ending targets with the vocabulary's BOS / EOS."""
        from ..models import TransformerLMConfig, TransformerSeq2Seq

        cfg = TransformerLMConfig(vocab_size=tokenizer.vocab_size, **config)
        return TransformerSeq2Seq(cfg, sharing=sharing, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)

    def encode(self, split, tokenizer, max_len):
        """(source ids, source mask, decoder input [BOS] + lemma, targets lemma + [EOS] with
        -100 on padding) of the split's unique pairs (train_on="tokens": every token) that
        fit max_len."""
        src, tgt_in, tgt_out = [], [], []
        skipped = 0
        for form, lemma in self.pairs(split) if self.train_on == "pairs" else self.tokens(split):
            f, lem = tokenizer.encode(form), tokenizer.encode(lemma)
            if len(f) > max_len or len(lem) > max_len - 1 or not f:
                skipped += 1
                continue
            src.append(f)
            tgt_in.append([tokenizer.bos_id] + lem)
            tgt_out.append(lem + [tokenizer.eos_id])
        if not src:
            raise ValueError(f"task {self.name!r}: no pair of split {split!r} fits max_len={max_len}")
        if split == "train":
            self.train_skipped = skipped
        tokens, mask = _pad(src, tokenizer.pad_id)
        dec_in, _ = _pad(tgt_in, tokenizer.pad_id)
        targets, _ = _pad(tgt_out, IGNORE_INDEX)
        return EncodedDataset(tokens, mask, dec_in, targets)

    @torch.no_grad()
    def predict_forms(self, model, tokenizer, forms, *, batch_size=256, max_len=None) -> tuple[dict, int]:
        """-> ({form: predicted lemma}, number of forms too long to decode, copied instead).
        Forms are decoded once each, sorted by length (less padding)."""
        self.check_model(model, tokenizer)
        max_len = max_len or model.config.max_len
        forms = list(dict.fromkeys(forms))
        out, todo = {}, []
        for f in forms:
            ids = tokenizer.encode(f)
            if len(ids) > max_len or not ids:
                out[f] = f
            else:
                todo.append((len(ids), f, ids))
        cut = len(forms) - len(todo)
        todo.sort(key=lambda x: x[0])
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                tokens, mask = _pad([ids for _, _, ids in chunk], tokenizer.pad_id)
                rows = model.greedy_decode(tokens.to(device), mask.to(device), model.config.max_len)
                for (_, f, _), row in zip(chunk, rows):
                    out[f] = tokenizer.decode(row)
        finally:
            model.train(was_training)
        return out, cut

    def predict(self, model, tokenizer, split="test", *, batch_size=256, max_len=None):
        """-> (gold lemma lists a sentence, predicted lemma lists a sentence, forms cut)."""
        sents = self.split(split)
        pred, cut = self.predict_forms(
            model, tokenizer, [f for s in sents for f in s.words], batch_size=batch_size, max_len=max_len
        )
        return [list(s.lemmas) for s in sents], [[pred[f] for f in s.words] for s in sents], cut

    def scores(self, split, gold, pred, cut) -> dict:
        """The task's scores from predict()'s sentences."""
        forms = [f for s in self.split(split) for f in s.words]
        g = [x for sent in gold for x in sent]
        p = [x for sent in pred for x in sent]
        base = M.lemma_scores(g, p)
        types = {}
        for f, gl, pl in zip(forms, g, p):
            types[(f, gl)] = gl == pl
        unseen = [gl == pl for f, gl, pl in zip(forms, g, p) if f not in self._train_forms]
        return {
            "accuracy": base["accuracy"],
            "mean_edit_distance": base["mean_edit_distance"],
            "type_accuracy": sum(types.values()) / len(types),
            "unseen_accuracy": sum(unseen) / len(unseen) if unseen else 0.0,
            "unseen_tokens": len(unseen),
            "copy_accuracy": M.lemma_scores(g, forms)["accuracy"],
            "tokens": base["n"],
            "forms_cut": cut,
        }

    def evaluate(self, model, tokenizer, split="test", *, batch_size=256, max_len=None):
        gold, pred, cut = self.predict(model, tokenizer, split, batch_size=batch_size, max_len=max_len)
        return self.scores(split, gold, pred, cut)


TASKS = {t.name: t for t in (Banking77, UDPos, Wnut17, Squad, WikiText2, Lemma)}


# --------------------------------------------------------------------------- training


def fit(
    task: Task,
    model,
    tokenizer: Tokenizer,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    max_len: int | None = None,
    seed: int = 0,
    device=None,
    scheduler: dict | None = None,
    **trainer_kw,
) -> dict:
    """Train `model` on the task's training split with accelops.train.Trainer (AdamW) for
    `steps` optimizer steps; -> Trainer.fit()'s summary, with "history" (a dict a step:
    loss, lr, ...) added. scheduler: accelops train's [scheduler] table (name, warmup_steps,
    min_lr_ratio), e.g. {"name": "cosine", "warmup_steps": 50}; None: a constant lr. Model selection (choosing settings
    on dev) is the caller's: evaluate each candidate with task.evaluate(model, tok, "dev")."""
    from ..train import Trainer
    from ..train.config import build_scheduler

    task.check_model(model, tokenizer)
    data = task.encode("train", tokenizer, max_len or model.config.max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if scheduler:
        trainer_kw["scheduler"] = build_scheduler(opt, dict(scheduler), steps)
    trainer_kw.setdefault("progress", False)
    trainer_kw.setdefault("eval_every", None)
    trainer = Trainer(
        model,
        opt,
        data,
        max_steps=steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
        distributed=False,
        **trainer_kw,
    )
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    return {**summary, "history": trainer.history}
