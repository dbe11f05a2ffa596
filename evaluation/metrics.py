"""Scorers of the synthetic tasks and the ratio to ``full``."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

_NUMBER = re.compile(r"\d+")


def numbers_in(text: str) -> list[str]:
    """Every run of digits in ``text``, in order."""
    return _NUMBER.findall(text)


def exact_number(output: str, expected: str) -> float:
    """1.0 when the first number in ``output`` is exactly ``expected``, else 0.0."""
    found = numbers_in(output)
    return float(bool(found) and found[0] == expected)


def all_numbers(output: str, expected: Sequence[str]) -> float:
    """1.0 when every expected number occurs in ``output`` (all are required), else 0.0."""
    found = set(numbers_in(output))
    return float(all(value in found for value in expected))


def perplexity(nll: float, tokens: int) -> float:
    """``exp(nll / tokens)``; summed negative log-likelihood over ``tokens`` tokens."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll / tokens)


def agreement(tokens: Sequence[int], reference: Sequence[int]) -> tuple[int, int]:
    """(positions where ``tokens`` equals ``reference``, index of the first difference).

    The first difference is ``len(reference)`` when there is none.
    """
    if len(tokens) != len(reference):
        raise ValueError(f"lengths differ: {len(tokens)} vs {len(reference)}")
    matches = sum(a == b for a, b in zip(tokens, reference, strict=True))
    first = next(
        (i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b),
        len(reference),
    )
    return matches, first


def ratio_to_full(value: float, full: float, higher_is_better: bool = True) -> float | None:
    """``value`` relative to ``full``: 1.0 is as good as full, lower is worse.

    Higher-is-better measures give ``value / full``; lower-is-better ones (perplexity)
    give ``full / value``. Equal values give 1.0; a zero denominator otherwise gives None.
    """
    if value == full:
        return 1.0
    num, den = (value, full) if higher_is_better else (full, value)
    if den == 0:
        return None
    return num / den


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) in nats per row of logits ``[N, vocab]`` -> ``[N]`` float64.

    Both are softmaxed in float64; tokens the reference gives probability 0 add nothing.
    """
    ref = torch.log_softmax(ref_logits.double(), -1)
    other = torch.log_softmax(logits.double(), -1)
    terms = ref.exp() * (ref - other)
    return torch.where(ref.exp() > 0, terms, torch.zeros_like(terms)).sum(-1)


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether each row's argmax equals the reference's: ``[N, vocab]`` -> ``[N]`` bool."""
    return torch.argmax(ref_logits, -1) == torch.argmax(logits, -1)


def relative_l2(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``|other - ref| / |ref|`` per row: ``[N, D]`` -> ``[N]`` float64."""
    ref, other = ref.double(), other.double()
    return torch.linalg.vector_norm(other - ref, dim=-1) / torch.linalg.vector_norm(ref, dim=-1)
