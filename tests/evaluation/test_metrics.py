"""Scorers of the tasks, per-step fidelity measures, and the orientation of the ratio."""

import math

import pytest
import torch

from evaluation.metrics import (
    agreement,
    all_numbers,
    exact_number,
    kl_divergence,
    numbers_in,
    perplexity,
    ratio_to_full,
    relative_l2,
    top1_agreement,
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


def test_kl_of_a_known_pair_and_of_equal_distributions():
    f64 = torch.float64
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=f64).log()  # [1, 0]: a zero probability
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=f64).log()
    kl = kl_divergence(p, q)
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); 1 ln(1/0.5) = ln 2
    assert kl.tolist() == pytest.approx([0.5 * math.log(4 / 3), math.log(2)], rel=1e-12)
    logits = torch.randn(3, 50)
    assert kl_divergence(logits, logits).tolist() == [0.0, 0.0, 0.0]
    assert kl_divergence(logits, logits + 7.0).tolist() == pytest.approx([0.0] * 3, abs=1e-12)


def test_top1_agreement_and_relative_l2():
    ref = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 0.0]])
    assert top1_agreement(ref, other).tolist() == [True, False]
    h = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert relative_l2(h, torch.tensor([[3.0, 9.0], [1.0, 0.0]])).tolist() == [1.0, 0.0]
