"""LongBench's official metrics against values computed by hand on tiny strings, and against
the packages LongBench's own ``metrics.py`` calls (``rouge`` 1.0.1, ``fuzzywuzzy`` without
python-Levenshtein, ``jieba``) on fixed cases."""

import difflib
import warnings

import jieba
import pytest
from rouge import Rouge

from evaluation.longbench_metrics import (
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    lcs_words,
    normalize_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    rouge_l,
    rouge_score,
    rouge_zh_score,
    score_prediction,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Using slow pure-python SequenceMatcher": the path we want
    from fuzzywuzzy import fuzz


def reference_rouge(prediction, ground_truth):
    """LongBench's ``rouge_score``: the package's ROUGE-L F, 0.0 when it raises."""
    try:
        return Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
    except Exception:  # LongBench catches everything (a bare except)
        return 0.0


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


# ---- against the reference packages ---------------------------------------------------------
ROUGE_CASES = [
    ("the cat sat. on the mat", "the cat is on the mat"),
    ("The Cat sat on the mat.", "the cat sat on the mat"),  # case counts
    ("a b a b. b a", "a a b. b b a a"),  # repeated words, LCS union across sentences
    ("first sentence here. second one there. third", "second one. first here"),
    ("no overlap at all", "completely different words"),
    ("  spaced   out \n words. ", "spaced words"),
    ("1.5 million people", "about 1.5 million"),  # the "." of a number splits sentences too
    ("", "a b c"),  # the package raises on an empty side: 0.0
    ("...", "a"),
]


@pytest.mark.parametrize(("prediction", "truth"), ROUGE_CASES)
def test_rouge_score_equals_the_rouge_package(prediction, truth):
    assert rouge_score(prediction, truth) == pytest.approx(reference_rouge(prediction, truth))


def test_a_sentence_too_long_for_the_packages_recursion_is_scored_not_zeroed():
    """The one known difference: ``rouge`` rebuilds the LCS recursively and overflows the
    stack on a pair of sentences of ~1,000 words; LongBench then scores 0, we score it."""
    text = " ".join(["word"] * 1200)
    with pytest.raises(RecursionError):  # which LongBench's bare except turns into 0.0
        Rouge().get_scores([text], [text])
    assert rouge_score(text, text) == pytest.approx(1.0)


FUZZ_CASES = [
    ("x = foo(1)", "x = foo(2)"),
    ("return a + b", "return a+b"),
    ("", "abc"),
    ("abc", "abc"),
    ("def f(x):", "async def f(x, y):"),
    ("self.assertEqual(" + "a" * 250 + ")", "self.assertEqual(" + "a" * 240 + "b)"),  # autojunk
    ("naïve = 'é'", "naive = 'e'"),
]


@pytest.mark.parametrize(("a", "b"), FUZZ_CASES)
def test_fuzz_ratio_equals_fuzzywuzzy(a, b):
    assert fuzz.SequenceMatcher is difflib.SequenceMatcher, "fuzzywuzzy's C path is installed"
    assert fuzz_ratio(a, b) == fuzz.ratio(a, b)
    assert code_sim_score(f"```python\n# first\n{a}\n", b) == fuzz.ratio(a, b) / 100


def test_chinese_metrics_segment_with_jieba():
    assert list(jieba.cut("北京是中国的首都。", cut_all=False)) == [
        "北京",
        "是",
        "中国",
        "的",
        "首都",
        "。",
    ]
    assert list(jieba.cut("我喜欢北京", cut_all=False)) == ["我", "喜欢", "北京"]
    # "。" is dropped by the normalisation: 5 predicted words, 3 true, 1 shared ->
    # P = 1/5, R = 1/3, F1 = 1/4
    assert qa_f1_zh_score("北京是中国的首都。", "我喜欢北京") == pytest.approx(0.25)
    # ROUGE-L over words: LCS 中国 的 首都 of 6 unique predicted, 5 true words -> F = 6/11
    prediction, truth = "北京是中国的首都。", "中国的首都是北京"
    assert rouge_zh_score(prediction, truth) == pytest.approx(6 / 11)
    segmented = [" ".join(jieba.cut(t, cut_all=False)) for t in (prediction, truth)]
    assert rouge_zh_score(prediction, truth) == pytest.approx(reference_rouge(*segmented))


def test_classification_keeps_the_class_after_a_dropped_one_as_published():
    # matches in class order: ball, all, football; LongBench removes while iterating, so
    # after dropping "ball" (inside "football") it skips "all": 2 classes remain -> 1/2
    classes = ["ball", "all", "football"]
    assert classification_score("football all ball", "football", all_classes=classes) == 0.5
