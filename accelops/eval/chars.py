"""CharVocab: a character vocabulary built on a task's training split, for character-level
sequence-to-sequence tasks (lemmatisation: word form -> lemma).

Four special ids come first, the first three at the subword Tokenizer's ids so the models
and task code read them the same way: PAD (0), BOS (1), EOS (2), UNK (3). Then every
character seen in the training texts, sorted by code point (so the ids do not depend on the
order of the data). A character outside the vocabulary (one the training split never
holds) encodes as UNK; UNK decodes as U+FFFD (the replacement character), which equals no
real character, so a prediction holding it never matches a gold string: a model cannot
produce a character it was never shown, and the metric counts that as an error.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

__all__ = ["CharVocab", "UNK_CHAR"]

UNK_CHAR = "\ufffd"


class CharVocab:
    """Characters <-> ids. CharVocab.build(texts) learns one; encode(text) -> ids (no
    specials added), decode(ids) -> text (specials dropped, UNK as U+FFFD). vocab_size,
    pad_id / bos_id / eos_id / unk_id, fingerprint, path (None: not saved) and info are what
    accelops.eval's checks (check_vocab) read, as for a Tokenizer."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
    path = None

    def __init__(self, chars: Iterable[str], info: dict | None = None):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"a CharVocab holds single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("a CharVocab's characters must be distinct")
        self.chars = sorted(chars)
        self.index = {c: i + len(self.SPECIALS) for i, c in enumerate(self.chars)}
        self.info = dict(info or {})

    @classmethod
    def build(cls, texts: Iterable[str], info: dict | None = None) -> "CharVocab":
        """Every character of `texts` (at least one)."""
        seen: set[str] = set()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
            seen.update(t)
        if not seen:
            raise ValueError("CharVocab.build: the texts hold no character")
        return cls(seen, info)

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.chars).encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"CharVocab(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        unk = self.unk_id
        return [self.index.get(c, unk) for c in text]

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        n = len(self.SPECIALS)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i == self.unk_id:
                out.append(UNK_CHAR)
            elif i >= n:
                out.append(self.chars[i - n])
        return "".join(out)
