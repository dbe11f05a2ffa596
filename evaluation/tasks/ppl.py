"""Teacher-forced perplexity over long text, every scored token decoded sparsely.

Each sample is a seeded window of ``context_len`` corpus tokens. The first
``context_len - span`` are prefilled; each of the last ``span`` tokens is then predicted
by a decode step over the policy's selection (the true previous token is fed, never the
model's own). The cell's perplexity is ``exp(total NLL / total scored tokens)``; the ratio
to ``full`` is full's perplexity over the policy's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from evaluation.metrics import perplexity
from evaluation.tasks.base import Task
from evaluation.types import Measure, Outcome, PerplexityDetail, Prompt, details_of

if TYPE_CHECKING:
    from evaluation.session import Session
    from worker.engine import Engine


class PerplexityTask(Task):
    name = "ppl"
    variants = ("teacher-forced",)

    def prompts(self, variant: str, context_len: int) -> list[Prompt]:
        span = self.options.span
        if not 0 < span < context_len:
            raise ValueError(f"--span {span} must be between 1 and the context length - 1")
        return self.windows(
            context_len,
            lambda seed: (
                f"{context_len} corpus tokens (window seed {seed}); the last {span} scored"
            ),
            scored_from=context_len - span,
        )

    def run(
        self, session: Session, engine: Engine, prompt: Prompt, reference: Outcome | None
    ) -> Outcome:
        started = time.perf_counter()
        nll, tokens = session.teacher_forced(engine, list(prompt.ids), prompt.scored_from)
        return Outcome(
            engine.config.policy,
            engine.config.budget,
            perplexity(nll, tokens),
            "",
            PerplexityDetail(nll, tokens),
            time.perf_counter() - started,
        )

    def measures(self, outcomes: list[Outcome]) -> list[Measure]:
        details = details_of(outcomes, PerplexityDetail)
        nll = sum(d.nll for d in details)
        tokens = sum(d.tokens for d in details)
        return [Measure("perplexity", perplexity(nll, tokens), higher_is_better=False)]
