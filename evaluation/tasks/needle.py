"""Haystack prompts of an exact token length with sentences (needles) at given depths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.corpus import Corpus, insert_needles

FIT_TRIES = 4


@dataclass(frozen=True)
class NeedlePrompt:
    """A chat prompt: instruction, haystack with needles, question, answer prefix."""

    ids: list[int]
    """Token ids: the chat template around the user text, then the answer prefix."""
    user_text: str
    haystack: str
    """The haystack with the needles in it."""


def tolerance(context_len: int) -> int:
    """How far a built prompt may miss its target length, in tokens."""
    return max(8, context_len // 200)


def build_needle_prompt(
    corpus: Corpus,
    context_len: int,
    needles: list[tuple[float, str]],
    instruction: str,
    question: str,
    answer_prefix: str,
    seed: int,
) -> NeedlePrompt:
    """A prompt of ``context_len`` tokens (within ``tolerance``) around a seeded haystack.

    Args:
        needles: ``(depth, sentence)`` pairs; depth is relative to the haystack.
        seed: picks the haystack's window in the corpus.
    """
    tok = corpus.tokenizer
    fixed = len(tok.chat_prompt_ids(f"{instruction}\n\n\n\n{question}"))
    fixed += len(tok.encode(answer_prefix)) + sum(len(tok.encode(f" {n} ")) for _, n in needles)
    hay_tokens = context_len - fixed
    if hay_tokens < 16:
        raise ValueError(
            f"context length {context_len} leaves no room for a haystack ({fixed} tokens of "
            "instructions and needles); raise --context-len"
        )
    built = _build(corpus, hay_tokens, needles, instruction, question, answer_prefix, seed)
    for _ in range(FIT_TRIES):
        miss = context_len - len(built.ids)
        if abs(miss) <= tolerance(context_len) // 2:
            break
        hay_tokens += miss
        built = _build(corpus, hay_tokens, needles, instruction, question, answer_prefix, seed)
    return built


def _build(
    corpus: Corpus,
    hay_tokens: int,
    needles: list[tuple[float, str]],
    instruction: str,
    question: str,
    answer_prefix: str,
    seed: int,
) -> NeedlePrompt:
    haystack = corpus.window_text(hay_tokens, np.random.default_rng(seed))
    filled = insert_needles(haystack, needles)
    user_text = f"{instruction}\n\n{filled}\n\n{question}"
    tok = corpus.tokenizer
    ids = tok.chat_prompt_ids(user_text) + tok.encode(answer_prefix)
    return NeedlePrompt(ids, user_text, filled)
