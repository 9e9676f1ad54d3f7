"""Character-level text data: a vocabulary of the characters of a file, its first 90% for
training and the last 10% for validation (or a separate validation file), cut into fixed
windows of token ids; split_dataset for a validation split of any map-style dataset."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset, Subset

__all__ = ["CharVocab", "TokenWindows", "load_char_corpus", "split_dataset"]


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
        chunk = self.tokens[s : s + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def _read_text(path, what="data path") -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} {path!r} is not a file (relative paths are taken from the working directory {os.getcwd()!r})"
        )
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_char_corpus(path, seq_len: int, val_fraction: float | None = 0.1, stride: int | None = None, val_path=None):
    """Reads a UTF-8 text file -> (train TokenWindows, val TokenWindows, CharVocab). The
    vocabulary holds every character of the file; the first (1 - val_fraction) of it is
    the training text, the rest (contiguous, at the end) the validation text. With
    val_path, the whole of `path` is the training text and the whole of `val_path` the
    validation text (the vocabulary: the characters of both); val_fraction must then be
    None (or left at its default)."""
    path = os.fspath(path)
    text = _read_text(path)
    if val_path is not None:
        if val_fraction not in (None, 0.1):
            raise ValueError(
                f"val_path={os.fspath(val_path)!r} and val_fraction={val_fraction!r} both given: the "
                "validation text is either a separate file or a fraction of the training file"
            )
        val_text = _read_text(val_path, "val_path")
        vocab = CharVocab.from_text(text + val_text)
        train_ids, val_ids = vocab.encode(text), vocab.encode(val_text)
    else:
        if val_fraction is None or isinstance(val_fraction, bool) or not (0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        vocab = CharVocab.from_text(text)
        ids = vocab.encode(text)
        n_train = int(len(ids) * (1.0 - val_fraction))
        train_ids, val_ids = ids[:n_train], ids[n_train:]
    train = TokenWindows(train_ids, seq_len, stride)
    val = TokenWindows(val_ids, seq_len, stride)
    for name, ds, part in (("training", train, train_ids), ("validation", val, val_ids)):
        if len(ds) == 0:
            raise ValueError(
                f"{path!r}: the {name} split has {part.numel()} characters, fewer than "
                f"seq_len + 1 = {seq_len + 1}: use a longer text or a shorter seq_len"
            )
    return train, val, vocab


def split_dataset(dataset, val_fraction: float = 0.1, seed: int = 0, shuffle: bool = True):
    """A map-style dataset -> (train Subset, val Subset) with round(len * val_fraction)
    samples (at least 1) held out. shuffle=True: a random permutation from `seed` (the
    same seed, the same split, whatever the global RNG); shuffle=False: the last samples.
    For overlapping windows of one text (TokenWindows with stride < seq_len) a random split
    puts neighbouring windows on both sides: use load_char_corpus's contiguous split there."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset must be map-style (with __len__ and __getitem__), got {type(dataset).__name__}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    n = len(dataset)
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"dataset has {n} sample(s): too few to hold out {val_fraction!r} and keep any to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    return Subset(dataset, sorted(order[: n - n_val])), Subset(dataset, sorted(order[n - n_val :]))
