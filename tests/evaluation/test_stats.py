"""Wilson and bootstrap intervals, the exact sign test, and paired counts, on known values."""

import math

import pytest

from evaluation.stats import bootstrap_mean, conditional, paired, sign_test_p, wilson
from evaluation.types import Interval, PairedTest

Z2 = 1.959963984540054**2


@pytest.mark.parametrize(
    ("hits", "n", "low", "high"),
    [
        (0, 10, 0.0, Z2 / (10 + Z2)),  # = 0.2775: the bound with no success, by hand
        (10, 10, 10 / (10 + Z2), 1.0),
        (5, 10, 0.236593, 0.763407),  # textbook: 0.2366 .. 0.7634
        (1, 1, 0.206549, 1.0),
        (1, 4, 0.045587, 0.699358),
    ],
)
def test_wilson_interval_of_known_counts(hits, n, low, high):
    got = wilson(hits, n)
    assert got.method == "wilson"
    assert got.low == pytest.approx(low, abs=1e-6)
    assert got.high == pytest.approx(high, abs=1e-6)


def test_wilson_rejects_impossible_counts():
    for hits, n in ((0, 0), (3, 2), (-1, 5)):
        with pytest.raises(ValueError):
            wilson(hits, n)


def test_bootstrap_of_a_constant_sample_is_a_point():
    assert bootstrap_mean([0.3] * 7) == Interval(0.3, 0.3, "bootstrap")
    assert bootstrap_mean([2.5]) == Interval(2.5, 2.5, "bootstrap")


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [0.0, 1.0, 0.5, 0.25, 0.75, 1.0, 0.0, 0.2]
    first, again = bootstrap_mean(values), bootstrap_mean(values)
    assert first == again
    mean = sum(values) / len(values)
    assert 0.0 <= first.low < mean < first.high <= 1.0
    assert bootstrap_mean(values, seed=1) != first
    with pytest.raises(ValueError):
        bootstrap_mean([])


@pytest.mark.parametrize(
    ("wins", "losses", "p"),
    [
        (0, 0, 1.0),
        (0, 5, 2 / 32),
        (5, 0, 2 / 32),
        (1, 4, 2 * (1 + 5) / 32),
        (3, 3, 1.0),  # 2 * 42/64 > 1 is capped
        (0, 10, 2 / 1024),
        (2, 9, 2 * (1 + 11 + 55) / 2048),
    ],
)
def test_sign_test_p_values_by_hand(wins, losses, p):
    assert sign_test_p(wins, losses) == pytest.approx(p, rel=1e-12)


def test_paired_counts_discordant_samples_each_way():
    policy = [True, False, False, False, False, True, True]
    oracle = [True, True, True, False, False, True, False]
    test = paired(policy, oracle, "oracle")
    assert test == PairedTest("oracle", wins=1, losses=2, samples=7, p_value=1.0)
    with pytest.raises(ValueError):
        paired([True], [True, False], "oracle")


def test_conditional_hits_count_only_samples_full_answers():
    policy = [True, False, True, True, False]
    full = [True, True, False, True, False]
    assert conditional(policy, full) == (2, 3)
    assert conditional([False] * 3, [False] * 3) == (0, 0)
    assert math.isclose(2 / 3, conditional(policy, full)[0] / conditional(policy, full)[1])
