"""What every task provides: seeded prompts, one policy's run, and the cell's measures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from worker.eval.corpus import Corpus
from worker.eval.types import Measure, Outcome, Prompt

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.eval.session import Session


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
