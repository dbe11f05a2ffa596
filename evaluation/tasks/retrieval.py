"""What the retrieval tasks (pass key, NIAH) share: binary outcomes and their statistics.

Each sample is answered (score 1) or not (0). Besides accuracy, a policy gets its
*conditional accuracy* (of the samples ``full`` answers, the share it answers too) and, at
each budget, a paired comparison with ``oracle`` on the same samples: the share of
discordant samples (one answers, the other does not) with the exact McNemar p-value of
wins against losses. Every share carries a Wilson 95% interval and its n.
"""

from __future__ import annotations

import math

from evaluation.stats import conditional, paired, wilson
from evaluation.tasks.base import Task
from evaluation.types import Measure, Outcome

CONDITIONAL = "conditional accuracy"
VERSUS_ORACLE = "discordant vs oracle"


def answered(outcomes: list[Outcome]) -> list[bool]:
    """Which samples were answered; scores must be exactly 0 or 1."""
    assert all(o.score in (0.0, 1.0) for o in outcomes), "retrieval scores are binary"
    return [o.score == 1.0 for o in outcomes]


def share(name: str, hits: int, n: int, higher_is_better: bool = True) -> Measure:
    """``hits / n`` with its Wilson interval; NaN without interval when ``n`` is 0."""
    if n == 0:
        return Measure(name, math.nan, higher_is_better, None, 0)
    return Measure(name, hits / n, higher_is_better, wilson(hits, n), n)


class RetrievalTask(Task):
    """A task whose every sample is answered or not."""

    def measures(self, outcomes: list[Outcome]) -> list[Measure]:
        hits = answered(outcomes)
        return [share("accuracy", sum(hits), len(hits))]

    def compared(
        self, outcomes: list[Outcome], full: list[Outcome], oracle: list[Outcome] | None
    ) -> list[Measure]:
        hits = answered(outcomes)
        both, reference = conditional(hits, answered(full))
        out = [share(CONDITIONAL, both, reference)]
        if oracle is not None:
            test = paired(hits, answered(oracle), "oracle")
            m = share(VERSUS_ORACLE, test.wins + test.losses, test.samples, False)
            out.append(Measure(m.name, m.value, False, m.interval, m.samples, test))
        return out
