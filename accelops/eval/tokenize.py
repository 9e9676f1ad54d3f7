"""A byte-level BPE tokenizer trained on a task's training split with Hugging Face's
`tokenizers` library (nothing is downloaded), saved to and loaded from a directory.

Byte-level (GPT-2 / RoBERTa style): every string has an encoding, with no unknown token,
which matters for tweets (WNUT-17's emoji and misspellings); a space starts a word
(add_prefix_space), so a word reads the same at the start of a text as inside it, and the
encoding of a list of words (a tagging task's tokens) keeps which word each piece came from.

Three special tokens come first, at fixed ids: PAD (0), BOS (1, the classification /
start-of-sequence token) and EOS (2, the separator / end-of-sequence token). They are
never read from text: a text holding "<s>" encodes as its characters, so only this code
puts specials into a sequence.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path
from typing import Iterable

__all__ = ["Tokenizer", "PAD", "BOS", "EOS", "SPECIAL_TOKENS", "TokenizerMismatch", "check_vocab"]

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
TOKENIZER_FILE = "tokenizer.json"  # the tokenizers library's own format
META_FILE = "accelops_tokenizer.json"  # what it was trained on, and with which settings
META_FORMAT = 1


class TokenizerMismatch(ValueError):
    """A tokenizer used with a model built for another vocabulary."""


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - a dev requirement
        raise ImportError("accelops.eval.tokenize needs the `tokenizers` library: pip install tokenizers") from exc
    return tokenizers


class Tokenizer:
    """A trained byte-level BPE tokenizer (wraps a tokenizers.Tokenizer).

    Tokenizer.train(texts, vocab_size) learns one; save(dir) / Tokenizer.load(dir) store it.
    encode(text) -> ids; encode_offsets(text) -> (ids, character spans); encode_words(words)
    -> (ids, word index of each id). None of them adds special tokens.
    """

    def __init__(self, backend, info: dict | None = None, path: str | None = None):
        self.backend = backend
        # The library does not store this flag in tokenizer.json: set it on every load.
        self.backend.encode_special_tokens = True
        self.info = dict(info or {})
        self.path = path
        for i, tok in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(tok) != i:
                raise ValueError(
                    f"tokenizer{'' if path is None else ' ' + path}: special token {tok!r} must have "
                    f"id {i}, has {backend.token_to_id(tok)}"
                )

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        added_tokens: Iterable[str] = (),
        info: dict | None = None,
    ) -> "Tokenizer":
        """Learn merges on `texts` (a task's training split: never its dev or test text)
        until the vocabulary holds vocab_size tokens (the specials and the 256 byte symbols
        included) or no pair occurs min_frequency times; a small corpus can stop short, so
        read the result's vocab_size. added_tokens: strings kept whole wherever they occur
        (e.g. WikiText's "<unk>"). info: a record of what it was trained on, saved with it."""
        tk = _tokenizers()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise ValueError(f"vocab_size must be at least {floor} (the specials and the 256 bytes), got {vocab_size}")
        texts = list(texts)
        if not texts or not any(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("texts holds no text to train on")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        backend = tk.Tokenizer(tk.models.BPE())
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = tk.decoders.ByteLevel()
        # trim_offsets: a piece's span leaves out the space it carries, so spans are the
        # characters of the word (what SQuAD's answer offsets are compared with).
        backend.post_processor = tk.processors.ByteLevel(trim_offsets=True)
        trainer = tk.trainers.BpeTrainer(
            vocab_size=int(vocab_size),
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        added = list(added_tokens)
        for t in added:
            if not isinstance(t, str) or not t:
                raise ValueError(f"added_tokens must be non-empty strings, got {t!r}")
        if added:
            backend.add_tokens([tk.AddedToken(t, special=False, normalized=False) for t in added])
        meta = {
            "vocab_size_requested": int(vocab_size),
            "min_frequency": min_frequency,
            "added_tokens": added,
            "num_texts": len(texts),
        }
        meta.update(info or {})
        return cls(backend, meta)

    # ------------------------------------------------------------------ files

    def save(self, directory) -> Path:
        """Write tokenizer.json (the library's format) and accelops_tokenizer.json (format,
        vocab_size, fingerprint, info) into `directory` (created if needed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / TOKENIZER_FILE).write_text(self.backend.to_str(), encoding="utf-8")
        meta = {
            "format": META_FORMAT,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
            "info": self.info,
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self.path = str(d)
        return d

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """A tokenizer saved by save(). The stored vocab_size and fingerprint must match the
        tokenizer file (a tokenizer.json replaced by another one is refused)."""
        tk = _tokenizers()
        d = Path(directory)
        for name in (TOKENIZER_FILE, META_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: no such file (not a directory written by Tokenizer.save)")
        try:
            backend = tk.Tokenizer.from_file(str(d / TOKENIZER_FILE))
        except Exception as exc:  # the library raises its own Exception type
            raise ValueError(f"{d / TOKENIZER_FILE}: not a tokenizers file ({exc})") from None
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{d / META_FILE}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
            raise ValueError(
                f"{d / META_FILE}: format {meta.get('format') if isinstance(meta, dict) else meta!r} "
                f"is not {META_FORMAT}"
            )
        tok = cls(backend, meta.get("info"), str(d))
        if meta.get("vocab_size") != tok.vocab_size or meta.get("fingerprint") != tok.fingerprint:
            raise ValueError(
                f"{d}: {TOKENIZER_FILE} (vocab_size {tok.vocab_size}, fingerprint {tok.fingerprint}) "
                f"is not the tokenizer {META_FILE} describes (vocab_size {meta.get('vocab_size')}, "
                f"fingerprint {meta.get('fingerprint')})"
            )
        return tok

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can give (merges, bytes, specials and added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A hash of the vocabulary and merges: two tokenizers of the same size but different
        vocabularies differ here."""
        model = json.loads(self.backend.to_str())["model"]
        blob = json.dumps(
            [model.get("vocab"), model.get("merges"), self.backend.get_vocab(with_added_tokens=True)], sort_keys=True
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    pad_id, bos_id, eos_id = 0, 1, 2

    def __repr__(self) -> str:
        where = f", path={self.path!r}" if self.path else ""
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r}{where})"

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and each one's character span [start, end) in `text` (spaces trimmed; the
        pieces of one multi-byte character share its span)."""
        e = self.backend.encode(text)
        return e.ids, [tuple(o) for o in e.offsets]

    def encode_words(self, words: list[str]) -> tuple[list[int], list[int]]:
        """ids of a pre-split text (a tagging task's tokens, each read as if preceded by a
        space) and, for each id, the index of the word it belongs to."""
        if not words:
            return [], []
        e = self.backend.encode(list(words), is_pretokenized=True)
        return e.ids, list(e.word_ids)

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)


def check_vocab(tokenizer: Tokenizer, model, *, model_name: str = "model") -> None:
    """TokenizerMismatch unless the model's vocab_size (model.config.vocab_size, or an int)
    is the tokenizer's: ids of another vocabulary index the wrong embeddings, silently."""
    size = model if isinstance(model, numbers.Integral) else getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise TypeError(f"{model_name} has no config.vocab_size to check the tokenizer against")
    if int(size) != tokenizer.vocab_size:
        where = f" ({tokenizer.path})" if tokenizer.path else ""
        raise TokenizerMismatch(
            f"the tokenizer{where} has a vocabulary of {tokenizer.vocab_size} tokens but "
            f"{model_name} has vocab_size={int(size)}: they were not built for each other "
            "(train the model with this tokenizer, or load the tokenizer it was trained with)"
        )
