"""Loaders for the evaluation data sets' file formats, strict about what they accept.

Five formats (see docs/eval.md for the data sets that use them):

- word-level LM text (WikiText-2): `load_lm_text` -> LMText
- CSV/TSV sentence classification (BANKING77): `load_classification` -> ClassificationData
- CoNLL-U (Universal Dependencies): `load_conllu` -> list[ConlluSentence]
- CoNLL BIO token<TAB>tag files (WNUT-17): `load_conll_bio` -> list[TaggedSentence]
- SQuAD v1.1 JSON (SQuAD, XQuAD): `load_squad` -> SquadData

A malformed file raises DataFormatError naming the file, the line (for JSON: the path of
the element inside the document, e.g. data[3].paragraphs[0].qas[2]) and the reason, rather
than being read into something plausible: an evaluation on silently mangled data reports
numbers of another data set. A missing file raises FileNotFoundError naming the path and
the data root it was resolved against.

The data live outside the repository: `data_root()` is ACCELOPS_DATA when set, else
../shared/data/eval beside the repository root; `data_path(...)` joins a path below it and
checks that the file is there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DATA_ENV",
    "DataFormatError",
    "data_root",
    "data_path",
    "LMText",
    "load_lm_text",
    "EOS",
    "ClassificationData",
    "load_classification",
    "load_label_set",
    "UPOS_TAGS",
    "ConlluSentence",
    "load_conllu",
    "TaggedSentence",
    "load_conll_bio",
    "bio_entity_types",
    "SquadAnswer",
    "SquadQuestion",
    "SquadParagraph",
    "SquadData",
    "load_squad",
    "split_squad_by_xquad",
]

DATA_ENV = "ACCELOPS_DATA"
# The repository root is two levels above this file (accelops/eval/data.py).
_REPO_ROOT = Path(__file__).resolve().parents[2]
_DEFAULT_ROOT = _REPO_ROOT.parent / "shared" / "data" / "eval"


class DataFormatError(ValueError):
    """A data file that does not hold what its format says: `path:line: reason`. `line` is
    a 1-based line number, or for JSON a location inside the document, or None for the
    whole file."""

    def __init__(self, path, line, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------- paths


def data_root(root=None) -> Path:
    """The directory holding the evaluation data sets: `root` when given, else the
    ACCELOPS_DATA environment variable, else ../shared/data/eval beside the repository."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else _DEFAULT_ROOT


def data_path(*parts, root=None) -> Path:
    """data_root(root) / parts, checked to exist (FileNotFoundError naming the path and how
    the root was chosen otherwise)."""
    base = data_root(root)
    path = base.joinpath(*parts)
    if not path.exists():
        how = (
            ("root=" + str(root))
            if root is not None
            else (
                f"{DATA_ENV}={os.environ[DATA_ENV]}"
                if os.environ.get(DATA_ENV)
                else f"the default root beside the repository; set {DATA_ENV} to the data directory"
            )
        )
        raise FileNotFoundError(f"{path}: no such file or directory (data root {base}, from {how})")
    return path


def _read_text(path) -> str:
    """The file's text, decoded as UTF-8 (a decoding error names the line and byte)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(path, line, f"not UTF-8 (byte {exc.start}: {exc.reason})") from None
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the first field
        text = text[1:]
    if not text.strip():
        raise DataFormatError(path, None, "the file is empty")
    return text


def _lines(text: str) -> list[str]:
    """Lines without their terminators. Only \\n ends a line (str.splitlines would also split
    at \\x1c, \\u2028, ... which can occur inside a token); a \\r before it is dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


# --------------------------------------------------------------------------- word-level LM text

EOS = "<eos>"


@dataclass
class LMText:
    """A word-level language-modelling text (WikiText's layout: one paragraph or heading a
    line, tokens separated by spaces, blank lines kept). `tokens` follows the convention of
    the published WikiText counts (and pytorch/examples' word_language_model): each line's
    whitespace-separated tokens, then EOS, blank lines included. `text` is the file's text
    as read and num_chars its length (accelops.eval.tasks.WikiText2 counts the characters of
    the lines normalised to single spaces instead: the text its model reads)."""

    path: str
    lines: list[str]
    text: str

    @property
    def tokens(self) -> list[str]:
        out = []
        for line in self.lines:
            out.extend(line.split())
            out.append(EOS)
        return out

    @property
    def num_tokens(self) -> int:
        return sum(len(line.split()) + 1 for line in self.lines)

    @property
    def num_words(self) -> int:
        """Tokens without the EOS markers."""
        return sum(len(line.split()) for line in self.lines)

    @property
    def num_chars(self) -> int:
        return len(self.text)


def load_lm_text(path) -> LMText:
    """A word-level LM text file (WikiText's valid.txt / test.txt)."""
    text = _read_text(path)
    lines = _lines(text)
    for i, line in enumerate(lines, 1):
        if EOS in line.split():
            # EOS marks the ends of lines; one in the text would be counted as a line end
            raise DataFormatError(path, i, f"the text holds the end-of-line marker {EOS!r} itself")
        if "\x00" in line:
            raise DataFormatError(path, i, "a NUL character (a binary file?)")
    return LMText(str(path), lines, text)


# --------------------------------------------------------------------------- CSV/TSV classification


@dataclass
class ClassificationData:
    """Sentence classification examples: texts[i] has label labels[i]; `line_numbers[i]`
    is the line its record starts on. label_names: the label set (from the label file when
    one was given, else the sorted labels seen)."""

    path: str
    texts: list[str]
    labels: list[str]
    label_names: list[str]
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def label_ids(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in self.labels]


def load_label_set(path) -> list[str]:
    """A JSON list of distinct, non-empty label strings (BANKING77's categories.json)."""
    text = _read_text(path)
    try:
        labels = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON: {exc.msg}") from None
    if not isinstance(labels, list) or not labels:
        raise DataFormatError(path, None, f"expected a non-empty JSON list of labels, got {type(labels).__name__}")
    seen = set()
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise DataFormatError(path, f"[{i}]", f"a label must be a non-empty string, got {label!r}")
        if label in seen:
            raise DataFormatError(path, f"[{i}]", f"label {label!r} is listed twice")
        seen.add(label)
    return labels


def load_classification(
    path,
    *,
    text_column: str = "text",
    label_column: str = "category",
    labels: list[str] | None = None,
    delimiter: str | None = None,
) -> ClassificationData:
    """A CSV (or TSV: delimiter "\\t", the default for a .tsv file) with a header row naming
    text_column and label_column. Quoted fields may span lines (csv module rules). Every
    record must have the header's number of fields, a non-empty text and a label; with
    `labels` (the label set), a label outside it is an error naming its line."""
    text = _read_text(path)
    if delimiter is None:
        delimiter = "\t" if str(path).endswith(".tsv") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DataFormatError(path, reader.line_num, f"malformed header: {exc}") from None
    for name in (text_column, label_column):
        if name not in header:
            raise DataFormatError(path, 1, f"the header {header} has no column {name!r}")
    ti, li = header.index(text_column), header.index(label_column)
    label_set = None if labels is None else set(labels)
    texts, labs, starts = [], [], []
    prev_end = reader.line_num
    while True:
        start = prev_end + 1  # line_num is the line a record ends on: multi-line fields
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataFormatError(path, start, f"malformed CSV record: {exc}") from None
        prev_end = reader.line_num
        if not row:  # csv gives [] for a blank line
            raise DataFormatError(path, start, "a blank line (every record needs a text and a label)")
        if len(row) != len(header):
            raise DataFormatError(path, start, f"{len(row)} fields, the header has {len(header)} ({header})")
        t, lab = row[ti], row[li]
        if not t.strip():
            raise DataFormatError(path, start, f"empty {text_column!r}")
        if not lab.strip():
            raise DataFormatError(path, start, f"empty {label_column!r}")
        if label_set is not None and lab not in label_set:
            raise DataFormatError(path, start, f"label {lab!r} is not in the label set of {len(label_set)} labels")
        texts.append(t)
        labs.append(lab)
        starts.append(start)
    if not texts:
        raise DataFormatError(path, None, "a header but no records")
    names = list(labels) if labels is not None else sorted(set(labs))
    return ClassificationData(str(path), texts, labs, names, starts)


# --------------------------------------------------------------------------- CoNLL-U

# Universal POS tags (universaldependencies.org/u/pos/): the only values UPOS may take.
UPOS_TAGS = (
    "ADJ",
    "ADP",
    "ADV",
    "AUX",
    "CCONJ",
    "DET",
    "INTJ",
    "NOUN",
    "NUM",
    "PART",
    "PRON",
    "PROPN",
    "PUNCT",
    "SCONJ",
    "SYM",
    "VERB",
    "X",
)
_UPOS_SET = frozenset(UPOS_TAGS)
_ID = re.compile(r"[1-9][0-9]*")
_RANGE = re.compile(r"([1-9][0-9]*)-([1-9][0-9]*)")
_EMPTY_NODE = re.compile(r"(0|[1-9][0-9]*)\.[1-9][0-9]*")


@dataclass
class ConlluSentence:
    """One sentence's syntactic words (multi-word token lines such as `1-2 don't` and empty
    nodes such as `8.1` are read past: UPOS tagging is over words, and the treebank's word
    counts count these). heads are 0 for the root; line: where the sentence starts."""

    words: list[str]
    lemmas: list[str]
    upos: list[str]
    heads: list[int]
    deprels: list[str]
    sent_id: str | None
    text: str | None
    line: int

    def __len__(self) -> int:
        return len(self.words)


def load_conllu(path) -> list[ConlluSentence]:
    """A CoNLL-U file (universaldependencies.org/format.html): comment lines (#) before each
    sentence, one line of 10 tab-separated fields a word, a blank line after each sentence.
    Checked: the field count, word ids 1, 2, ... in order, multi-word ranges and empty-node
    ids well formed, UPOS one of the 17 universal tags, HEAD an id of the sentence (or 0)."""
    text = _read_text(path)
    sentences: list[ConlluSentence] = []
    cur: dict | None = None

    def finish() -> None:
        nonlocal cur
        if cur is None:
            return
        if not cur["words"]:
            raise DataFormatError(path, cur["line"], "a sentence with comments but no word lines")
        n = len(cur["words"])
        for h, ln in zip(cur["heads"], cur["head_lines"]):
            if h > n:
                raise DataFormatError(path, ln, f"HEAD {h} is not a word of this {n}-word sentence")
        sentences.append(
            ConlluSentence(
                cur["words"],
                cur["lemmas"],
                cur["upos"],
                cur["heads"],
                cur["deprels"],
                cur["sent_id"],
                cur["text"],
                cur["line"],
            )
        )
        cur = None

    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            if line:
                raise DataFormatError(path, i, "a sentence break must be an empty line, this one holds whitespace")
            finish()
            continue
        if cur is None:
            cur = {
                "words": [],
                "lemmas": [],
                "upos": [],
                "heads": [],
                "head_lines": [],
                "deprels": [],
                "sent_id": None,
                "text": None,
                "line": i,
            }
        if line.startswith("#"):
            if cur["words"]:
                raise DataFormatError(path, i, "a comment line inside a sentence (comments go before its words)")
            m = re.match(r"#\s*(sent_id|text)\s*=\s?(.*)$", line)
            if m:
                cur[m.group(1)] = m.group(2)
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise DataFormatError(path, i, f"{len(cols)} tab-separated fields, CoNLL-U has 10")
        wid = cols[0]
        m = _RANGE.fullmatch(wid)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if not (a == len(cur["words"]) + 1 and b > a):
                raise DataFormatError(
                    path,
                    i,
                    f"multi-word token range {wid} does not start at the next word "
                    f"({len(cur['words']) + 1}) or is empty",
                )
            continue
        if _EMPTY_NODE.fullmatch(wid):
            continue
        if not _ID.fullmatch(wid):
            raise DataFormatError(path, i, f"ID {wid!r} is not a word id, a range (n-m) or an empty node (n.k)")
        expected = len(cur["words"]) + 1
        if int(wid) != expected:
            raise DataFormatError(path, i, f"word id {wid} out of order: expected {expected}")
        form, lemma, upos, _xpos, _feats, head, deprel = cols[1:8]
        if not form:
            raise DataFormatError(path, i, "empty FORM")
        if upos not in _UPOS_SET:
            raise DataFormatError(path, i, f"UPOS {upos!r} is not one of the 17 universal tags")
        if not re.fullmatch(r"0|[1-9][0-9]*", head):
            raise DataFormatError(path, i, f"HEAD {head!r} is not a word id or 0")
        if int(head) == expected:
            raise DataFormatError(path, i, f"word {wid} is its own HEAD")
        cur["words"].append(form)
        cur["lemmas"].append(lemma)
        cur["upos"].append(upos)
        cur["heads"].append(int(head))
        cur["head_lines"].append(i)
        cur["deprels"].append(deprel)
    finish()  # the last sentence may lack its closing blank line at the end of the file
    return sentences


# --------------------------------------------------------------------------- CoNLL BIO

_BIO = re.compile(r"O|[BI]-\S+")


@dataclass
class TaggedSentence:
    """Tokens with one BIO tag each (O, B-type, I-type); line: where the sentence starts."""

    tokens: list[str]
    tags: list[str]
    line: int

    def __len__(self) -> int:
        return len(self.tokens)


def bio_entity_types(sentences: list[TaggedSentence]) -> list[str]:
    """The sorted entity types the tags name (B-person, I-person -> person)."""
    return sorted({t[2:] for s in sentences for t in s.tags if t != "O"})


def load_conll_bio(path, *, entity_types: list[str] | None = None) -> list[TaggedSentence]:
    """A CoNLL-style BIO file: a token and its tag a line, separated by a tab (or, with no
    tab, by whitespace; the tag is the last field, the token the first), sentences separated
    by blank lines. A line of whitespace only also breaks a sentence: WNUT-17's training
    file has thousands of breaks that are a lone tab. -DOCSTART- lines are skipped. Tags must
    be O, B-type or I-type; with entity_types, the type must be one of them. I- after O is
    kept as it is (the metric treats it as an entity start, as seqeval and conlleval do)."""
    text = _read_text(path)
    types = None if entity_types is None else set(entity_types)
    sentences: list[TaggedSentence] = []
    toks: list[str] = []
    tags: list[str] = []
    start = 0
    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            if toks:
                sentences.append(TaggedSentence(toks, tags, start))
                toks, tags = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) < 2:
            raise DataFormatError(path, i, "a token without a tag (expected token<TAB>tag)")
        token, tag = cols[0], cols[-1].strip()
        if token == "-DOCSTART-":
            continue
        if not token.strip():
            raise DataFormatError(path, i, f"an empty token (tag {tag!r})")
        if not _BIO.fullmatch(tag):
            raise DataFormatError(path, i, f"tag {tag!r} is not O, B-<type> or I-<type>")
        if types is not None and tag != "O" and tag[2:] not in types:
            raise DataFormatError(path, i, f"entity type {tag[2:]!r} is not in the label set {sorted(types)}")
        if not toks:
            start = i
        toks.append(token)
        tags.append(tag)
    if toks:
        sentences.append(TaggedSentence(toks, tags, start))
    if not sentences:
        raise DataFormatError(path, None, "no sentences")
    return sentences


# --------------------------------------------------------------------------- SQuAD JSON


@dataclass
class SquadAnswer:
    text: str
    start: int  # character offset into the context

    @property
    def end(self) -> int:
        """One past the answer's last character."""
        return self.start + len(self.text)


@dataclass
class SquadQuestion:
    id: str
    question: str
    answers: list[SquadAnswer]


@dataclass
class SquadParagraph:
    title: str
    context: str
    questions: list[SquadQuestion]
    article: int = 0  # the index of its article in the file's data list


@dataclass
class SquadData:
    """A SQuAD v1.1 document flattened to its paragraphs (each with its article's title)."""

    path: str
    version: str | None
    paragraphs: list[SquadParagraph]

    @property
    def num_articles(self) -> int:
        return len({p.article for p in self.paragraphs})

    @property
    def questions(self) -> list[SquadQuestion]:
        return [q for p in self.paragraphs for q in p.questions]

    def gold_answers(self) -> dict[str, list[str]]:
        """{question id: its answer texts}: what accelops.eval.metrics.squad_scores scores against."""
        return {q.id: [a.text for a in q.answers] for q in self.questions}


def load_squad(path) -> SquadData:
    """A SQuAD v1.1 JSON file (data -> paragraphs -> qas -> answers). Checked: the structure
    and types, non-empty contexts and questions, at least one answer a question, question ids
    unique, and every answer span inside its context with context[start:start + len(text)] ==
    text. Errors name the element, e.g. `data[3].paragraphs[0].qas[2].answers[1]`."""
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None

    def need(obj, key, kind, where):
        if not isinstance(obj, dict):
            raise DataFormatError(path, where, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            raise DataFormatError(path, where, f"no {key!r} field")
        value = obj[key]
        # bool is an int in Python: an answer_start of true is still wrong
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataFormatError(path, f"{where}.{key}", f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    data = need(doc, "data", list, "$")
    paragraphs, seen = [], {}
    for ai, article in enumerate(data):
        aw = f"data[{ai}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for pi, para in enumerate(need(article, "paragraphs", list, aw)):
            pw = f"{aw}.paragraphs[{pi}]"
            context = need(para, "context", str, pw)
            if not context.strip():
                raise DataFormatError(path, f"{pw}.context", "empty context")
            questions = []
            for qi, qa in enumerate(need(para, "qas", list, pw)):
                qw = f"{pw}.qas[{qi}]"
                qid = need(qa, "id", str, qw)
                if qid in seen:
                    raise DataFormatError(path, f"{qw}.id", f"question id {qid!r} also at {seen[qid]}")
                seen[qid] = qw
                question = need(qa, "question", str, qw)
                if not question.strip():
                    raise DataFormatError(path, f"{qw}.question", "empty question")
                answers = []
                raw_answers = need(qa, "answers", list, qw)
                if not raw_answers:
                    raise DataFormatError(path, f"{qw}.answers", "no answers (SQuAD v1.1 questions all have one)")
                for ni, ans in enumerate(raw_answers):
                    nw = f"{qw}.answers[{ni}]"
                    atext = need(ans, "text", str, nw)
                    start = need(ans, "answer_start", int, nw)
                    if not atext:
                        raise DataFormatError(path, f"{nw}.text", "empty answer text")
                    if start < 0 or start + len(atext) > len(context):
                        raise DataFormatError(
                            path,
                            nw,
                            f"answer span [{start}, {start + len(atext)}) lies outside "
                            f"its context of {len(context)} characters",
                        )
                    if context[start : start + len(atext)] != atext:
                        raise DataFormatError(
                            path,
                            nw,
                            f"answer {atext!r} is not the context's text at "
                            f"answer_start={start} ({context[start : start + len(atext)]!r})",
                        )
                    answers.append(SquadAnswer(atext, start))
                questions.append(SquadQuestion(qid, question, answers))
            paragraphs.append(SquadParagraph(title, context, questions, ai))
    if not paragraphs:
        raise DataFormatError(path, "data", "no paragraphs")
    version = doc.get("version") if isinstance(doc.get("version"), str) else None
    return SquadData(str(path), version, paragraphs)


def split_squad_by_xquad(squad: SquadData, xquad: SquadData) -> SquadData:
    """SQuAD's paragraphs that XQuAD does not use: XQuAD English is 240 paragraphs of SQuAD
    v1.1 dev (same contexts, same question ids), so a model trained on the rest of dev can be
    reported on XQuAD without having seen its paragraphs. A paragraph is XQuAD's when it
    holds any of XQuAD's question ids; each such paragraph's context must equal XQuAD's
    (ValueError otherwise: the files are not the versions this split assumes)."""
    xquad_context = {q.id: p.context for p in xquad.paragraphs for q in p.questions}
    kept, matched = [], set()
    for p in squad.paragraphs:
        ids = [q.id for q in p.questions if q.id in xquad_context]
        if not ids:
            kept.append(p)
            continue
        for qid in ids:
            if xquad_context[qid] != p.context:
                raise ValueError(f"question {qid}: its context in {xquad.path} differs from {squad.path}'s")
        matched.update(ids)
    missing = set(xquad_context) - matched
    if missing:
        raise ValueError(
            f"{len(missing)} question(s) of {xquad.path} are not in {squad.path} "
            f"(e.g. {sorted(missing)[0]!r}): it is not a subset of this SQuAD file"
        )
    return SquadData(squad.path, squad.version, kept)
