"""accelops.eval.tokenize: a byte-level BPE tokenizer trained with the `tokenizers` library,
saved and loaded, and checked against a model's vocabulary."""

import json

import pytest

pytest.importorskip("tokenizers")

from accelops.eval import data as D  # noqa: E402
from accelops.eval.tokenize import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer, TokenizerMismatch, check_vocab  # noqa: E402

TEXTS = [
    "I am still waiting on my card?",
    "What can I do if my card still hasn't arrived after 2 weeks?",
    "My card was declined at the shop.",
    "Where is my new card? It has been a week.",
    "Can I top up with a cheque?",
    "The exchange rate was wrong on my card payment.",
] * 5


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, 400, info={"task": "unit"})


def test_train_vocabulary_and_specials(tok):
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 400  # the specials + 256 bytes, plus merges while pairs repeat
    assert tok.info["task"] == "unit" and tok.info["vocab_size_requested"] == 400
    assert Tokenizer.train(TEXTS, 400).fingerprint == tok.fingerprint  # training is deterministic


def test_encode_round_trips_any_text(tok):
    for text in ["my card", "Empire State 😂 café", "unseen wörds ßtill encode"]:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids).strip() == text  # byte-level: no unknown token
    # the specials are never read from text: "<s>" is its characters
    ids = tok.encode(f"a {BOS} b {EOS} {PAD}")
    assert not {0, 1, 2} & set(ids)
    assert tok.encode_batch(["my card", "card"]) == [tok.encode("my card"), tok.encode("card")]


def test_encode_offsets_and_words(tok):
    text = "Where is my card?"
    ids, offsets = tok.encode_offsets(text)
    assert len(ids) == len(offsets)
    # spans are the characters of each piece, without the space it carries
    assert "".join(text[a:b] for a, b in offsets) == text.replace(" ", "")
    words = ["Empire", "State", "😂"]
    ids, word_ids = tok.encode_words(words)
    assert len(ids) == len(word_ids) and sorted(set(word_ids)) == [0, 1, 2]
    assert word_ids == sorted(word_ids)
    assert tok.encode_words([]) == ([], [])


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "t")
    back = Tokenizer.load(tmp_path / "t")
    assert back.fingerprint == tok.fingerprint and back.vocab_size == tok.vocab_size
    assert back.encode("my card <s>") == tok.encode("my card <s>")  # encode_special_tokens survives the load
    assert back.info["task"] == "unit" and back.path == str(tmp_path / "t")


def test_load_refuses_missing_or_swapped_files(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json: no such file"):
        Tokenizer.load(tmp_path / "none")
    tok.save(tmp_path / "a")
    Tokenizer.train(TEXTS[:6], 300).save(tmp_path / "b")
    (tmp_path / "a" / "tokenizer.json").write_text((tmp_path / "b" / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="is not the tokenizer accelops_tokenizer.json describes"):
        Tokenizer.load(tmp_path / "a")
    meta = tmp_path / "b" / "accelops_tokenizer.json"
    meta.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99 is not 1"):
        Tokenizer.load(tmp_path / "b")


def test_train_refuses_bad_arguments():
    with pytest.raises(ValueError, match="at least 259"):
        Tokenizer.train(TEXTS, 100)
    with pytest.raises(ValueError, match="no text"):
        Tokenizer.train(["", " "], 300)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        Tokenizer.train(["a", 3], 300)


def test_added_tokens_stay_whole():
    tok = Tokenizer.train(["a <unk> b", "c <unk> d"] * 3, 300, added_tokens=["<unk>"])
    unk = tok.backend.token_to_id("<unk>")
    assert unk >= 3 and unk in tok.encode("x <unk> y")


def test_check_vocab_names_both(tok, tmp_path):
    from accelops.models import TransformerLM, TransformerLMConfig

    tok.save(tmp_path / "t")
    model = TransformerLM(TransformerLMConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, max_len=8))
    check_vocab(tok, model)
    check_vocab(tok, tok.vocab_size)
    other = TransformerLM(TransformerLMConfig(vocab_size=tok.vocab_size + 5, dim=16, n_layers=1, n_heads=2, max_len=8))
    with pytest.raises(
        TokenizerMismatch,
        match=rf"tokenizer \({tmp_path}/t\) has a vocabulary of {tok.vocab_size} "
        rf"tokens but model has vocab_size={tok.vocab_size + 5}",
    ):
        check_vocab(tok, other)
    with pytest.raises(TypeError, match="no config.vocab_size"):
        check_vocab(tok, object())


@pytest.mark.skipif(not (D.data_root() / "banking77").exists(), reason="evaluation data not found")
def test_train_on_a_real_training_split():
    train = D.load_classification(D.data_path("banking77", "train.csv"))
    tok = Tokenizer.train(train.texts, 2000, info={"task": "banking77", "split": "train"})
    assert tok.vocab_size == 2000
    ids = tok.encode("I am still waiting on my card?")
    assert len(ids) <= 9  # frequent words of the split are single pieces
