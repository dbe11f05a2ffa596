"""Plan checks, summary rows against full, and the reports (no model needed)."""

import json

import pytest

from worker.eval.report import markdown_tables, plot, text_table, to_json
from worker.eval.runner import EvalPlan, EvalResult, check_plan, summarize
from worker.eval.tasks.base import Task, TaskOptions
from worker.eval.tasks.ppl import PerplexityTask
from worker.eval.types import AnswerDetail, Outcome, PerplexityDetail, SampleRecord


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
    from worker.eval.tasks.passkey import PasskeyTask

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
    assert "passkey / single" in text and "1.000 (ref)" in text
    assert "0.000 (0.0%)" in text and "1.000 (100.0%)" in text
    assert "| streaming |  | 0.000 (0.0%) | 1.000 (100.0%) |" in markdown_tables(result.rows)
    doc = json.loads(json.dumps(to_json(result, {"task": "passkey"})))
    assert set(doc) >= {"summary", "samples"}
    row = doc["summary"][1]
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
    assert doc["samples"][0]["outcomes"][0]["detail"]["expected"] == ["12345"]
    plot(tmp_path / "p.png", result.rows)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
