"""Typed records of an accuracy run: inputs, per-policy outcomes, summary rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, cast


@dataclass(frozen=True)
class Prompt:
    """One sample's input; every policy runs on exactly these ids."""

    index: int
    """Position of the sample within its cell (task, variant, context length)."""
    seed: int
    """Seed the sample was generated from."""
    ids: tuple[int, ...]
    """Token ids fed to the model (the whole sequence for ``ppl`` and ``recall``)."""
    description: str
    """What the sample is, for a human auditing the run."""
    variant: str = ""
    """The task variant (niah kind, LongBench dataset) the sample belongs to."""
    answers: tuple[str, ...] = ()
    """Expected answers (retrieval, LongBench)."""
    max_new_tokens: int = 0
    """Tokens to generate (generative tasks)."""
    scored_from: int = 0
    """``ppl`` / ``recall``: ids before this index are prefilled, the rest are decoded."""
    depth: float | None = None
    """Relative depth of the (target) needle in the haystack, 0 = start, 1 = end."""
    classes: tuple[str, ...] = ()
    """LongBench classification labels (``all_classes``)."""
    stop_ids: frozenset[int] = frozenset()
    """Tokens that end generation."""


@dataclass(frozen=True)
class AnswerDetail:
    """Retrieval / QA: what was expected and what the output contained."""

    expected: tuple[str, ...]
    found: tuple[str, ...]


@dataclass(frozen=True)
class PerplexityDetail:
    """Teacher-forced scoring: summed negative log-likelihood over ``tokens`` tokens."""

    nll: float
    tokens: int


@dataclass(frozen=True)
class AgreementDetail:
    """Greedy generation compared position by position with ``full``'s."""

    tokens: int
    matches: int
    first_divergence: int
    """Index of the first token that differs from ``full``'s; ``tokens`` if none does."""
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class RecallDetail:
    """Selection quality per layer, averaged over query heads and probed steps."""

    mass: tuple[float, ...]
    """Share of the exact softmax mass carried by the selected tokens, per layer."""
    hit: tuple[float, ...]
    """Share of the exact top-k tokens (k = budget) that were selected, per layer."""
    sparse_from: int
    """First layer that selects (earlier layers attend fully)."""


@dataclass(frozen=True)
class FidelityDetail:
    """Teacher-forced steps compared with ``full``'s on the same inputs, means over steps."""

    steps: int
    top1: float
    """Share of steps whose argmax equals ``full``'s."""
    kl: float
    """Mean KL(full || policy) of the next-token distributions, in nats."""
    l2: float
    """Mean relative L2 error of the final normed hidden state, ``|h - h_full| / |h_full|``."""


Detail = AnswerDetail | PerplexityDetail | AgreementDetail | RecallDetail | FidelityDetail


@dataclass(frozen=True)
class Outcome:
    """One policy's run on one sample."""

    policy: str
    budget: int | None
    """``None`` for ``full``."""
    score: float
    """The sample's score in the task's own measure."""
    output: str
    detail: Detail
    seconds: float = 0.0


@dataclass(frozen=True)
class Interval:
    """A 95% confidence interval of a cell's value."""

    low: float
    high: float
    method: str
    """``wilson`` (a share of binary outcomes) or ``bootstrap`` (percentile, over samples)."""


@dataclass(frozen=True)
class PairedTest:
    """A policy against another on the same samples' binary outcomes (exact McNemar)."""

    against: str
    """The other policy, at the same budget."""
    wins: int
    """Samples this policy answers and the other does not."""
    losses: int
    """Samples the other answers and this policy does not."""
    samples: int
    p_value: float
    """Exact two-sided sign test of wins against losses; 1.0 with no discordant pair."""


@dataclass(frozen=True)
class Measure:
    """One aggregated number of a cell and which direction is better."""

    name: str
    value: float
    higher_is_better: bool = True
    interval: Interval | None = None
    samples: int | None = None
    """Samples behind the value when not all of the cell's (conditional accuracy)."""
    paired: PairedTest | None = None
    ratio: bool = True
    """False where a ratio to full's value means nothing (it is 0 by construction)."""


@dataclass(frozen=True)
class SampleRecord:
    """A sample with every policy's outcome, for auditing a run."""

    task: str
    variant: str
    context_len: int
    seed: int
    index: int
    description: str
    prompt_tokens: int
    answers: tuple[str, ...]
    outcomes: list[Outcome] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    """One line of the summary: a policy at a budget on one cell, against ``full``."""

    task: str
    variant: str
    measure: str
    policy: str
    budget: int | None
    context_len: int
    score: float
    ratio_to_full: float | None
    """1.0 is as good as ``full``, lower is worse; ``None`` when undefined (full scored 0,
    a measure that already compares with full, or a paired row)."""
    samples: int
    """n behind ``score`` (for conditional accuracy: the samples ``full`` answers)."""
    higher_is_better: bool = True
    interval: Interval | None = None
    """95% interval of ``score``, where the task gives one."""
    paired: PairedTest | None = None
    """The discordant pairs behind a ``vs oracle`` row."""


D = TypeVar("D", AnswerDetail, PerplexityDetail, AgreementDetail, RecallDetail, FidelityDetail)


def details_of(outcomes: list[Outcome], kind: type[D]) -> list[D]:
    """The outcomes' details, all of ``kind`` (an internal invariant of each task)."""
    out = [o.detail for o in outcomes]
    assert all(isinstance(d, kind) for d in out), f"expected {kind.__name__} details"
    return cast(list[D], out)
