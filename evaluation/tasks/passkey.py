"""Pass-key retrieval: a 5-digit key hidden in long text; exact match of the answer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from evaluation.corpus import Corpus
from evaluation.metrics import exact_number, numbers_in
from evaluation.tasks.base import depths
from evaluation.tasks.needle import build_needle_prompt
from evaluation.tasks.retrieval import RetrievalTask
from evaluation.types import AnswerDetail, Outcome, Prompt

if TYPE_CHECKING:
    from evaluation.session import Session
    from worker.engine import Engine

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = ""
"""Nothing is put in the assistant's mouth: the embedded model answers "The pass key is
NNNNN." on its own, and a forced prefix makes it ramble instead."""
MAX_NEW_TOKENS = 14
"""Room for "The pass key is", a space, five digits and a period."""


@dataclass(frozen=True)
class PasskeyPrompt:
    """A built pass-key prompt and what answers it."""

    ids: list[int]
    key: str
    depth: float
    user_text: str


def needle_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def make_passkey_prompt(corpus: Corpus, context_len: int, depth: float, seed: int) -> PasskeyPrompt:
    """A chat prompt of ~``context_len`` tokens with a seeded 5-digit key at ``depth``.

    Depth is relative to the haystack (0 = start, 1 = end); the prompt ends where the
    assistant's answer starts.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    key = str(np.random.default_rng(seed).integers(10_000, 100_000))
    built = build_needle_prompt(
        corpus,
        context_len,
        [(depth, needle_sentence(key))],
        INSTRUCTION,
        QUESTION,
        ANSWER_PREFIX,
        seed,
    )
    return PasskeyPrompt(built.ids, key, depth, built.user_text)


def score_passkey(output: str, key: str) -> float:
    """1.0 when the first number of the answer is exactly the key, else 0.0."""
    return exact_number(output, key)


class PasskeyTask(RetrievalTask):
    name = "passkey"
    variants = ("single",)

    def extra_tokens(self, variant: str) -> int:
        return MAX_NEW_TOKENS

    def prompts(self, variant: str, context_len: int) -> list[Prompt]:
        out = []
        for i, depth in enumerate(depths(self.options.samples)):
            seed = self.options.seed + i
            p = make_passkey_prompt(self.corpus, context_len, depth, seed)
            out.append(
                Prompt(
                    index=i,
                    seed=seed,
                    ids=tuple(p.ids),
                    description=f"pass key {p.key} at depth {depth:.3f} of {len(p.ids)} tokens",
                    answers=(p.key,),
                    max_new_tokens=MAX_NEW_TOKENS,
                    depth=depth,
                    stop_ids=self.corpus.tokenizer.eos_token_ids,
                )
            )
        return out

    def run(
        self, session: Session, engine: Engine, prompt: Prompt, reference: Outcome | None
    ) -> Outcome:
        started = time.perf_counter()
        tokens = session.greedy(engine, list(prompt.ids), prompt.max_new_tokens, prompt.stop_ids)
        text = session.tokenizer.decode(tokens, skip_special_tokens=True)
        return Outcome(
            engine.config.policy,
            engine.config.budget,
            score_passkey(text, prompt.answers[0]),
            text,
            AnswerDetail(prompt.answers, tuple(numbers_in(text))),
            time.perf_counter() - started,
        )
