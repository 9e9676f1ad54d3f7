"""accelops.eval.data: the loaders read the real files with the counts their SOURCE.txt and
the data README give, and refuse malformed files naming the file, the line and the reason."""

import json
from pathlib import Path

import pytest

from accelops.eval import data as D

ROOT = D.data_root()
needs_data = pytest.mark.skipif(
    not (ROOT / "README.md").exists(), reason=f"evaluation data not found at {ROOT} (set {D.DATA_ENV})"
)


# --------------------------------------------------------------------------- paths


def test_data_root_env_and_argument(monkeypatch, tmp_path):
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path))
    assert D.data_root() == tmp_path
    assert D.data_root("/elsewhere") == Path("/elsewhere")
    monkeypatch.delenv(D.DATA_ENV)
    repo = Path(__file__).resolve().parents[1]
    assert D.data_root() == repo.parent / "shared" / "data" / "eval"


def test_data_path_missing_names_path_and_root(monkeypatch, tmp_path):
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/wnut17/x\.conll: no such file.*{D.DATA_ENV}="):
        D.data_path("wnut17", "x.conll")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv: no such file"):
        D.load_classification(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- the real files


@needs_data
def test_wikitext2_counts():
    valid = D.load_lm_text(D.data_path("wikitext-2", "valid.txt"))
    test = D.load_lm_text(D.data_path("wikitext-2", "test.txt"))
    # SOURCE.txt: valid 3,760 lines / 217,646 tokens, test 4,358 / 245,569 (incl. <eos> per line)
    assert (len(valid.lines), valid.num_tokens) == (3760, 217646)
    assert (len(test.lines), test.num_tokens) == (4358, 245569)
    assert len(valid.tokens) == valid.num_tokens and valid.tokens[:3] == [D.EOS, "=", "Homarus"]
    assert valid.num_words == valid.num_tokens - 3760


@needs_data
def test_banking77_counts():
    labels = D.load_label_set(D.data_path("banking77", "categories.json"))
    train = D.load_classification(D.data_path("banking77", "train.csv"), labels=labels)
    test = D.load_classification(D.data_path("banking77", "test.csv"), labels=labels)
    assert (len(labels), len(train), len(test)) == (77, 10003, 3080)
    assert set(train.labels) == set(test.labels) == set(labels)
    assert train.texts[0] == "I am still waiting on my card?" and train.labels[0] == "card_arrival"
    assert train.label_names == labels and train.label_ids()[0] == labels.index("card_arrival")
    assert train.line_numbers[:2] == [2, 3]


@needs_data
@pytest.mark.parametrize(
    "split,sentences,words",
    [
        ("dev", 2001, 25147),
        ("test", 2077, 25094),
        pytest.param("train", 12544, 204577, marks=pytest.mark.slow),  # 14 MB: ~3 s on 2 cores
    ],
)
def test_ud_ewt_counts(split, sentences, words):
    sents = D.load_conllu(D.data_path("ud_english_ewt", f"en_ewt-ud-{split}.conllu"))
    assert len(sents) == sentences
    assert sum(len(s) for s in sents) == words  # syntactic words: no multi-word ranges, no empty nodes
    assert {t for s in sents for t in s.upos} == set(D.UPOS_TAGS)


@needs_data
def test_ud_ewt_first_dev_sentence():
    s = D.load_conllu(D.data_path("ud_english_ewt", "en_ewt-ud-dev.conllu"))[0]
    assert s.words == ["From", "the", "AP", "comes", "this", "story", ":"]
    assert s.upos == ["ADP", "DET", "PROPN", "VERB", "DET", "NOUN", "PUNCT"]
    assert s.heads == [3, 3, 4, 0, 6, 4, 4] and s.text == "From the AP comes this story :"
    assert s.line == 1


@needs_data
@pytest.mark.parametrize(
    "name,sentences,tokens",
    [
        ("wnut17train.conll", 3394, 62730),
        ("emerging.dev.conll", 1009, 15733),
        ("emerging.test.annotated", 1287, 23394),
    ],
)
def test_wnut17_counts(name, sentences, tokens):
    types = ["corporation", "creative-work", "group", "location", "person", "product"]
    sents = D.load_conll_bio(D.data_path("wnut17", name), entity_types=types)
    assert (len(sents), sum(len(s) for s in sents)) == (sentences, tokens)
    assert D.bio_entity_types(sents) == types


@needs_data
def test_squad_and_xquad_counts_and_split():
    squad = D.load_squad(D.data_path("squad_v1.1", "dev-v1.1.json"))
    xquad = D.load_squad(D.data_path("xquad_en", "xquad.en.json"))
    assert (squad.version, squad.num_articles, len(squad.paragraphs), len(squad.questions)) == ("1.1", 48, 2067, 10570)
    assert (xquad.num_articles, len(xquad.paragraphs), len(xquad.questions)) == (48, 240, 1190)
    train = D.split_squad_by_xquad(squad, xquad)
    # the 240 XQuAD paragraphs hold 1,190 of SQuAD dev's questions: what is left to train on
    assert (len(train.paragraphs), len(train.questions)) == (2067 - 240, 10570 - 1190)
    assert not {p.context for p in train.paragraphs} & {p.context for p in xquad.paragraphs}
    gold = squad.gold_answers()
    assert len(gold) == 10570 and all(gold.values())


# --------------------------------------------------------------------------- malformed files


def write(tmp_path, name, text):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def test_empty_and_non_utf8(tmp_path):
    with pytest.raises(D.DataFormatError, match=r"e\.txt: the file is empty"):
        D.load_lm_text(write(tmp_path, "e.txt", " \n\n"))
    with pytest.raises(D.DataFormatError, match=r"b\.txt:2: not UTF-8"):
        D.load_lm_text(write(tmp_path, "b.txt", b"fine\nbad \xff byte\n"))


def test_lm_text_refuses_eos_in_text(tmp_path):
    p = write(tmp_path, "v.txt", " = Title = \n a <eos> b \n")
    with pytest.raises(D.DataFormatError, match=r"v\.txt:2: .*end-of-line marker"):
        D.load_lm_text(p)


def test_lm_text_counts_blank_lines(tmp_path):
    t = D.load_lm_text(write(tmp_path, "v.txt", " \n a b \n\n"))
    assert t.tokens == [D.EOS, "a", "b", D.EOS, D.EOS] and t.num_chars == len(" \n a b \n\n")


@pytest.mark.parametrize(
    "body,line,reason",
    [
        ("text,category\nhi,a\nho\n", 3, "1 fields, the header has 2"),
        ("text,category\nhi,a,extra\n", 2, "3 fields"),
        ("text,category\n,a\n", 2, "empty 'text'"),
        ("text,category\nhi,\n", 2, "empty 'category'"),
        ("text,category\nhi,a\n\nho,b\n", 3, "a blank line"),
        ('text,category\n"multi\nline",a\nhi,zzz\n', 4, "label 'zzz' is not in the label set"),
    ],
)
def test_classification_malformed(tmp_path, body, line, reason):
    p = write(tmp_path, "t.csv", body)
    with pytest.raises(D.DataFormatError, match=rf"t\.csv:{line}: {reason}"):
        D.load_classification(p, labels=["a", "b"])


def test_classification_header_and_tsv(tmp_path):
    with pytest.raises(
        D.DataFormatError, match=r"t\.csv:1: the header \['sentence', 'category'\] has no column 'text'"
    ):
        D.load_classification(write(tmp_path, "t.csv", "sentence,category\nhi,a\n"))
    d = D.load_classification(write(tmp_path, "t.tsv", "label\ttext\nx\thello, world\n"), label_column="label")
    assert d.texts == ["hello, world"] and d.labels == ["x"] and d.label_names == ["x"]


def test_classification_multiline_record_line_numbers(tmp_path):
    d = D.load_classification(write(tmp_path, "t.csv", 'text,category\n"a\nb",x\nc,y\n'))
    assert d.texts == ["a\nb", "c"] and d.line_numbers == [2, 4]


def test_label_set_malformed(tmp_path):
    with pytest.raises(D.DataFormatError, match=r"c\.json:\[1\]: label 'a' is listed twice"):
        D.load_label_set(write(tmp_path, "c.json", '["a", "a"]'))
    with pytest.raises(D.DataFormatError, match=r"c\.json:1: invalid JSON"):
        D.load_label_set(write(tmp_path, "c.json", '["a",'))


CONLLU_OK = (
    "# sent_id = s1\n# text = I don't\n"
    "1\tI\tI\tPRON\tPRP\t_\t2\tnsubj\t_\t_\n"
    "2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_\n"
    "2\tdo\tdo\tAUX\tVBP\t_\t0\troot\t_\t_\n"
    "3\tn't\tnot\tPART\tRB\t_\t2\tadvmod\t_\t_\n"
    "3.1\tx\tx\tX\t_\t_\t_\t_\t2:dep\t_\n"
    "\n"
    "1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_\n"  # last sentence without its closing blank line
)


def test_conllu_reads_words_not_ranges_or_empty_nodes(tmp_path):
    s = D.load_conllu(write(tmp_path, "a.conllu", CONLLU_OK))
    assert [x.words for x in s] == [["I", "do", "n't"], ["Hi"]]
    assert s[0].upos == ["PRON", "AUX", "PART"] and s[0].heads == [2, 0, 2]
    assert (s[0].sent_id, s[0].text, s[0].line, s[1].line) == ("s1", "I don't", 1, 9)


@pytest.mark.parametrize(
    "lines,line,reason",
    [
        (["1\tI\tI\tPRON\tPRP\t_\t0\troot\t_"], 1, "9 tab-separated fields"),
        (["1\tI\tI\tPRON\tPRP\t_\t0\troot\t_\t_", "3\tx\tx\tX\t_\t_\t1\tdep\t_\t_"], 2, "word id 3 out of order"),
        (["1\tI\tI\tPRONOUN\tPRP\t_\t0\troot\t_\t_"], 1, "UPOS 'PRONOUN' is not one of the 17"),
        (["1\tI\tI\tPRON\tPRP\t_\t5\troot\t_\t_"], 1, "HEAD 5 is not a word of this 1-word sentence"),
        (["1\tI\tI\tPRON\tPRP\t_\t_\troot\t_\t_"], 1, "HEAD '_' is not a word id"),
        (
            ["1\tI\tI\tPRON\tPRP\t_\t0\troot\t_\t_", "# late", "2\tx\tx\tX\t_\t_\t1\tdep\t_\t_"],
            2,
            "a comment line inside a sentence",
        ),
        (
            ["1\tI\tI\tPRON\tPRP\t_\t0\troot\t_\t_", "\t", "1\tx\tx\tX\t_\t_\t0\tdep\t_\t_"],
            2,
            "a sentence break .* holds whitespace",
        ),
        (["2-1\tx\t_\t_\t_\t_\t_\t_\t_\t_"], 1, "multi-word token range 2-1"),
        (["a\tI\tI\tPRON\tPRP\t_\t0\troot\t_\t_"], 1, "ID 'a' is not a word id"),
    ],
)
def test_conllu_malformed(tmp_path, lines, line, reason):
    p = write(tmp_path, "b.conllu", "\n".join(lines) + "\n\n")
    with pytest.raises(D.DataFormatError, match=rf"b\.conllu:{line}: {reason}"):
        D.load_conllu(p)


def test_conll_bio_tab_only_breaks_and_docstart(tmp_path):
    p = write(
        tmp_path, "w.conll", "-DOCSTART-\tO\n\nEmpire\tB-location\nState\tI-location\n\t\nx\tI-person\n \nlast\tO"
    )
    s = D.load_conll_bio(p)
    assert [x.tokens for x in s] == [["Empire", "State"], ["x"], ["last"]]
    assert [x.tags for x in s] == [["B-location", "I-location"], ["I-person"], ["O"]]
    assert [x.line for x in s] == [3, 6, 8]


@pytest.mark.parametrize(
    "body,line,reason",
    [
        ("a\tO\nb\n", 2, "a token without a tag"),
        ("a\tO\nb\tB_person\n", 2, "tag 'B_person' is not O, B-<type> or I-<type>"),
        ("a\tO\nb\tB-\n", 2, "tag 'B-'"),
        ("a\tO\n\tB-person\n", 2, "an empty token"),
        ("a\tO\nb\tB-animal\n", 2, "entity type 'animal' is not in the label set"),
    ],
)
def test_conll_bio_malformed(tmp_path, body, line, reason):
    with pytest.raises(D.DataFormatError, match=rf"w\.conll:{line}: {reason}"):
        D.load_conll_bio(write(tmp_path, "w.conll", body), entity_types=["person"])


def squad_doc(answers, context="The cat sat.", qid="q1"):
    return {
        "version": "1.1",
        "data": [
            {
                "title": "T",
                "paragraphs": [{"context": context, "qas": [{"id": qid, "question": "Who sat?", "answers": answers}]}],
            }
        ],
    }


def test_squad_reads_spans(tmp_path):
    d = D.load_squad(write(tmp_path, "s.json", json.dumps(squad_doc([{"text": "cat", "answer_start": 4}]))))
    a = d.questions[0].answers[0]
    assert (a.text, a.start, a.end) == ("cat", 4, 7) and d.gold_answers() == {"q1": ["cat"]}


@pytest.mark.parametrize(
    "answers,where,reason",
    [
        (
            [{"text": "cat", "answer_start": 10}],
            r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]",
            r"answer span \[10, 13\) lies outside its context of 12 characters",
        ),
        (
            [{"text": "cat", "answer_start": 0}],
            r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]",
            "answer 'cat' is not the context's text at answer_start=0",
        ),
        (
            [{"text": "cat", "answer_start": "4"}],
            r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]\.answer_start",
            "expected int, got str",
        ),
        ([{"text": "cat"}], r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]", "no 'answer_start' field"),
        ([], r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers", "no answers"),
    ],
)
def test_squad_malformed(tmp_path, answers, where, reason):
    p = write(tmp_path, "s.json", json.dumps(squad_doc(answers)))
    with pytest.raises(D.DataFormatError, match=rf"s\.json:{where}: {reason}"):
        D.load_squad(p)


def test_squad_bad_json_and_duplicate_ids(tmp_path):
    with pytest.raises(D.DataFormatError, match=r"s\.json:2: invalid JSON"):
        D.load_squad(write(tmp_path, "s.json", '{"data":\n [,]}'))
    doc = squad_doc([{"text": "cat", "answer_start": 4}])
    doc["data"][0]["paragraphs"].append(doc["data"][0]["paragraphs"][0])
    with pytest.raises(D.DataFormatError, match=r"paragraphs\[1\]\.qas\[0\]\.id: question id 'q1' also at"):
        D.load_squad(write(tmp_path, "s.json", json.dumps(doc)))


def test_split_squad_by_xquad_checks_subset(tmp_path):
    squad = D.load_squad(write(tmp_path, "s.json", json.dumps(squad_doc([{"text": "cat", "answer_start": 4}]))))
    other = D.load_squad(
        write(tmp_path, "x.json", json.dumps(squad_doc([{"text": "cat", "answer_start": 4}], qid="zz")))
    )
    with pytest.raises(ValueError, match="1 question.* not in"):
        D.split_squad_by_xquad(squad, other)
    changed = D.load_squad(
        write(tmp_path, "y.json", json.dumps(squad_doc([{"text": "cat", "answer_start": 4}], context="The cat sat!")))
    )
    with pytest.raises(ValueError, match="question q1: its context"):
        D.split_squad_by_xquad(squad, changed)
    assert D.split_squad_by_xquad(squad, squad).paragraphs == []
