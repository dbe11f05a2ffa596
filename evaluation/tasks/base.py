"""What every task provides: seeded prompts, one policy's run, and the cell's measures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from evaluation.corpus import Corpus
from evaluation.types import Measure, Outcome, Prompt

if TYPE_CHECKING:
    from evaluation.session import Session
    from worker.engine import Engine


@dataclass(frozen=True)
class TaskOptions:
    """Task knobs from the command line."""

    samples: int = 4
    """Samples per cell (task, variant, context length)."""
    seed: int = 0
    """Base seed; sample ``i`` of a cell uses ``seed + i``."""
    span: int = 256
    """``ppl``: scored tokens at the end of each sequence."""
    gen_tokens: int = 256
    """``agreement``: greedy tokens generated after the prompt."""
    probes: int = 16
    """``recall``: decode steps whose selections are compared with exact attention."""
    steps: int = 64
    """``fidelity``: true tokens fed one by one after the prefill of ``context_len``."""


class Task(ABC):
    """A measure of a policy against ``full`` on identical inputs."""

    name: ClassVar[str]
    variants: ClassVar[tuple[str, ...]] = ("default",)
    """Selectable variants; the first is the default."""

    def __init__(self, corpus: Corpus, options: TaskOptions) -> None:
        self.corpus = corpus
        self.options = options

    def windows(
        self,
        length: int,
        describe: Callable[[int], str],
        scored_from: int = 0,
        max_new_tokens: int = 0,
    ) -> list[Prompt]:
        """``options.samples`` seeded windows of ``length`` corpus tokens; sample ``i`` is
        drawn with seed ``options.seed + i`` and described by ``describe(seed)``."""
        out = []
        for i in range(self.options.samples):
            seed = self.options.seed + i
            ids = self.corpus.window_ids(length, np.random.default_rng(seed))
            out.append(
                Prompt(
                    index=i,
                    seed=seed,
                    ids=tuple(ids),
                    scored_from=scored_from,
                    max_new_tokens=max_new_tokens,
                    description=describe(seed),
                )
            )
        return out

    def extra_tokens(self, variant: str) -> int:
        """Positions the task needs beyond ``context_len`` (generated tokens)."""
        return 0

    @abstractmethod
    def prompts(self, variant: str, context_len: int) -> list[Prompt]:
        """``options.samples`` seeded inputs of about ``context_len`` tokens."""

    @abstractmethod
    def run(
        self, session: Session, engine: Engine, prompt: Prompt, reference: Outcome | None
    ) -> Outcome:
        """One policy on one prompt; ``reference`` is ``full``'s outcome (None for full)."""

    @abstractmethod
    def measures(self, outcomes: list[Outcome]) -> list[Measure]:
        """The cell's aggregated numbers from one policy's outcomes over its samples."""

    def compared(
        self, outcomes: list[Outcome], full: list[Outcome], oracle: list[Outcome] | None
    ) -> list[Measure]:
        """Numbers of one policy paired with ``full``'s and ``oracle``'s outcomes on the
        same samples (``oracle`` at the same budget, ``None`` for full, oracle itself, or
        when oracle did not run); none unless the task defines them."""
        return []


def depths(samples: int) -> list[float]:
    """Needle depths spread evenly: the middles of ``samples`` equal slices of [0, 1]."""
    return [(i + 0.5) / samples for i in range(samples)]
