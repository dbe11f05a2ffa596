"""Per-step fidelity to ``full`` under teacher forcing: agreement, KL and hidden-state error.

Each sample is a seeded window of ``context_len + steps`` corpus tokens. The first
``context_len`` are prefilled (dense, the same under every policy); then each of the next
``steps`` true tokens is fed with a decode step, under ``full`` and under each policy on the
same inputs. At every step the policy's output is compared with full's: whether the argmax
agrees, KL(full || policy) of the next-token distributions, and the relative L2 error of the
final hidden state (after the last norm, before the LM head). Unlike greedy agreement, one
early difference does not change the inputs of the steps after it.

A sample's values are means over its steps; a cell reports the mean over samples with a
95% percentile bootstrap interval (resampling samples, whose steps are correlated).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from evaluation.corpus import Corpus
from evaluation.metrics import kl_divergence, relative_l2, top1_agreement
from evaluation.stats import bootstrap_mean
from evaluation.tasks.base import Task, TaskOptions
from evaluation.types import FidelityDetail, Measure, Outcome, Prompt, details_of

if TYPE_CHECKING:
    from evaluation.session import ForcedSteps, Session
    from worker.engine import Engine


@dataclass(frozen=True)
class _Reference:
    """``full``'s steps on one prompt, kept while the policies run on it."""

    ids: tuple[int, ...]
    steps: ForcedSteps


def compare_steps(ref: ForcedSteps, other: ForcedSteps) -> FidelityDetail:
    """Means over steps of top-1 agreement, KL(ref || other) and relative L2 of hidden."""
    assert ref.logits.shape == other.logits.shape, "the same steps under both"
    return FidelityDetail(
        steps=int(ref.logits.shape[0]),
        top1=float(top1_agreement(ref.logits, other.logits).double().mean()),
        kl=float(kl_divergence(ref.logits, other.logits).mean()),
        l2=float(relative_l2(ref.hidden, other.hidden).mean()),
    )


class FidelityTask(Task):
    name = "fidelity"
    variants = ("teacher-forced",)

    def __init__(self, corpus: Corpus, options: TaskOptions) -> None:
        super().__init__(corpus, options)
        self._reference: _Reference | None = None

    def extra_tokens(self, variant: str) -> int:
        return self.options.steps

    def prompts(self, variant: str, context_len: int) -> list[Prompt]:
        steps = self.options.steps
        if steps <= 0:
            raise ValueError(f"--steps must be positive, got {steps}")
        return self.windows(
            context_len + steps,
            lambda seed: (
                f"{context_len} corpus tokens (window seed {seed}) prefilled, then "
                f"{steps} true tokens fed one by one"
            ),
            scored_from=context_len,
        )

    def run(
        self, session: Session, engine: Engine, prompt: Prompt, reference: Outcome | None
    ) -> Outcome:
        started = time.perf_counter()
        steps = session.teacher_forced_steps(engine, list(prompt.ids), prompt.scored_from)
        if reference is None:  # full: the reference of the policies that follow on this prompt
            self._reference = _Reference(prompt.ids, steps)
        ref = self._reference
        assert ref is not None and ref.ids == prompt.ids, "full runs first on every prompt"
        detail = compare_steps(ref.steps, steps)
        return Outcome(
            engine.config.policy,
            engine.config.budget,
            detail.top1,
            "",
            detail,
            time.perf_counter() - started,
        )

    def measures(self, outcomes: list[Outcome]) -> list[Measure]:
        details = details_of(outcomes, FidelityDetail)

        def mean(name: str, values: list[float], higher_is_better: bool) -> Measure:
            return Measure(
                name,
                float(np.mean(values)),
                higher_is_better,
                bootstrap_mean(values),
                ratio=higher_is_better,  # full's KL and L2 are 0: no ratio to them
            )

        return [
            mean("top-1 agreement", [d.top1 for d in details], True),
            mean("KL(full||policy)", [d.kl for d in details], False),
            mean("hidden rel. L2", [d.l2 for d in details], False),
        ]
