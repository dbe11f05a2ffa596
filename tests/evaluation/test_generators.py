"""Seeded generators: determinism, needle depth, needle counts, prompt length."""

import numpy as np
import pytest

from evaluation.corpus import Corpus, boundary_near, default_text, insert_needles
from evaluation.tasks import TaskOptions, make_task
from evaluation.tasks.base import depths
from evaluation.tasks.needle import tolerance
from evaluation.tasks.niah import make_needles
from evaluation.tasks.passkey import make_passkey_prompt, score_passkey

N = 2048


@pytest.fixture(scope="module")
def corpus(smollm):
    return Corpus(default_text(), smollm[1])


def _relative(text: str, part: str, region: str) -> float:
    start = text.index(region)
    return (text.index(part) - start) / len(region)


def test_default_corpus_is_pydoc_topics():
    text = default_text()
    assert len(text) > 400_000 and "for_stmt" not in text[:10] and "The " in text


def test_depths_are_spread_evenly():
    assert depths(4) == [0.125, 0.375, 0.625, 0.875]
    assert depths(1) == [0.5]


def test_needles_land_on_boundaries_at_their_depth():
    hay = "One. Two. Three. Four. Five. Six. Seven. Eight. Nine. Ten."
    assert hay[boundary_near(hay, 7) - 2 : boundary_near(hay, 7)] == ". "
    text = insert_needles(hay, [(0.0, "FIRST"), (1.0, "LAST")])
    assert text.startswith("FIRST One.") and text.endswith("Ten. LAST ")
    middle = insert_needles(hay, [(0.5, "MID")])
    assert ". MID " in middle and "  " not in middle


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_prompt_length_depth_and_key(corpus, depth):
    p = make_passkey_prompt(corpus, N, depth, seed=7)
    assert abs(len(p.ids) - N) <= tolerance(N)
    assert len(p.key) == 5 and p.key.isdigit()
    hay = p.user_text.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
    assert abs(_relative(p.user_text, f"The pass key is {p.key}", hay) - depth) < 0.05
    assert p.user_text.count(p.key) == 2  # the needle names it twice, nothing else does


def test_passkey_is_seeded(corpus):
    a, b = (make_passkey_prompt(corpus, 1024, 0.5, seed=3) for _ in range(2))
    c = make_passkey_prompt(corpus, 1024, 0.5, seed=4)
    assert a == b
    assert a.key != c.key and a.ids != c.ids
    assert score_passkey(f"The pass key is {a.key}.", a.key) == 1.0
    assert score_passkey("The pass key is 00000.", a.key) == 0.0


@pytest.mark.parametrize(
    ("variant", "needles", "values"), [("single", 1, 1), ("multikey", 4, 1), ("multivalue", 4, 4)]
)
def test_niah_variants_have_the_right_needles(variant, needles, values):
    s = make_needles(variant, 0.3, seed=5)
    assert len(s.needles) == needles and len(s.values) == values
    assert s.needles[0][0] == 0.3  # the asked key's first needle sits at the sample's depth
    asked = [n for _, n in s.needles if s.key in n]
    assert len(asked) == values  # distractors use other keys
    assert all(len(v) == 7 for v in s.values) and len(set(s.values)) == values
    assert make_needles(variant, 0.3, seed=5) == s


def test_niah_prompts_hold_every_needle(corpus):
    task = make_task("niah", corpus, TaskOptions(samples=2, seed=1))
    prompts = task.prompts("multivalue", N)
    assert [p.depth for p in prompts] == [0.25, 0.75]
    for p in prompts:
        text = corpus.tokenizer.decode(p.ids)
        assert abs(len(p.ids) - N) <= tolerance(N)
        assert all(v in text for v in p.answers) and len(p.answers) == 4
        assert "What are all the special magic numbers" in text
    assert task.prompts("multivalue", N) == prompts


def test_fidelity_prompts_have_exact_lengths(corpus):
    options = TaskOptions(samples=2, seed=0, span=64, gen_tokens=32, probes=4)
    ppl = make_task("ppl", corpus, options).prompts("teacher-forced", 1000)
    assert [len(p.ids) for p in ppl] == [1000, 1000] and ppl[0].scored_from == 936
    assert ppl[0].ids != ppl[1].ids
    agree = make_task("agreement", corpus, options).prompts("greedy", 1000)
    assert [len(p.ids) for p in agree] == [968, 968] and agree[0].max_new_tokens == 32
    recall = make_task("recall", corpus, options).prompts("selection", 1000)
    assert recall[0].scored_from == 1000 - 4 - 1
    window = corpus.window_ids(1000, np.random.default_rng(0))
    assert list(ppl[0].ids) == window  # the same seed gives the same window


def test_short_text_file_repeats(smollm):
    corpus = Corpus("tiny text. ", smollm[1])
    assert len(corpus.window_ids(50, np.random.default_rng(0))) == 50
