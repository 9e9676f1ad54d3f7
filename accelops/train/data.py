"""Character-level text data: a vocabulary of the characters of a file, its first 90% for
training and the last 10% for validation, cut into fixed windows of token ids."""
from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

__all__ = ["CharVocab", "TokenWindows", "load_char_corpus"]


class CharVocab:
    """The sorted distinct characters of a text; id = position in that list."""

    def __init__(self, chars):
        chars = list(chars)
        if len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct")
        if not chars:
            raise ValueError("chars must not be empty: the text has no characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} characters)"


class TokenWindows(Dataset):
    """Windows of a 1-D token tensor: item i is (tokens[s : s + seq_len], tokens[s + 1 : s + seq_len + 1])
    with s = i * stride (stride defaults to seq_len: windows that do not overlap, so an
    epoch reads the text once)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int | None = None):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise TypeError("tokens must be a 1-D torch.Tensor of token ids")
        for name, value in (("seq_len", seq_len), ("stride", seq_len if stride is None else stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.tokens = tokens.long()
        self.seq_len = seq_len
        self.stride = seq_len if stride is None else stride
        n = tokens.numel() - 1 - seq_len  # last start that still has a target for every position
        self._len = 0 if n < 0 else n // self.stride + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        if not -self._len <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows")
        s = (i % self._len) * self.stride
        chunk = self.tokens[s:s + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def load_char_corpus(path, seq_len: int, val_fraction: float = 0.1, stride: int | None = None):
    """Reads a UTF-8 text file -> (train TokenWindows, val TokenWindows, CharVocab). The
    vocabulary holds every character of the file; the first (1 - val_fraction) of it is
    the training text, the rest (contiguous, at the end) the validation text."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data path {path!r} is not a file (relative paths are taken from the working "
                                f"directory {os.getcwd()!r})")
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text)
    n_train = int(len(ids) * (1.0 - val_fraction))
    train = TokenWindows(ids[:n_train], seq_len, stride)
    val = TokenWindows(ids[n_train:], seq_len, stride)
    for name, ds, part in (("training", train, ids[:n_train]), ("validation", val, ids[n_train:])):
        if len(ds) == 0:
            raise ValueError(f"{path!r}: the {name} split has {part.numel()} characters, fewer than "
                             f"seq_len + 1 = {seq_len + 1}: use a longer text or a shorter seq_len")
    return train, val, vocab
