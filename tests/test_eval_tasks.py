"""accelops.eval.tasks: the tasks' encodings and prediction paths (checked with oracle
models that output the gold answers: the metrics must then be perfect), the errors for a
model that cannot do the task, and a tiny end-to-end run on the real BANKING77."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("tokenizers")

from accelops.eval import data as D  # noqa: E402
from accelops.eval.tasks import IGNORE_INDEX, Banking77, Squad, TaskMismatch, UDPos, WikiText2, Wnut17, fit  # noqa: E402
from accelops.eval.tokenize import TokenizerMismatch  # noqa: E402
from accelops.models import (  # noqa: E402
    EncoderForQuestionAnswering,
    EncoderForTokenClassification,
    TransformerLM,
    TransformerLMConfig,
)

pytestmark = pytest.mark.one_thread


class Oracle(nn.Module):
    """A stand-in model that answers every input row with the logits it was given for it."""

    def __init__(self, head_kind, vocab_size, max_len, table, num_labels=None):
        super().__init__()
        self.head_kind, self.num_labels, self.table = head_kind, num_labels, table
        self.config = SimpleNamespace(vocab_size=vocab_size, max_len=max_len)
        self.anchor = nn.Parameter(torch.zeros(1))  # the tasks read the device from a parameter

    def forward(self, tokens, attention_mask=None):
        return torch.stack([self.table[tuple(r.tolist())] for r in tokens])


# --------------------------------------------------------------------------- synthetic data


def conllu(sentences):
    out = []
    for words, tags in sentences:
        out += [
            f"{i}\t{w}\t{w}\t{t}\t_\t_\t{0 if i == 1 else 1}\tdep\t_\t_" for i, (w, t) in enumerate(zip(words, tags), 1)
        ] + [""]
    return "\n".join(out) + "\n"


POS = [
    (["The", "cat", "sat", "."], ["DET", "NOUN", "VERB", "PUNCT"]),
    (["Dogs", "bark", "loudly", "!"], ["NOUN", "VERB", "ADV", "PUNCT"]),
    (["I", "saw", "Paris", "yesterday"], ["PRON", "VERB", "PROPN", "NOUN"]),
]
NER = [
    (["Empire", "State", "Building", "is", "tall"], ["B-location", "I-location", "I-location", "O", "O"]),
    (["I", "love", "Apple", "phones"], ["O", "O", "B-corporation", "O"]),
    (["watch", "Star", "Wars", "with", "Ann"], ["O", "B-creative-work", "I-creative-work", "O", "B-person"]),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic_data(tmp_path_factory.mktemp("evaldata"))


def write_synthetic_data(r):
    """Tiny files of every task but BANKING77 under the folder r (also test_eval_suite's)."""
    (r / "ud_english_ewt").mkdir()
    for split in ("train", "dev", "test"):
        (r / "ud_english_ewt" / f"en_ewt-ud-{split}.conllu").write_text(conllu(POS))
    (r / "wnut17").mkdir()
    for name in Wnut17.FILES.values():
        (r / "wnut17" / name).write_text("\n\t\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*s)) for s in NER) + "\n")
    paragraphs = [
        {
            "context": "The Broncos beat the Panthers in Santa Clara, California in February 2016.",
            "qas": [
                {"id": "q1", "question": "Who beat the Panthers?", "answers": [{"text": "Broncos", "answer_start": 4}]},
                {
                    "id": "q2",
                    "question": "Where was the game?",
                    "answers": [{"text": "Santa Clara, California", "answer_start": 33}],
                },
            ],
        },
        {
            "context": " ".join(["filler words here"] * 20) + " and the answer is Denver Broncos today.",
            "qas": [
                {
                    "id": "q3",
                    "question": "Which team?",
                    "answers": [{"text": "Denver Broncos", "answer_start": 20 * 18 - 1 + 19}],
                }
            ],
        },
    ] + [  # paragraphs XQuAD does not use: the training pool
        {
            "context": f"Von Miller{i} was the most valuable player.",
            "qas": [
                {
                    "id": f"q{4 + i}",
                    "question": "Who was MVP?",
                    "answers": [{"text": f"Von Miller{i}", "answer_start": 0}],
                }
            ],
        }
        for i in range(3)
    ]
    (r / "squad_v1.1").mkdir()
    (r / "squad_v1.1" / "dev-v1.1.json").write_text(
        json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": paragraphs}]})
    )
    (r / "xquad_en").mkdir()
    (r / "xquad_en" / "xquad.en.json").write_text(
        json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": paragraphs[:2]}]})
    )
    (r / "wikitext-2").mkdir()
    text = " \n = Title = \n \n the cat sat on the mat . \n a dog <unk> barked . \n \n"
    (r / "wikitext-2" / "valid.txt").write_text(text * 5)
    (r / "wikitext-2" / "test.txt").write_text(text)
    return r


def test_squad_fixture_offsets_are_right(root):
    # the long paragraph's answer offset is computed above: the loader checks it
    assert D.load_squad(root / "squad_v1.1" / "dev-v1.1.json").questions[2].answers[0].text == "Denver Broncos"


# --------------------------------------------------------------------------- tagging


@pytest.mark.parametrize("cls", [UDPos, Wnut17])
def test_tagging_labels_sit_on_first_pieces(cls, root):
    task = cls(root)
    tok = task.train_tokenizer(300)
    ds = task.encode("dev", tok, 32)
    index = {t: i for i, t in enumerate(task.labels)}
    for (words, tags), (tokens, mask, labels) in zip(task._sentences("dev"), ds):
        ids, word_ids = tok.encode_words(words)
        assert tokens[0] == tok.bos_id and tokens[len(ids) + 1] == tok.eos_id and mask.sum() == len(ids) + 2
        firsts = [labels[p + 1].item() for p, w in enumerate(word_ids) if w not in word_ids[:p]]
        assert firsts == [index[t] for t in tags]
        assert (labels != IGNORE_INDEX).sum() == len(words)  # one label a word, on its first piece


def _tagging_oracle(task, tok, split, max_len):
    ds = task.encode(split, tok, max_len)
    table = {}
    for tokens, _, labels in ds:
        logits = torch.zeros(len(tokens), task.num_labels())
        logits[torch.arange(len(tokens)), labels.clamp(min=0)] = 10.0
        table[tuple(tokens.tolist())] = logits
    return Oracle("token", tok.vocab_size, max_len, table, task.num_labels())


def test_tagging_oracle_scores_perfectly(root):
    task = UDPos(root)
    tok = task.train_tokenizer(300)
    r = task.evaluate(_tagging_oracle(task, tok, "test", 32), tok, "test")
    assert r == {"token_accuracy": 1.0, "sequence_accuracy": 1.0, "words_cut": 0}
    task = Wnut17(root)
    tok = task.train_tokenizer(300)
    r = task.evaluate(_tagging_oracle(task, tok, "test", 32), tok, "test")
    assert (r["f1"], r["num_gold"], r["token_accuracy"], r["words_cut"]) == (1.0, 4, 1.0, 0)


def test_tagging_cut_words_are_counted(root):
    task = Wnut17(root)
    tok = task.train_tokenizer(300)
    r = task.evaluate(_tagging_oracle(task, tok, "test", 5), tok, "test", max_len=5)
    assert r["words_cut"] > 0 and r["token_accuracy"] < 1.0


# --------------------------------------------------------------------------- QA


def test_squad_splits_keep_xquad_out_of_training(root):
    task = Squad(root, dev_fraction=0.1)
    train, dev = {q.id for q in task.train.questions}, {q.id for q in task.split("dev").questions}
    assert len(dev) == 1 and len(train) == 2 and train | dev == {"q4", "q5", "q6"}
    assert {q.id for q in task.split("test").questions} == {"q1", "q2", "q3"}
    assert "XQuAD" in task.notes


def _qa_oracle(task, tok, split, max_len):
    ds = task.encode(split, tok, max_len)
    table = {}
    for tokens, mask, (s, e) in ds:
        logits = torch.zeros(len(tokens), 2)
        logits[s, 0] = logits[e, 1] = 10.0
        table[tuple(tokens.tolist())] = logits
    return Oracle("span", tok.vocab_size, max_len, table)


@pytest.mark.parametrize("max_len", [40, 128])  # 40: the long context is read in several windows
def test_squad_oracle_recovers_the_answers(root, max_len):
    task = Squad(root)
    tok = task.train_tokenizer(300)
    rows, spans, windows, _ = task._windows("test", tok, max_len)
    assert all(len(r) <= max_len for r in rows)
    if max_len == 40:
        assert sum(w.question == 2 for w in windows) > 2
    model = _qa_oracle(task, tok, "test", max_len)
    pred = task.predict(model, tok, "test")
    assert pred == {"q1": "Broncos", "q2": "Santa Clara, California", "q3": "Denver Broncos"}
    s = task.evaluate(model, tok, "test")
    assert (s.exact_match, s.f1, s.n) == (1.0, 1.0, 3)


# --------------------------------------------------------------------------- language modelling


def test_wikitext_windows_predict_every_token_once(root):
    task = WikiText2(root)
    # 6 lines: " ", " = Title = ", " ", " the cat sat on the mat . ", " a dog <unk> barked . ", " "
    # words: 0 + 3 + 0 + 7 + 5 + 0 and an <eos> a line; characters: the lines' words joined by
    # single spaces (9, 24 and 20 characters) and a newline a line
    assert "valid.txt" in task.notes and task.counts("test") == {"words": 15 + 6, "chars": 9 + 24 + 20 + 6}
    tok = task.train_tokenizer(300)
    stream = task.stream("test", tok)
    ds = task.encode("test", tok, 8)
    targets = [t for _, y in ds for t in y.tolist() if t != IGNORE_INDEX]
    assert targets == stream[1:] and stream[0] == tok.eos_id
    assert stream.count(tok.eos_id) == 1 + 6  # the leading one and one a line
    assert tok.backend.token_to_id("<unk>") in stream  # WikiText's marker is one piece


def test_wikitext_uniform_model_scores_by_hand(root):
    task = WikiText2(root)
    tok = task.train_tokenizer(300)
    model = TransformerLM(TransformerLMConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, max_len=8))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0: every token has probability 1 / V
    s = task.evaluate(model, tok, "test")
    v = tok.vocab_size
    n = len(task.stream("test", tok)) - 1
    bits = math.log2(v)
    assert s.tokens == n and s.perplexity == pytest.approx(v, rel=1e-5)
    assert s.bits_per_token == pytest.approx(bits, rel=1e-5)
    assert s.word_perplexity == pytest.approx(v ** (n / 21), rel=1e-5)  # the same NLL over 21 words
    assert s.bits_per_char == pytest.approx(n * bits / 59, rel=1e-5)


# --------------------------------------------------------------------------- errors


def test_wrong_head_labels_or_vocabulary(root):
    task = UDPos(root)
    tok = task.train_tokenizer(300)
    cfg = dict(dim=16, n_layers=1, n_heads=2, max_len=32)
    with pytest.raises(
        TaskMismatch,
        match="task 'ud_pos' needs a model with a 'token' head, got model EncoderForQuestionAnswering with head 'span'",
    ):
        task.evaluate(EncoderForQuestionAnswering(TransformerLMConfig(vocab_size=tok.vocab_size, **cfg)), tok, "dev")
    with pytest.raises(TaskMismatch, match="task 'ud_pos' has 17 labels, model has num_labels=5"):
        task.evaluate(EncoderForTokenClassification(TransformerLMConfig(vocab_size=tok.vocab_size, **cfg), 5), tok)
    other = EncoderForTokenClassification(TransformerLMConfig(vocab_size=tok.vocab_size + 1, **cfg), 17)
    with pytest.raises(
        TokenizerMismatch, match=f"vocabulary of {tok.vocab_size} tokens but model has vocab_size={tok.vocab_size + 1}"
    ):
        task.evaluate(other, tok)
    with pytest.raises(TaskMismatch, match="task 'wikitext2' needs a language model"):
        WikiText2(root).evaluate(task.build_model(tok, **cfg), tok)
    with pytest.raises(ValueError, match="task 'ud_pos' has no split 'valid'"):
        task.split("valid")
    with pytest.raises(FileNotFoundError, match="banking77/categories.json: no such file"):
        Banking77(root)


# --------------------------------------------------------------------------- end to end


@pytest.mark.skipif(not (D.data_root() / "banking77").exists(), reason="evaluation data not found")
def test_banking77_end_to_end(tmp_path):
    """A tiny encoder, a few training steps on BANKING77's training split, accuracy and
    macro F1 on dev and test."""
    task = Banking77()
    assert (len(task.train), len(task.split("dev")), len(task.split("test"))) == (9003, 1000, 3080)
    assert not set(task.train.line_numbers) & set(task.split("dev").line_numbers)
    tok = task.train_tokenizer(500)
    assert tok.info == {**tok.info, "task": "banking77", "split": "train"}
    tok.save(tmp_path / "tok")
    torch.manual_seed(0)
    model = task.build_model(tok, dim=32, n_layers=1, n_heads=2, max_len=48)
    before = task.evaluate(model, tok, "dev")
    w0 = model.classifier.weight.detach().clone()
    summary = fit(task, model, tok, steps=8, batch_size=32, lr=1e-2)
    assert summary["step"] == 8 and len(summary["history"]) == 8
    assert all(math.isfinite(h["loss"]) for h in summary["history"])
    assert not torch.equal(model.classifier.weight, w0)  # the steps trained the model the task evaluates
    dev, test = task.evaluate(model, tok, "dev"), task.evaluate(model, tok, "test")
    assert dev.n == 1000 and test.n == 3080 and len(test.per_label) == 77
    for s in (before, dev, test):
        assert 0.0 <= s.accuracy <= 1.0 and 0.0 <= s.macro_f1 <= 1.0
