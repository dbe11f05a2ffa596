"""Choosing the next token: greedy, or sampled with noise that is a function of (seed, step).

Sampling is Gumbel-max over the filtered, temperature-scaled logits: the token is
``argmax(logits / temperature + g)`` with ``g`` standard Gumbel noise drawn from a generator
keyed by ``(seed, step)`` alone. The choice of a sequence's ``step``-th token therefore
depends only on its logits, its parameters and the two numbers, never on the batch it was
decoded in or on the tokens drawn before: a seeded request is reproducible, and a sequence
rebuilt after a fault (prefill + replay) draws exactly the tokens it drew before.

Filtering follows Hugging Face's order: top-k, then top-p (nucleus) on what is left.

``SamplingParams`` is the one declaration of the sampling parameters: the worker reads each
field from the ``GenerateRequest`` field of the same name (``from_message``), the clients
set them by name (``worker.client.generate_request``), ``icecache generate`` takes them as
flags (``cache_service.settings``) and the HTTP API as body fields
(``worker.serving.openai_schema``). A new parameter is a field here (with its check in
``__post_init__`` and its use in ``choose``) and the same-named ``optional`` field of
``GenerateRequest`` in ``proto/icecache/v1/worker.proto``; a test names any it lacks.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cache_service import settings
from cache_service.settings import setting

if TYPE_CHECKING:  # the clients import the parameters without loading torch
    import torch

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How a request chooses its tokens; the default is greedy."""

    temperature: float = setting(0.0, "softmax temperature, >= 0; 0 is greedy (the argmax)")
    top_p: float = setting(
        1.0, "keep the likeliest tokens whose probabilities sum to at least this, (0, 1]; 1: all"
    )
    top_k: int = setting(0, "keep only the k likeliest tokens; 0: all, 1: greedy")
    seed: int | None = setting(
        None,
        f"key of the noise of a sampled request, 0..{MAX_SEED}; unset: one is chosen at "
        "submission and reported",
        flags=("--sample-seed",),  # --seed is the engine's clustering seed
    )

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:  # NaN fails too
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The parameters, by the name they have everywhere (message fields, body fields)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_message(cls, message: _Message) -> SamplingParams:
        """The parameters a message sets (a ``GenerateRequest``), the defaults for the rest;
        ``ValueError`` says which is wrong."""
        return cls(**{n: getattr(message, n) for n in cls.names() if message.HasField(n)})

    @classmethod
    def check_names(cls, given: Mapping[str, Any]) -> None:
        """``TypeError`` naming what in ``given`` is no sampling parameter."""
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"unknown sampling parameter(s) {', '.join(unknown)}; "
                f"the parameters are {', '.join(cls.names())}"
            )

    @property
    def greedy(self) -> bool:
        """The choice is the argmax whatever the seed."""
        return self.temperature == 0.0 or self.top_k == 1

    def seeded(self) -> SamplingParams:
        """These parameters with a seed: their own, or a fresh random one."""
        if self.seed is not None:
            return self
        return replace(self, seed=random.SystemRandom().randint(0, MAX_SEED))


FLAG_PREFIX = "sample_"
"""Where the flags land in parsed arguments (``args.sample_seed``: apart from ``--seed``)."""


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per parameter (``--temperature``, ``--top-p``, ``--top-k``, ``--sample-seed``);
    left out: greedy."""
    settings.add_arguments(parser, SamplingParams, dest_prefix=FLAG_PREFIX)


def from_flags(args: argparse.Namespace) -> SamplingParams:
    """The parameters ``add_flags`` parsed; ``ValueError`` says which is wrong."""
    return settings.from_args(SamplingParams, args, dest_prefix=FLAG_PREFIX)


class _Message(Protocol):
    """A protobuf message with the parameters as ``optional`` fields."""

    def HasField(self, name: str) -> bool: ...  # noqa: N802 (protobuf's name)


GREEDY = SamplingParams()


def choose(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """The token at output position ``step`` (0: the first generated) from ``logits [vocab]``."""
    if params.greedy:
        return int(logits.argmax())
    assert params.seed is not None, "a sampled request needs a seed (SamplingParams.seeded)"
    x = logits.detach().cpu().double().numpy() / params.temperature  # [vocab]
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


__all__ = ["GREEDY", "MAX_SEED", "SamplingParams", "add_flags", "choose", "from_flags"]
