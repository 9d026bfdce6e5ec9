import pytest
from rouge_score import rouge_scorer

from pocl_ds.errors import PoclError
from pocl_ds.metrics import exact_match, normalize_answer, rouge_l

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("The runners were running quickly", "a runner runs quick"),
    (
        "Virgin Australia commenced services in 2000",
        "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single route.",
    ),
    ("completely unrelated words", "nothing in common here"),
]


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_rouge_l_equals_rouge_score_with_stemmer(prediction, reference):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = scorer.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, [reference]) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # The stemmer maps running/dogs to run/dog, so these match exactly.
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(1.0)


def test_rouge_l_takes_max_over_references():
    references = ["nothing in common", "the cat sat on the mat", "the cat"]
    scores = [rouge_l("the cat sat on a mat", [r]) for r in references]
    assert rouge_l("the cat sat on a mat", references) == max(scores)
    assert max(scores) > scores[0]


def test_rouge_l_string_reference_is_one_reference():
    assert rouge_l("hello world", "hello world") == pytest.approx(1.0)


@pytest.mark.parametrize("prediction", ["", "   ", "\n\t"])
def test_rouge_l_empty_prediction_scores_zero(prediction):
    assert rouge_l(prediction, ["a reference answer"]) == 0.0


def test_rouge_l_prediction_of_only_punctuation_scores_zero():
    assert rouge_l("?!...", ["a reference answer"]) == 0.0


def test_no_references_is_a_user_error():
    with pytest.raises(PoclError, match="no reference"):
        rouge_l("text", [])
    with pytest.raises(PoclError, match="no reference"):
        exact_match("text", [])


def test_normalize_answer():
    assert normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"


def test_exact_match():
    assert exact_match("The answer is 42.", ["answer is 42"]) == 1.0
    assert exact_match("42", ["forty-two", "42"]) == 1.0
    assert exact_match("43", ["42"]) == 0.0
    assert exact_match("", ["42"]) == 0.0
