"""Scorers of the synthetic tasks and the orientation of the ratio to full."""

import math

import pytest

from worker.eval.metrics import (
    agreement,
    all_numbers,
    exact_number,
    numbers_in,
    perplexity,
    ratio_to_full,
)


def test_exact_number_takes_the_first_number_only():
    assert exact_number("The pass key is 12345.", "12345") == 1.0
    assert exact_number("12346 or maybe 12345", "12345") == 0.0
    assert exact_number("no digits here", "12345") == 0.0
    assert exact_number("The pass key is 123456.", "12345") == 0.0  # a longer number is wrong


def test_all_numbers_requires_every_value():
    values = ("1111111", "2222222", "3333333")
    assert all_numbers("1111111, 2222222 and 3333333", values) == 1.0
    assert all_numbers("3333333 2222222 1111111 4444444", values) == 1.0
    assert all_numbers("1111111, 2222222", values) == 0.0
    assert numbers_in("a1b22c333") == ["1", "22", "333"]


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_agreement_counts_matches_and_finds_first_divergence():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (4, 4)
    assert agreement([1, 9, 3, 4], [1, 2, 3, 4]) == (3, 1)
    assert agreement([9, 9, 9, 9], [1, 2, 3, 4]) == (0, 0)
    with pytest.raises(ValueError):
        agreement([1], [1, 2])


def test_ratio_is_one_at_full_and_lower_when_worse_in_both_orientations():
    assert ratio_to_full(0.5, 1.0) == 0.5  # accuracy: policy / full
    assert ratio_to_full(12.0, 10.0, higher_is_better=False) == pytest.approx(10 / 12)  # ppl
    assert ratio_to_full(10.0, 10.0, higher_is_better=False) == 1.0
    assert ratio_to_full(8.0, 10.0, higher_is_better=False) > 1.0  # better than full
    assert ratio_to_full(0.0, 0.0) == 1.0
    assert ratio_to_full(0.5, 0.0) is None
