"""CI smoke set of bench/selection.py's speed part: a small store through the real path."""

import math

import pytest

from bench.selection import measure_speed


@pytest.mark.parametrize("policy", ["icecache-tokens", "icecache"])
def test_the_speed_part_runs_on_a_small_store(policy):
    row = measure_speed(policy, 2048, store_steps=3, runs=1, repeats=1, seed=0)
    assert row.policy == policy and row.context == 2048
    times = (row.batched_ms, row.per_head_ms, row.oracle_ms, row.insert_ms, row.step_p50_ms)
    assert all(math.isfinite(t) and t > 0 for t in times)
    assert row.step_p99_ms >= row.step_p50_ms
    assert row.leaves_scored > 0 and row.tokens_scored > 0
