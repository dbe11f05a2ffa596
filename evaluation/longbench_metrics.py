"""LongBench's official metrics, re-implemented without their third-party packages.

Each function follows LongBench's ``metrics.py`` line for line in behaviour:

- ``qa_f1_score``: SQuAD normalisation, token-level F1.
- ``rouge_score``: ``rouge`` 1.0.1's ROUGE-L F (summary level): sentences split on ".",
  words on spaces, unique-word counts and a union of LCS words, as that package computes
  it. (Its recursive LCS reconstruction can overflow the stack on long texts, which the
  official scorer silently scores 0; ours is iterative and scores them.)
- ``classification_score``, ``retrieval_score``, ``count_score``: as published.
- ``code_sim_score``: ``fuzzywuzzy.fuzz.ratio`` on the first code line, using difflib's
  ``SequenceMatcher`` (fuzzywuzzy's pure-Python path).
- Chinese variants segment words with ``jieba`` (an optional install).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher

_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛"
    "〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower case, no (Chinese or ASCII) punctuation, no whitespace."""
    drop = set(string.punctuation + _CN_PUNCTUATION)
    return "".join("".join(ch for ch in s.lower() if ch not in drop).split())


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1."""
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: object) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    pred = [normalize_zh_answer(t) for t in _jieba_cut(prediction)]
    truth = [normalize_zh_answer(t) for t in _jieba_cut(ground_truth)]
    return f1_score([t for t in pred if t], [t for t in truth if t])


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(
            "Chinese LongBench datasets need jieba for word segmentation: pip install jieba"
        ) from None
    return list(jieba.cut(text, cut_all=False))


def _sentences(text: str) -> list[str]:
    """``rouge``'s split: on ".", each piece's whitespace collapsed, empty pieces dropped."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def lcs_words(x: list[str], y: list[str]) -> list[str]:
    """The LCS of two word lists, reconstructed with ``rouge``'s tie-break (left first)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    out: list[str] = []
    i, j = len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F as ``rouge.Rouge().get_scores(...)["rouge-l"]["f"]`` (v1.0.1).

    Raises ``ValueError`` when either side has no sentence (as the package does).
    """
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        raise ValueError("Collections must contain at least 1 sentence.")
    words = lambda sents: [w for s in sents for w in s.split(" ")]  # noqa: E731
    m, n = len(set(words(ref))), len(set(words(hyp)))
    union: set[str] = set()
    overlap = 0
    for ref_sentence in ref:
        before = len(union)
        for hyp_sentence in hyp:
            union |= set(lcs_words(ref_sentence.split(" "), hyp_sentence.split(" ")))
        overlap += len(union) - before
    recall, precision = overlap / m, overlap / n
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F; 0.0 where the package would raise (an empty side)."""
    try:
        return rouge_l(prediction, ground_truth)
    except ValueError:
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification_score(
    prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_: object
) -> float:
    """1 / (number of classes named) if the right one is among them, else 0.

    As published, a named class that is a proper substring of the truth is dropped, with the
    original's remove-while-iterating behaviour (a class right after a dropped one is kept).
    """
    matches = [c for c in all_classes if c in prediction]
    for term in list(_iterate_like_remove(matches, ground_truth)):
        matches.remove(term)
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def _iterate_like_remove(matches: list[str], ground_truth: str) -> list[str]:
    """The terms the original loop removes (it skips the element after each removal)."""
    removed, i, items = [], 0, list(matches)
    while i < len(items):
        term = items[i]
        if term in ground_truth and term != ground_truth:
            removed.append(term)
            items.pop(i)
        i += 1
    return removed


def _id_share(prediction: str, truth_id: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == truth_id for number in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Share of the numbers in the prediction that are the right paragraph's."""
    return _id_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    return _id_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Share of the numbers in the prediction that equal the count."""
    return _id_share(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **_: object) -> float:
    """fuzz.ratio / 100 between the first non-comment, non-fence line and the truth."""
    line = next(
        (
            ln
            for ln in prediction.lstrip("\n").split("\n")
            if "`" not in ln and "#" not in ln and "//" not in ln
        ),
        "",
    )
    return fuzz_ratio(line, ground_truth) / 100


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` (pure-Python path): rounded 100 x difflib ratio."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * SequenceMatcher(None, a, b).ratio()))


Metric = Callable[..., float]
DATASET_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score_prediction(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str]
) -> float:
    """LongBench's per-sample score: the best metric value over the reference answers."""
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET_METRIC[dataset]
    return max(
        (metric(prediction, truth, all_classes=all_classes) for truth in answers), default=0.0
    )
