"""Per-step fidelity: exact on hand-built steps, and on the embedded model under teacher forcing."""

import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.corpus import Corpus, default_text
from evaluation.session import ForcedSteps, Session, SessionConfig
from evaluation.tasks import TaskOptions, make_task
from evaluation.tasks.fidelity import compare_steps
from evaluation.types import FidelityDetail, Interval, Outcome
from worker.factory import open_local


def test_compare_steps_on_hand_built_steps():
    f64 = torch.float64
    ref = ForcedSteps(
        torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=f64).log(),
        torch.tensor([[3.0, 4.0], [1.0, 0.0]]),
    )
    other = ForcedSteps(
        torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=f64).log(),
        torch.tensor([[3.0, 9.0], [1.0, 0.0]]),
    )
    assert compare_steps(ref, ref) == FidelityDetail(2, 1.0, 0.0, 0.0)
    got = compare_steps(ref, other)
    assert got.steps == 2 and got.top1 == 0.5  # step 0: argmax 0 (tie, first) vs 1
    assert got.kl == pytest.approx(0.5 * (0.5 * math.log(4 / 3)), rel=1e-12)  # mean over 2
    assert got.l2 == pytest.approx(0.5)  # |[0, 5]| / |[3, 4]| = 1, then 0


def test_measures_bootstrap_over_samples_and_give_no_ratio_to_a_zero():
    task = make_task("fidelity", None, TaskOptions())  # type: ignore[arg-type]
    same = [Outcome("full", None, 1.0, "", FidelityDetail(4, 1.0, 0.0, 0.0))] * 3
    top1, kl, l2 = task.measures(same)
    assert (top1.name, kl.name, l2.name) == (
        "top-1 agreement",
        "KL(full||policy)",
        "hidden rel. L2",
    )
    assert top1.interval == Interval(1.0, 1.0, "bootstrap") and top1.ratio
    assert kl.interval == Interval(0.0, 0.0, "bootstrap") and not kl.ratio
    assert not kl.higher_is_better and not l2.higher_is_better and not l2.ratio
    mixed = [
        Outcome("quest", 64, t, "", FidelityDetail(4, t, k, 0.1))
        for t, k in ((1.0, 0.0), (0.5, 0.2), (0.75, 0.1))
    ]
    top1, kl, _ = task.measures(mixed)
    assert top1.value == pytest.approx(0.75) and kl.value == pytest.approx(0.1)
    assert 0.5 <= top1.interval.low < 0.75 < top1.interval.high <= 1.0


@pytest.fixture(scope="module")
def session(smollm):
    model, tokenizer = smollm
    return Session(model, tokenizer, open_local(model), SessionConfig())


def test_hidden_state_is_the_final_norm_output_behind_the_logits(session):
    ids = session.tokenizer.encode(default_text())[:70]
    steps = session.teacher_forced_steps(session.engine("full", None, 80), ids, 64)
    session.forget()
    model = session.model
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    assert steps.logits.shape == (6, model.config.vocab_size)
    assert steps.hidden.shape == (6, model.config.hidden_size)
    assert torch.allclose(F.linear(steps.hidden, head), steps.logits, atol=1e-4)
    with pytest.raises(ValueError, match="prefix"):
        session.teacher_forced_steps(session.engine("full", None, 80), ids, 70)


def test_a_policy_that_sees_everything_matches_full_exactly(session):
    corpus = Corpus(default_text(), session.tokenizer)
    task = make_task("fidelity", corpus, TaskOptions(samples=1, steps=4))
    prompt = task.prompts("teacher-forced", 128)[0]
    assert len(prompt.ids) == 132 and prompt.scored_from == 128
    full = task.run(session, session.engine("full", None, 140), prompt, None)
    whole = task.run(session, session.engine("streaming", 256, 140), prompt, full)
    short = task.run(session, session.engine("streaming", 64, 140), prompt, full)
    session.forget()
    assert full.detail == FidelityDetail(4, 1.0, 0.0, 0.0)
    assert whole.detail == FidelityDetail(4, 1.0, 0.0, 0.0)  # budget 256 covers all 132 tokens
    assert short.detail.kl > 0.0 and short.detail.l2 > 0.0
    assert short.score == short.detail.top1
