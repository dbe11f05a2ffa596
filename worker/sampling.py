"""Choosing the next token: greedy, or sampled with noise that is a function of (seed, step).

Sampling is Gumbel-max over the filtered, temperature-scaled logits: the token is
``argmax(logits / temperature + g)`` with ``g`` standard Gumbel noise drawn from a generator
keyed by ``(seed, step)`` alone. The choice of a sequence's ``step``-th token therefore
depends only on its logits, its parameters and the two numbers, never on the batch it was
decoded in or on the tokens drawn before: a seeded request is reproducible, and a sequence
rebuilt after a fault (prefill + replay) draws exactly the tokens it drew before.

Filtering follows Hugging Face's order: top-k, then top-p (nucleus) on what is left.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
import torch

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How a request chooses its tokens; the default is greedy."""

    temperature: float = 0.0
    """Softmax temperature; 0 is greedy (the argmax)."""
    top_p: float = 1.0
    """Keep the most likely tokens whose probabilities sum to at least this (0, 1]; 1: all."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0: all. 1 is greedy."""
    seed: int | None = None
    """Key of the noise (0 .. 2**64 - 1); ``None``: the scheduler picks one at submission."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:  # NaN fails too
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")

    @property
    def greedy(self) -> bool:
        """The choice is the argmax whatever the seed."""
        return self.temperature == 0.0 or self.top_k == 1

    def seeded(self) -> SamplingParams:
        """These parameters with a seed: their own, or a fresh random one."""
        if self.seed is not None:
            return self
        return replace(self, seed=random.SystemRandom().randint(0, MAX_SEED))


GREEDY = SamplingParams()


def choose(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """The token at output position ``step`` (0: the first generated) from ``logits [vocab]``."""
    if params.greedy:
        return int(torch.argmax(logits))
    assert params.seed is not None, "a sampled request needs a seed (SamplingParams.seeded)"
    x = logits.detach().to("cpu", torch.float64).numpy() / params.temperature  # [vocab]
    x = _top_p(_top_k(x, params.top_k), params.top_p)
    noise = np.random.default_rng([params.seed, step]).gumbel(size=x.shape)  # [vocab]
    return int(np.argmax(x + noise))


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` with every value below the k-th largest set to -inf (ties kept, as in HF)."""
    if k == 0 or k >= x.size:
        return x
    kth = np.partition(x, x.size - k)[x.size - k]
    return np.where(x < kth, -np.inf, x)


def _top_p(x: np.ndarray, p: float) -> np.ndarray:
    """``x`` with the tokens outside the smallest most-likely set of mass >= p set to -inf."""
    if p >= 1.0:
        return x
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    before = np.cumsum(probs) - probs  # mass of the more likely tokens
    out = x.copy()
    out[order[before >= p]] = -np.inf  # the most likely token always stays (before = 0)
    return out


__all__ = ["GREEDY", "MAX_SEED", "SamplingParams", "choose"]
