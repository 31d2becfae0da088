"""Metrics of echokv_lab.eval.metrics against values computed by hand."""

from __future__ import annotations

import pytest

from echokv_lab.eval.metrics import (
    METRICS,
    classification_score,
    code_sim_score,
    count_score,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
    score,
    string_match_all,
    string_match_part,
)
from echokv_lab.eval.sample import Sample


def test_string_match():
    prediction = "The numbers are 123 and 456."
    assert string_match_all(prediction, ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_part(prediction, ["123", "456", "789"]) == 1.0
    assert string_match_part(prediction, ["789"]) == 0.0
    assert string_match_all("KEY abc", ["key", "ABC"]) == 1.0  # case-insensitive
    assert string_match_all("anything", []) == 0.0


def test_normalize_answer():
    assert normalize_answer("  The Eiffel-Tower, in  PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


def test_qa_f1_score():
    # "eiffel tower in paris" vs "eiffel tower": 2 common tokens, P = 2/4, R = 2/2 -> F1 = 2/3.
    assert qa_f1_score("The Eiffel Tower, in Paris!", "Eiffel tower") == pytest.approx(2 / 3)
    # Tokens count with multiplicity. "paris paris rome" vs "paris": common 1, P = 1/3, R = 1 -> F1 = 2 * (1/3) / (4/3) = 1/2.
    assert qa_f1_score("paris paris rome", "paris") == pytest.approx(0.5)
    assert qa_f1_score("London", "Paris") == 0.0
    assert qa_f1_score("The", "Paris") == 0.0  # nothing left after normalisation


def test_rouge_l_score():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6 and 6.
    assert rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS("a b c d", "b d e") = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = (2/3)/(7/6) = 4/7.
    assert rouge_l_score("a b c d", "b d e") == pytest.approx(4 / 7)
    assert rouge_l_score("Same Words HERE", "same words here") == 1.0
    assert rouge_l_score("", "x") == 0.0
    assert rouge_l_score("x y", "z") == 0.0


def test_classification_score():
    classes = ["Location", "Human", "Entity", "Date", "Date of birth"]
    assert classification_score("Location", "Location", classes) == 1.0
    assert classification_score("Location or Human", "Location", classes) == 0.5
    assert classification_score("Entity", "Location", classes) == 0.0
    assert classification_score("no idea", "Location", classes) == 0.0
    # "Date" only matches as part of the true class "Date of birth", so it is dropped: 1/1.
    assert classification_score("Date of birth", "Date of birth", classes) == 1.0


def test_retrieval_and_count():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("none", "Paragraph 3") == 0.0
    assert count_score("There are 5 unique paragraphs out of 7.", "5") == 0.5
    assert count_score("5", "5") == 1.0
    assert count_score("five", "5") == 0.0


def test_code_sim_score():
    # First line without "`", "#" or "//" is "x = foo(1)"; vs "x = foo(2)": 9 of 10 characters
    # match in each, ratio = 2 * 9 / 20 = 0.9.
    prediction = "\n```python\n# the next line\nx = foo(1)\ny = 2"
    assert code_sim_score(prediction, "x = foo(2)") == pytest.approx(0.9)
    assert code_sim_score("return a", "return a") == 1.0
    assert code_sim_score("# only comments", "x = 1") == 0.0


def test_score_registry_and_longbench_rules():
    assert set(METRICS) >= {"string_match_all", "string_match_part", "qa_f1_score", "rouge_l_score",
                            "classification_score", "retrieval_score", "count_score", "code_sim_score"}
    qa = Sample(task="triviaqa", context="c", question="q", answers=["Paris", "City of Paris"],
                metric="qa_f1_score", metadata={"first_line_only": True})
    # Best over the answers; only the first line counts for LongBench's few-shot tasks.
    assert score(qa, "\nParis\nThe capital of France is Rome") == 1.0
    qa.metadata["first_line_only"] = False
    # "paris capital of france is rome" vs "paris": P = 1/6, R = 1 -> F1 = 2/7; vs "city of paris":
    # common {of, paris} = 2, P = 2/6, R = 2/3 -> F1 = 2 * (1/3)(2/3) / 1 = 4/9 (best).
    assert score(qa, "Paris\nThe capital of France is Rome") == pytest.approx(4 / 9)
    trec = Sample(task="trec", context="c", question="q", answers=["Human"], metric="classification_score",
                  metadata={"all_classes": ["Human", "Location"]})
    assert score(trec, "Human") == 1.0
    ruler = Sample(task="niah_single_1", context="c", question="q", answers=["1234567"])
    assert score(ruler, "It is 1234567.") == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score(Sample(task="x", context="c", question="q", answers=["a"], metric="bleu"), "a")


@pytest.mark.parametrize("name", sorted(METRICS))
def test_scores_in_unit_interval(name):
    sample = Sample(task="t", context="c", question="q", answers=["Paragraph 2", "x = 1"], metric=name,
                    metadata={"all_classes": ["Paragraph 2"]})
    for prediction in ["", "Paragraph 2", "x = 1 Paragraph 2 2 2", "garbage"]:
        assert 0.0 <= score(sample, prediction) <= 1.0
