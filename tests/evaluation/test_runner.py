"""Plan checks, summary rows against full, and the reports (no model needed)."""

import json
import math

import pytest

from evaluation.report import markdown_tables, plot, text_table, to_json
from evaluation.runner import EvalPlan, EvalResult, check_plan, summarize
from evaluation.stats import wilson
from evaluation.tasks.base import Task, TaskOptions
from evaluation.tasks.ppl import PerplexityTask
from evaluation.types import AnswerDetail, Outcome, PairedTest, PerplexityDetail, SampleRecord


class _Task(PerplexityTask):
    variants = ("a", "b")

    def extra_tokens(self, variant: str) -> int:
        return 100


def _task() -> Task:
    return _Task(None, TaskOptions())  # type: ignore[arg-type]


def _plan(**kw) -> EvalPlan:
    base = {
        "variants": ("a",),
        "context_lens": (1024,),
        "policies": ("full", "quest"),
        "budgets": (64, 128),
    }
    return EvalPlan(**{**base, **kw})


def test_pairs_put_full_first_once():
    assert _plan().pairs() == [("full", None), ("quest", 64), ("quest", 128)]


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (_plan(variants=("zzz",)), "no variant 'zzz'"),
        (_plan(policies=("full", "magic")), "unknown policy 'magic'"),
        (_plan(context_lens=(8192,)), "--context-len 8192 needs 8292 positions"),
        (_plan(budgets=(16,)), "--budget 16 is out of range"),
        (_plan(budgets=(1024,)), "--budget 1024 is out of range: it is not below"),
    ],
)
def test_bad_plans_name_the_problem(plan, message):
    with pytest.raises(ValueError, match=message):
        check_plan(_task(), plan, max_positions=8192, page_size=16)


def _ppl(policy, budget, nll, tokens=10):
    return Outcome(policy, budget, 0.0, "", PerplexityDetail(nll, tokens))


def test_summary_orients_perplexity_ratio():
    records = [
        SampleRecord(
            "ppl",
            "a",
            1024,
            0,
            i,
            "",
            1024,
            (),
            [_ppl("full", None, 10.0), _ppl("quest", 64, 12.0)],
        )
        for i in range(2)
    ]
    rows = summarize(_task(), "a", 1024, records, [("full", None), ("quest", 64)])
    full, quest = rows
    assert full.ratio_to_full == 1.0 and full.samples == 2
    assert full.score == pytest.approx(2.718281828, rel=1e-6)  # exp(20 / 20)
    assert quest.score > full.score
    assert quest.ratio_to_full == pytest.approx(full.score / quest.score)
    assert not quest.higher_is_better


def _result() -> EvalResult:
    ans = AnswerDetail(("12345",), ("12345",))
    rec = SampleRecord(
        "passkey",
        "single",
        512,
        0,
        0,
        "key 12345",
        512,
        ("12345",),
        [
            Outcome("full", None, 1.0, "12345", ans),
            Outcome("streaming", 64, 0.0, "no", AnswerDetail(("12345",), ())),
            Outcome("streaming", 128, 1.0, "12345", ans),
        ],
    )
    from evaluation.tasks.passkey import PasskeyTask

    rows = summarize(
        PasskeyTask(None, TaskOptions()),
        "single",
        512,
        [rec],  # type: ignore[arg-type]
        [("full", None), ("streaming", 64), ("streaming", 128)],
    )
    return EvalResult(rows, [rec], 1.0)


def test_reports_show_scores_and_ratios(tmp_path):
    result = _result()
    text = text_table(result.rows)
    assert "passkey / single — accuracy" in text and "1.000 [0.207, 1.000] n=1 (ref)" in text
    assert "0.000 [0.000, 0.793] n=1 (0.0%)" in text and "95% wilson intervals" in text
    assert (
        "| streaming |  | 0.000 [0.000, 0.793] n=1 (0.0%) | 1.000 [0.207, 1.000] n=1 (100.0%) |"
        in markdown_tables(result.rows)
    )
    doc = json.loads(json.dumps(to_json(result, {"task": "passkey"})))
    assert set(doc) >= {"summary", "samples"}
    row = next(r for r in doc["summary"] if (r["measure"], r["budget"]) == ("accuracy", 64))
    assert {
        k: row[k]
        for k in ("task", "variant", "policy", "budget", "context_len", "score", "ratio_to_full")
    } == {
        "task": "passkey",
        "variant": "single",
        "policy": "streaming",
        "budget": 64,
        "context_len": 512,
        "score": 0.0,
        "ratio_to_full": 0.0,
    }
    assert row["samples"] == 1 and row["interval"]["method"] == "wilson"
    assert row["interval"]["low"] == 0.0 and row["interval"]["high"] == pytest.approx(0.7935, 1e-4)
    assert doc["samples"][0]["outcomes"][0]["detail"]["expected"] == ["12345"]
    plot(tmp_path / "p.png", result.rows)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def _answers(full, oracle, stream) -> list[SampleRecord]:
    """Hand-built pass-key samples: 1 where the policy answered."""
    records = []
    for i, scores in enumerate(zip(full, oracle, stream, strict=True)):
        keys = [("full", None), ("oracle", 64), ("streaming", 64)]
        outcomes = [
            Outcome(p, b, float(s), "", AnswerDetail(("1",), ()))
            for (p, b), s in zip(keys, scores, strict=True)
        ]
        records.append(SampleRecord("passkey", "single", 512, i, i, "", 512, ("1",), outcomes))
    return records


def test_retrieval_rows_give_conditional_accuracy_and_the_paired_test_against_oracle():
    from evaluation.tasks.passkey import PasskeyTask

    records = _answers(
        full=[1, 1, 1, 1, 0, 0],
        oracle=[1, 1, 1, 0, 0, 1],
        stream=[1, 0, 0, 0, 0, 1],
    )
    pairs = [("full", None), ("oracle", 64), ("streaming", 64)]
    rows = summarize(PasskeyTask(None, TaskOptions()), "single", 512, records, pairs)  # type: ignore[arg-type]
    got = {(r.measure, r.policy): r for r in rows}
    assert sorted(got) == [
        ("accuracy", "full"),
        ("accuracy", "oracle"),
        ("accuracy", "streaming"),
        ("conditional accuracy", "full"),
        ("conditional accuracy", "oracle"),
        ("conditional accuracy", "streaming"),
        ("discordant vs oracle", "streaming"),
    ]
    acc = got[("accuracy", "streaming")]
    assert (acc.score, acc.samples, acc.ratio_to_full) == (2 / 6, 6, 0.5)
    assert acc.interval == wilson(2, 6)
    cond = {p: got[("conditional accuracy", p)] for p in ("full", "oracle", "streaming")}
    assert [(c.score, c.samples) for c in cond.values()] == [(1.0, 4), (0.75, 4), (0.25, 4)]
    assert cond["streaming"].ratio_to_full == 0.25 and cond["oracle"].interval == wilson(3, 4)
    versus = got[("discordant vs oracle", "streaming")]
    # streaming answers nothing oracle misses; oracle answers samples 1 and 2 it misses
    assert versus.paired == PairedTest("oracle", wins=0, losses=2, samples=6, p_value=0.5)
    assert (versus.score, versus.samples, versus.ratio_to_full) == (2 / 6, 6, None)
    assert versus.interval == wilson(2, 6) and not versus.higher_is_better
    text = text_table(rows)
    assert "conditional accuracy (higher is better), 512 tokens, 4 samples" in text
    assert "0.333 [0.097, 0.700] n=6 +0/-2 p=0.5" in text
    assert "exact McNemar" in markdown_tables(rows)


def test_conditional_accuracy_without_a_full_answer_is_nan_with_n_zero():
    from evaluation.tasks.passkey import PasskeyTask

    records = _answers(full=[0, 0], oracle=[1, 0], stream=[0, 0])
    pairs = [("full", None), ("oracle", 64), ("streaming", 64)]
    rows = summarize(PasskeyTask(None, TaskOptions()), "single", 512, records, pairs)  # type: ignore[arg-type]
    cond = [r for r in rows if r.measure == "conditional accuracy"]
    assert all(math.isnan(r.score) and r.samples == 0 and r.interval is None for r in cond)
    assert all(r.ratio_to_full is None for r in cond)
    assert "nan n=0" in text_table(rows)
