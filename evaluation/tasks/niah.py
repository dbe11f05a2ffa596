"""Needle in a haystack, RULER style: single, multi-key (distractors), multi-value.

Needles read "One of the special magic numbers for {key} is: {value}." with a word-pair key
and a 7-digit value. ``multikey`` adds distractor needles with other keys; ``multivalue``
hides several values for the same key, and all of them must be returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from evaluation.metrics import all_numbers, exact_number, numbers_in
from evaluation.tasks.base import depths
from evaluation.tasks.needle import build_needle_prompt
from evaluation.tasks.retrieval import RetrievalTask
from evaluation.types import AnswerDetail, Outcome, Prompt

if TYPE_CHECKING:
    from evaluation.session import Session
    from worker.engine import Engine

VARIANTS = ("single", "multikey", "multivalue")
DISTRACTORS = 3
"""``multikey``: needles with other keys besides the asked one."""
VALUES = 4
"""``multivalue``: values hidden for the asked key."""

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the numbers afterwards."
)
_ADJECTIVES = (
    "amber",
    "brave",
    "calm",
    "dusty",
    "eager",
    "fancy",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lively",
    "mellow",
    "noble",
    "orange",
    "proud",
    "quiet",
    "rapid",
    "silent",
    "tidy",
)
_NOUNS = (
    "anchor",
    "badger",
    "canyon",
    "dolphin",
    "ember",
    "falcon",
    "glacier",
    "harbor",
    "island",
    "jungle",
    "kettle",
    "lantern",
    "meadow",
    "nectar",
    "orchid",
    "pebble",
    "quartz",
    "river",
    "saddle",
    "thunder",
)


@dataclass(frozen=True)
class NeedleSet:
    """The needles of one sample: the asked key, its values, and every needle placed."""

    key: str
    values: tuple[str, ...]
    needles: tuple[tuple[float, str], ...]


def needle_sentence(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def make_needles(variant: str, depth: float, seed: int) -> NeedleSet:
    """Seeded keys, values and depths; the asked key's first needle sits at ``depth``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown niah variant {variant!r}; choose from {', '.join(VARIANTS)}")
    rng = np.random.default_rng(seed)
    words = rng.permutation(len(_ADJECTIVES) * len(_NOUNS))[: 1 + DISTRACTORS]
    keys = [f"{_ADJECTIVES[w // len(_NOUNS)]}-{_NOUNS[w % len(_NOUNS)]}" for w in words]
    count = VALUES if variant == "multivalue" else 1
    values = tuple(str(v) for v in rng.choice(np.arange(1_000_000, 10_000_000), count, False))
    others = [float(d) for d in rng.uniform(0.05, 0.95, 3 + DISTRACTORS)]
    needles = [(depth, needle_sentence(keys[0], values[0]))]
    needles += [(others.pop(), needle_sentence(keys[0], v)) for v in values[1:]]
    if variant == "multikey":
        distractors = rng.choice(np.arange(1_000_000, 10_000_000), DISTRACTORS, False)
        needles += [
            (others.pop(), needle_sentence(k, str(v)))
            for k, v in zip(keys[1:], distractors, strict=True)
        ]
    return NeedleSet(keys[0], values, tuple(needles))


def question(variant: str, key: str) -> tuple[str, str]:
    """(question, answer prefix) for the asked key; no prefix is forced on the model."""
    if variant == "multivalue":
        return (
            f"What are all the special magic numbers for {key} mentioned in the provided text? "
            "Answer with the numbers only.",
            "",
        )
    return (
        f"What is the special magic number for {key} mentioned in the provided text? "
        "Answer with the number only.",
        "",
    )


def score_niah(variant: str, output: str, values: tuple[str, ...]) -> float:
    """single / multikey: the first number is the value; multivalue: all values are present."""
    if variant == "multivalue":
        return all_numbers(output, values)
    return exact_number(output, values[0])


def max_new_tokens(variant: str) -> int:
    """Room for a lead-in sentence (~16 tokens) and 7 digits plus separators per value."""
    return 16 + 10 * VALUES if variant == "multivalue" else 28


class NiahTask(RetrievalTask):
    name = "niah"
    variants = VARIANTS

    def extra_tokens(self, variant: str) -> int:
        return max_new_tokens(variant)

    def prompts(self, variant: str, context_len: int) -> list[Prompt]:
        return [
            self.prompt(variant, context_len, i, depth)
            for i, depth in enumerate(depths(self.options.samples))
        ]

    def prompt(self, variant: str, context_len: int, index: int, depth: float) -> Prompt:
        seed = self.options.seed + index
        needles = make_needles(variant, depth, seed)
        ask, prefix = question(variant, needles.key)
        built = build_needle_prompt(
            self.corpus, context_len, list(needles.needles), INSTRUCTION, ask, prefix, seed
        )
        where = ", ".join(f"{d:.3f}" for d, _ in needles.needles)
        return Prompt(
            index=index,
            seed=seed,
            ids=tuple(built.ids),
            variant=variant,
            description=(
                f"{variant}: key {needles.key} -> {', '.join(needles.values)}; "
                f"{len(needles.needles)} needles at depths {where}; {len(built.ids)} tokens"
            ),
            answers=needles.values,
            max_new_tokens=max_new_tokens(variant),
            depth=depth,
            stop_ids=self.corpus.tokenizer.eos_token_ids,
        )

    def run(
        self, session: Session, engine: Engine, prompt: Prompt, reference: Outcome | None
    ) -> Outcome:
        started = time.perf_counter()
        tokens = session.greedy(engine, list(prompt.ids), prompt.max_new_tokens, prompt.stop_ids)
        text = session.tokenizer.decode(tokens, skip_special_tokens=True)
        return Outcome(
            engine.config.policy,
            engine.config.budget,
            score_niah(prompt.variant, text, prompt.answers),
            text,
            AnswerDetail(prompt.answers, tuple(numbers_in(text))),
            time.perf_counter() - started,
        )
