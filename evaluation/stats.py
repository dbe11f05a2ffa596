"""Intervals and paired tests for accuracy cells with few samples (pure Python/NumPy).

- Binary outcomes (retrieval): Wilson score interval of a share, and the exact two-sided
  sign test (McNemar's exact test) on the discordant pairs of two policies.
- Continuous per-sample values (fidelity): percentile bootstrap interval of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from evaluation.types import Interval, PairedTest

Z95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal."""
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson(successes: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of ``successes / n`` (95% by default); ``n`` must be > 0."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0 or n successes the bound is 0 or 1 exactly; keep it so despite rounding
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(low, high, "wilson")


def bootstrap_mean(
    values: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (resampling whole values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)  # [resamples]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    # a constant sample gives a point, not a rounding-wide interval around it
    return Interval(
        float(np.clip(low, x.min(), x.max())), float(np.clip(high, x.min(), x.max())), "bootstrap"
    )


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided p-value that wins and losses are equally likely (McNemar exact).

    ``2 * P(X <= min(wins, losses))`` for ``X ~ Binomial(wins + losses, 1/2)``, at most 1;
    1.0 when there are no discordant pairs.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(answered: Sequence[bool], other: Sequence[bool], against: str) -> PairedTest:
    """Discordant pairs of two policies' binary outcomes on the same samples."""
    if len(answered) != len(other):
        raise ValueError(f"paired outcomes differ in length: {len(answered)} vs {len(other)}")
    if not answered:
        raise ValueError("a paired test needs at least one sample")
    wins = sum(a and not b for a, b in zip(answered, other, strict=True))
    losses = sum(b and not a for a, b in zip(answered, other, strict=True))
    return PairedTest(against, wins, losses, len(answered), sign_test_p(wins, losses))


def conditional(answered: Sequence[bool], reference: Sequence[bool]) -> tuple[int, int]:
    """(samples both answer, samples ``reference`` answers): the policy's conditional hits."""
    if len(answered) != len(reference):
        raise ValueError(f"outcomes differ in length: {len(answered)} vs {len(reference)}")
    hits = sum(a and r for a, r in zip(answered, reference, strict=True))
    return hits, sum(reference)
