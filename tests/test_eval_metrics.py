"""accelops.eval.metrics against hand-worked cases (and scikit-learn / a transcription of
seqeval's chunk rules on random inputs)."""

import math
import random

import pytest

from accelops.eval import metrics as M

# --------------------------------------------------------------------------- language modelling


def test_lm_scores_hand_worked():
    # 10 tokens each predicted with p = 1/4: NLL = 10 ln 4
    s = M.lm_scores(10 * math.log(4), 10, num_words=5, num_chars=20)
    assert s.loss == pytest.approx(math.log(4))
    assert s.perplexity == pytest.approx(4.0)
    assert s.bits_per_token == pytest.approx(2.0)
    assert s.word_perplexity == pytest.approx(16.0)  # the same 20 bits over 5 words: 2^4 each
    assert s.bits_per_char == pytest.approx(1.0)
    assert M.lm_scores(0.0, 3).word_perplexity is None and M.perplexity(0.0, 3) == 1.0


@pytest.mark.parametrize(
    "nll,count", [(-1.0, 3), (float("nan"), 3), (float("inf"), 3), (1.0, 0), (1.0, 2.5), (True, 3)]
)
def test_lm_scores_refuse_bad_inputs(nll, count):
    with pytest.raises(ValueError):
        M.lm_scores(nll, count)


# --------------------------------------------------------------------------- classification


def test_classification_hand_worked():
    s = M.classification_scores(["a", "a", "b", "c"], ["a", "b", "b", "a"])
    # a: tp 1 of 2 predicted, 2 gold -> P 1/2 R 1/2 F 1/2
    # b: tp 1 of 2 predicted, 1 gold -> P 1/2 R 1 F 2/3
    # c: never predicted, 1 gold    -> P 0 R 0 F 0
    assert s.accuracy == 0.5
    assert s.per_label["b"].f1 == pytest.approx(2 / 3) and s.per_label["c"].support == 1
    assert s.macro_precision == pytest.approx(1 / 3)
    assert s.macro_recall == pytest.approx(1 / 2)
    assert s.macro_f1 == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)  # mean of F1s, not F1 of the means


def test_classification_explicit_labels():
    s = M.classification_scores([0, 1], [0, 1], labels=[0, 1, 2])
    assert s.accuracy == 1.0 and s.macro_f1 == pytest.approx(2 / 3)  # label 2: no gold, no pred -> 0
    with pytest.raises(ValueError, match=r"pred\[1\] = 5 is not one of the 3 labels"):
        M.classification_scores([0, 1], [0, 5], labels=[0, 1, 2])
    with pytest.raises(ValueError, match="gold has 2 items but pred has 1"):
        M.classification_scores([0, 1], [0])


def test_classification_matches_sklearn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = random.Random(0)
    for _ in range(20):
        n, k = rng.randint(1, 40), rng.randint(1, 6)
        gold = [rng.randrange(k) for _ in range(n)]
        pred = [rng.randrange(k) for _ in range(n)]
        s = M.classification_scores(gold, pred)
        p, r, f, _ = precision_recall_fscore_support(gold, pred, average="macro", zero_division=0)
        assert (s.macro_precision, s.macro_recall, s.macro_f1) == pytest.approx((p, r, f))
        assert s.accuracy == pytest.approx(accuracy_score(gold, pred))


# --------------------------------------------------------------------------- POS


def test_token_and_sequence_accuracy():
    gold = [["DET", "NOUN", "VERB"], ["INTJ"]]
    pred = [["DET", "NOUN", "NOUN"], ["INTJ"]]
    assert M.token_accuracy(gold, pred) == 3 / 4
    assert M.sequence_accuracy(gold, pred) == 1 / 2
    with pytest.raises(ValueError, match="sentence 1: gold has 1 tags but pred has 2"):
        M.token_accuracy(gold, [pred[0], ["INTJ", "X"]])


# --------------------------------------------------------------------------- entities


@pytest.mark.parametrize(
    "tags,entities",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
        (["I-PER", "I-PER", "O", "I-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),  # I- without B- starts one
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # a type change ends and starts
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),  # B- after B- starts a new one
        (["O", "O"], []),
        (["B-creative-work", "I-creative-work"], [("creative-work", 0, 1)]),  # types may hold hyphens
    ],
)
def test_bio_entities_hand_worked(tags, entities):
    assert M.bio_entities(tags) == entities


def test_entity_scores_seqeval_docstring_example():
    # seqeval's own example: MISC is predicted one token early (wrong), PER right -> 1/2, 1/2, 1/2
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    s = M.entity_scores(gold, pred)
    assert (s.precision, s.recall, s.f1) == (0.5, 0.5, 0.5)
    assert (s.num_gold, s.num_pred, s.num_correct) == (2, 2, 1)
    assert s.per_type["MISC"].f1 == 0.0 and s.per_type["PER"].f1 == 1.0 and s.macro_f1 == 0.5


def test_entity_scores_hand_worked():
    # an I- start is an entity (conlleval): the predicted I-PER I-PER matches gold B-PER I-PER
    assert M.entity_scores([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]]).f1 == 1.0
    # gold: PER(0-1), LOC(3); pred: PER(0) (wrong extent), LOC(3) right, ORG(4) spurious
    s = M.entity_scores([["B-PER", "I-PER", "O", "B-LOC", "O"]], [["B-PER", "O", "O", "B-LOC", "B-ORG"]])
    assert (s.num_gold, s.num_pred, s.num_correct) == (2, 3, 1)
    assert s.precision == pytest.approx(1 / 3) and s.recall == pytest.approx(1 / 2)
    assert s.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # = 0.4
    # no predicted entities: precision and F1 are 0, not undefined
    s = M.entity_scores([["B-PER"]], [["O"]])
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)


def test_entities_do_not_cross_sentences():
    # seqeval joins sentences with an O: an I- at a sentence start begins a new entity
    s = M.entity_scores([["B-PER"], ["I-PER"]], [["B-PER"], ["I-PER"]])
    assert s.num_gold == 2 and s.f1 == 1.0


def test_entity_scores_refuse_bad_tags():
    with pytest.raises(ValueError, match=r"pred sentence 0: tag 1 = 'E-PER' is not O, B-<type> or I-<type>"):
        M.entity_scores([["O", "O"]], [["O", "E-PER"]])
    with pytest.raises(ValueError, match="tag 0 = 'B' is not"):
        M.bio_entities(["B"])


def _seqeval_get_entities(seq):
    """seqeval.metrics.sequence_labeling.get_entities (default, prefix mode), transcribed
    rule by rule from its source, for a randomised cross-check of bio_entities."""

    def end_of_chunk(prev_tag, tag, prev_type, type_):
        end = prev_tag in ("E", "S")
        end |= prev_tag == "B" and tag in ("B", "S", "O")
        end |= prev_tag == "I" and tag in ("B", "S", "O")
        end |= prev_tag not in ("O", ".") and prev_type != type_
        return end

    def start_of_chunk(prev_tag, tag, prev_type, type_):
        start = tag in ("B", "S")
        start |= (prev_tag, tag) in {("E", "E"), ("E", "I"), ("S", "E"), ("S", "I"), ("O", "E"), ("O", "I")}
        start |= tag not in ("O", ".") and prev_type != type_
        return start

    prev_tag, prev_type, begin, chunks = "O", "", 0, []
    for i, chunk in enumerate(seq + ["O"]):
        tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def test_bio_entities_match_seqeval_rules_on_random_tags():
    rng = random.Random(1)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(2000):
        seq = [rng.choice(tags) for _ in range(rng.randint(0, 9))]
        assert M.bio_entities(seq) == _seqeval_get_entities(seq), seq


# --------------------------------------------------------------------------- SQuAD


@pytest.mark.parametrize(
    "raw,normalised",
    [
        ("The  Quick, Brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("Theater of Anna", "theater of anna"),  # articles only as whole words
        ("state-of-the-art", "stateoftheart"),  # punctuation goes before the articles are looked for
        ("\u201cquoted\u201d \u2013 x", "\u201cquoted\u201d \u2013 x"),  # only ASCII punctuation is removed
        ("A", ""),
        ("1,000.5 km", "10005 km"),
    ],
)
def test_normalize_answer_hand_worked(raw, normalised):
    assert M.normalize_answer(raw) == normalised


def test_squad_em_f1_hand_worked():
    # normalised: pred "cat sat on mat" (4 tokens), gold "cat on mat" (3); 3 in common
    # -> P 3/4, R 1, F1 = 2 * 3/4 / (7/4) = 6/7
    assert M.squad_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert M.squad_exact_match("the cat sat on the mat", "a cat on a mat") == 0.0
    # repeated tokens count by multiplicity: {cat:2, dog:1} & {cat:1, dog:2} = 2 tokens
    assert M.squad_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    # the maximum over the gold answers
    assert M.squad_exact_match("Denver Broncos", ["The Broncos", "the Denver Broncos."]) == 1.0
    assert M.squad_f1("Broncos", ["Denver Broncos", "Carolina Panthers"]) == pytest.approx(2 / 3)
    # both normalise to "": exact match, but v1.1's F1 is 0 (no common token)
    assert M.squad_exact_match("The", "a") == 1.0 and M.squad_f1("The", "a") == 0.0


def test_squad_scores():
    gold = {"q1": ["Denver Broncos"], "q2": ["a cat on a mat", "mat"], "q3": ["x"]}
    s = M.squad_scores({"q1": "denver broncos", "q2": "the cat sat on the mat", "q3": "x"}, gold)
    assert s.exact_match == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx((1 + 6 / 7 + 1) / 3)
    with pytest.warns(UserWarning, match="1 of 3 questions have no prediction"):
        s = M.squad_scores({"q1": "Denver Broncos", "q2": "mat"}, gold)
    assert (s.exact_match, s.missing) == (pytest.approx(2 / 3), 1)
    with pytest.raises(ValueError, match="1 prediction.* not gold questions .*'q9'"):
        M.squad_scores({"q9": "x"}, gold)
