"""Long greedy generation compared token by token with ``full`` (the chain-of-thought case).

Each sample is a seeded window of ``context_len - gen_tokens`` corpus tokens, continued
greedily for ``gen_tokens`` tokens (end-of-sequence does not stop it, so every policy
produces the same count). Measures: the share of positions where the policy's token equals
``full``'s, and the position of the first divergence (``gen_tokens`` when none).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from evaluation.metrics import agreement
from evaluation.tasks.base import Task
from evaluation.types import AgreementDetail, Measure, Outcome, Prompt, details_of

if TYPE_CHECKING:
    from evaluation.session import Session
    from worker.engine import Engine


class AgreementTask(Task):
    name = "agreement"
    variants = ("greedy",)

    def prompts(self, variant: str, context_len: int) -> list[Prompt]:
        gen = self.options.gen_tokens
        if not 0 < gen < context_len:
            raise ValueError(f"--gen-tokens {gen} must be between 1 and the context length - 1")
        return self.windows(
            context_len - gen,
            lambda seed: (
                f"{context_len - gen} corpus tokens (window seed {seed}), then {gen} greedy tokens"
            ),
            max_new_tokens=gen,
        )

    def run(
        self, session: Session, engine: Engine, prompt: Prompt, reference: Outcome | None
    ) -> Outcome:
        started = time.perf_counter()
        tokens = session.greedy(engine, list(prompt.ids), prompt.max_new_tokens)
        if reference is None:
            matches, first = len(tokens), len(tokens)
        else:
            assert isinstance(reference.detail, AgreementDetail)
            matches, first = agreement(tokens, reference.detail.token_ids)
        return Outcome(
            engine.config.policy,
            engine.config.budget,
            matches / len(tokens),
            session.tokenizer.decode(tokens),
            AgreementDetail(len(tokens), matches, first, tuple(tokens)),
            time.perf_counter() - started,
        )

    def measures(self, outcomes: list[Outcome]) -> list[Measure]:
        details = details_of(outcomes, AgreementDetail)
        return [
            Measure("token agreement", float(np.mean([o.score for o in outcomes]))),
            Measure(
                "first divergence",
                float(np.mean([d.first_divergence for d in details])),
            ),
        ]
