"""Issue 27's lemmatisation task: the character vocabulary (unknown characters), the metric
on hand-worked cases, the task's pairs, encoding and scores (with an oracle and a copying
model), the suite's per-sentence statistics, the experiment's encoder-decoder variant, bad
input, and a tiny end-to-end run on the real UD English EWT (slow)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from accelops.eval import data as D
from accelops.eval import metrics as M
from accelops.eval.chars import UNK_CHAR, CharVocab
from accelops.eval.experiment import Experiment, target_of
from accelops.eval.suite import EvalSuite, compare
from accelops.eval.tasks import IGNORE_INDEX, Lemma, TaskMismatch, fit
from accelops.eval.tokenize import TokenizerMismatch
from accelops.models import TransformerSeq2Seq

pytestmark = pytest.mark.one_thread

# (form, lemma, upos) sentences
TRAIN = [
    [("The", "the", "DET"), ("cats", "cat", "NOUN"), ("were", "be", "AUX"), ("sitting", "sit", "VERB")],
    [("The", "the", "DET"), ("dogs", "dog", "NOUN"), ("barked", "bark", "VERB"), (".", ".", "PUNCT")],
]
TEST = [
    [("Dogs", "dog", "NOUN"), ("were", "be", "AUX"), ("barking", "bark", "VERB")],
    [("The", "the", "DET"), ("cats", "cat", "NOUN"), ("Ω", "Ω", "SYM")],
]


def conllu(sentences):
    out = []
    for sent in sentences:
        out += [f"{i}\t{f}\t{lem}\t{u}\t_\t_\t{0 if i == 1 else 1}\tdep\t_\t_" for i, (f, lem, u) in enumerate(sent, 1)]
        out.append("")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("lemmadata")
    (r / "ud_english_ewt").mkdir()
    for split, sents in (("train", TRAIN), ("dev", TEST), ("test", TEST)):
        (r / "ud_english_ewt" / f"en_ewt-ud-{split}.conllu").write_text(conllu(sents), encoding="utf-8")
    return r


# --------------------------------------------------------------------------- vocabulary and metric


def test_char_vocab_unknown_characters():
    v = CharVocab.build(["cab", "ba"])
    assert v.vocab_size == 4 + 3 and v.chars == ["a", "b", "c"]
    assert v.encode("abc") == [4, 5, 6]
    assert v.encode("aΩ") == [4, v.unk_id]  # outside the vocabulary: UNK
    assert v.decode([v.bos_id, 4, v.unk_id, 6, v.eos_id, v.pad_id]) == "a" + UNK_CHAR + "c"
    assert CharVocab.build(["ba", "cab"]).fingerprint == v.fingerprint  # order of the data does not matter
    with pytest.raises(ValueError, match="outside the vocabulary"):
        v.decode([99])
    with pytest.raises(ValueError, match="no character"):
        CharVocab.build([""])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        CharVocab.build(["a", 3])


def test_edit_distance_hand_worked():
    assert M.edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert M.edit_distance("", "abc") == 3 and M.edit_distance("abc", "") == 3
    assert M.edit_distance("flaw", "lawn") == 2
    assert M.edit_distance("same", "same") == 0
    assert M.edit_distance("ab", "ba") == 2  # no transpositions in Levenshtein


def test_lemma_scores_hand_worked():
    s = M.lemma_scores(["be", "cat", "run", "The"], ["be", "cats", "runn", "the"])
    assert s["accuracy"] == 0.25  # exact match: case counts
    assert s["mean_edit_distance"] == (0 + 1 + 1 + 1) / 4
    assert s["n"] == 4
    with pytest.raises(ValueError, match="gold has 2 items but pred has 1"):
        M.lemma_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        M.lemma_scores([], [])
    with pytest.raises(TypeError, match=r"pred\[0\] must be a str"):
        M.lemma_scores(["a"], [None])


# --------------------------------------------------------------------------- the task


class Table(nn.Module):
    """A stand-in seq2seq model whose greedy_decode answers from a {form: lemma} table (the
    form itself when absent), looked up by the form's ids (a form with a character outside
    the vocabulary is read as the model reads it: with UNK)."""

    head_kind = "seq2seq"

    def __init__(self, vocab, table):
        super().__init__()
        self.vocab = vocab
        self.table = {tuple(vocab.encode(f)): lem for f, lem in table.items()}
        self.config = SimpleNamespace(vocab_size=vocab.vocab_size, max_len=8)
        self.anchor = nn.Parameter(torch.zeros(1))

    def greedy_decode(self, src, mask, max_new_tokens):
        out = []
        for row, m in zip(src, mask):
            ids = tuple(row[m].tolist())
            out.append(self.vocab.encode(self.table[ids]) if ids in self.table else list(ids))
        return out


def test_lemma_task_pairs_and_encoding(root):
    task = Lemma(root, train_on="pairs")
    assert task.tokens("test") == [(f, lem) for s in TEST for f, lem, _ in s]
    assert task.pairs("train")[:2] == [("The", "the"), ("cats", "cat")]
    assert len(task.pairs("train")) == 7  # ("The", "the") once
    vocab = task.train_tokenizer()
    assert isinstance(vocab, CharVocab) and vocab.info == {"task": "lemma", "split": "train"}
    ds = task.encode("train", vocab, max_len=7)  # "sitting" (7) fits; no lemma is longer than 6
    src, mask, dec_in, targets = ds.tensors
    assert len(ds) == 7 and task.train_skipped == 0
    i = 1  # cats -> cat
    assert vocab.decode(src[i][mask[i]].tolist()) == "cats"
    assert dec_in[i, 0] == vocab.bos_id and vocab.decode(dec_in[i].tolist()) == "cat"
    assert targets[i, :4].tolist() == vocab.encode("cat") + [vocab.eos_id]
    assert (targets[i, 4:] == IGNORE_INDEX).all()
    task.encode("train", vocab, max_len=6)  # "sitting" is too long: left out, counted
    assert task.train_skipped == 1
    # train_on="tokens" (the default): every token, ("The", "the") twice
    assert Lemma(root).train_on == "tokens"
    assert len(Lemma(root).encode("train", vocab, max_len=7)) == 8
    with pytest.raises(ValueError, match="train_on must be one of"):
        Lemma(root, train_on="types")


def test_lemma_scores_with_oracle_and_copy(root):
    task = Lemma(root)
    vocab = task.train_tokenizer()
    gold = {f: lem for s in TEST for f, lem, _ in s}
    perfect = task.evaluate(Table(vocab, gold), vocab, "test")
    # "Ω" is not in the training characters: the oracle's decoded answer is UNK -> wrong,
    # as a real model could not produce it either
    assert perfect["accuracy"] == pytest.approx(5 / 6)
    assert perfect["tokens"] == 6 and perfect["forms_cut"] == 0
    # copy baseline: "were"->"be" no, "Dogs"->"dog" no, "running" no, "The" no, "cats" no, "Ω" yes
    assert perfect["copy_accuracy"] == pytest.approx(1 / 6)
    copy = task.evaluate(Table(vocab, {}), vocab, "test")
    assert copy["accuracy"] == pytest.approx(0.0)  # Ω decodes as UNK here too
    # unseen forms (not in train): Dogs, barking, Ω; the oracle gets Dogs and barking
    assert perfect["unseen_tokens"] == 3 and perfect["unseen_accuracy"] == pytest.approx(2 / 3)
    # the copy's mean edit distance (Ω is copied as UNK)
    expected = sum(M.edit_distance(gold[f], f if f != "Ω" else UNK_CHAR) for f in gold) / 6
    assert copy["mean_edit_distance"] == pytest.approx(expected)
    # a form longer than max_len is copied, not decoded, and counted
    scores = task.evaluate(Table(vocab, gold), vocab, "test", max_len=5)
    assert scores["forms_cut"] == 1 and scores["accuracy"] == pytest.approx(4 / 6)  # barking -> barking


def test_suite_and_compare_on_lemma(root):
    task = Lemma(root)
    vocab = task.train_tokenizer()
    gold = {f: lem for s in TEST for f, lem, _ in s}
    suite = EvalSuite([task], tokenizers={"lemma": vocab})
    good = suite.run(Table(vocab, gold), label="oracle")
    bad = suite.run(Table(vocab, {}), label="copy")
    assert good["lemma"].metric("accuracy") == pytest.approx(5 / 6)
    assert good["lemma"].n == 2  # sentences: the bootstrap resamples sentences
    assert good["lemma"].scores["accuracy"] == pytest.approx(5 / 6)
    row = compare(good, bad, n_boot=50).row("lemma")
    assert row["delta"] == pytest.approx(-100 * 5 / 6)


def test_model_and_vocab_mismatch(root):
    task = Lemma(root)
    vocab = task.train_tokenizer()
    clf = SimpleNamespace(head_kind="sequence", config=SimpleNamespace(vocab_size=vocab.vocab_size))
    with pytest.raises(TaskMismatch, match="needs a model with a 'seq2seq' head"):
        task.check_model(clf, vocab)
    model = task.build_model(CharVocab.build(["xyz"]), dim=16, n_layers=1, n_heads=2, max_len=8)
    with pytest.raises(TokenizerMismatch, match="vocabulary"):
        task.evaluate(model, vocab, "test")


def test_malformed_and_missing_files(tmp_path):
    (tmp_path / "ud_english_ewt").mkdir()
    good = conllu(TRAIN)
    bad = good.replace("2\tcats\tcat\tNOUN", "2\tcats\tcat\tNOUNISH", 1)
    for split in ("train", "dev", "test"):
        (tmp_path / "ud_english_ewt" / f"en_ewt-ud-{split}.conllu").write_text(bad if split == "dev" else good)
    with pytest.raises(D.DataFormatError, match=r"en_ewt-ud-dev.conllu:2: .*NOUNISH"):
        Lemma(tmp_path)
    (tmp_path / "ud_english_ewt" / "en_ewt-ud-dev.conllu").unlink()
    with pytest.raises(FileNotFoundError, match="en_ewt-ud-dev.conllu"):
        Lemma(tmp_path)


def test_experiment_variants_check_the_task():
    Experiment(tasks=["lemma"], variants=["fp32", "bitlinear", "encoder-decoder"])
    with pytest.raises(ValueError, match="needs a 'seq2seq' task"):
        Experiment(tasks=["banking77"], variants=["fp32", "encoder-decoder"])
    with pytest.raises(ValueError, match="does not apply to task 'lemma'"):
        Experiment(tasks=["lemma"], variants=["fp32", "alternate"])
    assert target_of("bitlinear", "lemma") is None  # the issue sets no lemmatisation target


def test_tiny_training_run(root):
    """fit() trains the encoder-decoder on the task's pairs (a few steps, synthetic data)."""
    task = Lemma(root)
    vocab = task.train_tokenizer()
    torch.manual_seed(0)
    model = task.build_model(vocab, dim=16, n_layers=1, n_heads=2, max_len=10, sharing="encoder-decoder")
    assert isinstance(model, TransformerSeq2Seq)
    summary = fit(task, model, vocab, steps=3, batch_size=4, lr=1e-2)
    assert summary["step"] == 3 and all(math.isfinite(h["loss"]) for h in summary["history"])
    scores = task.evaluate(model, vocab, "dev")
    assert 0.0 <= scores["accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(not (D.data_root() / "ud_english_ewt").exists(), reason="evaluation data not found")
def test_lemma_real_data_end_to_end():
    task = Lemma()
    tokens = task.tokens("test")
    assert len(tokens) == 25094 and len(task.pairs("train")) == 20725
    vocab = task.train_tokenizer()
    torch.manual_seed(0)
    model = task.build_model(vocab, dim=16, n_layers=1, n_heads=2, max_len=24)
    fit(task, model, vocab, steps=5, batch_size=32, lr=3e-3)
    s = task.evaluate(model, vocab, "dev")
    assert s["tokens"] == 25147 and 0.7 < s["copy_accuracy"] < 0.8
