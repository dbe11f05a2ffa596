"""LongBench's official metrics against values computed by hand on tiny strings."""

import pytest

from worker.eval.longbench_metrics import (
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    lcs_words,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l,
    rouge_score,
    score_prediction,
)


def test_qa_f1_normalises_and_counts_tokens():
    assert normalize_answer("The Cat, sat!") == "cat sat"
    # pred tokens: cat sat on mat; truth: cat on mat -> P = 3/4, R = 1
    assert qa_f1_score("The cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    assert qa_f1_score("dog", "cat") == 0.0


def test_rouge_l_matches_the_rouge_package_by_hand():
    # hyp sentences "the cat sat" / "on the mat"; ref "the cat is on the mat".
    # LCS words: {the, cat} and {on, the, mat} -> union of 4 words; 5 unique words each side.
    ref = ["the", "cat", "is", "on", "the", "mat"]
    assert lcs_words(ref, ["on", "the", "mat"]) == ["on", "the", "mat"]
    assert rouge_l("the cat sat. on the mat", "the cat is on the mat") == pytest.approx(0.8)
    assert rouge_l("a b c", "a b c") == pytest.approx(1.0)
    assert rouge_score("", "a b c") == 0.0  # the package raises; LongBench scores 0


def test_classification_splits_credit_between_named_classes():
    classes = ["Location", "Number", "Entity"]
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Location or Number", "Location", all_classes=classes) == 0.5
    assert classification_score("Entity", "Location", all_classes=classes) == 0.0


def test_classification_drops_classes_inside_the_truth():
    classes = ["ball", "football"]
    # "ball" is a proper substring of the truth "football": dropped, leaving one match.
    assert classification_score("football", "football", all_classes=classes) == 1.0


def test_retrieval_and_count_share_of_right_numbers():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert count_score("There are 12 unique paragraphs, not 13", "12") == 0.5


def test_code_similarity_uses_first_code_line():
    # "x = foo(1)" vs "x = foo(2)": 9 of 10 characters match -> ratio 0.9.
    assert fuzz_ratio("x = foo(1)", "x = foo(2)") == 90
    assert code_sim_score("# comment\nx = foo(1)\n", "x = foo(2)") == pytest.approx(0.9)
    assert code_sim_score("```python", "x = 1") == 0.0


def test_score_prediction_takes_best_answer_and_first_line_for_fewshot():
    assert score_prediction("triviaqa", "Paris\nLondon is big", ["London", "Paris"], []) == 1.0
    assert score_prediction("hotpotqa", "London", ["Paris", "London"], []) == 1.0
