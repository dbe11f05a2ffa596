"""``search_heads`` (one call for a layer's KV heads) returns exactly what
``ClusterIndex.search`` returns head by head: same leaves, same order, same effort; and
``search_heads_tokens`` exactly what ``ClusterIndex.search_tokens`` returns."""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_service.batched_search import search_heads, search_heads_tokens
from cache_service.cluster_index import ClusterIndex, IndexConfig


def _keys(kind, n, dim, rng):
    if kind == "gaussian":
        return rng.standard_normal((n, dim)) * rng.lognormal(0, 0.5, dim)
    if kind == "clustered":
        centres = 3 * rng.standard_normal((8, dim))
        return centres[rng.integers(0, 8, n)] + 0.3 * rng.standard_normal((n, dim))
    if kind == "duplicates":  # many exact ties between scores
        return rng.integers(-1, 2, (n, dim)).astype(float)
    return np.tile(rng.standard_normal(dim), (n, 1))  # identical


def _heads(s):
    """Indexes of one layer: each head its own length, prefill/insert split and keys."""
    rng = np.random.default_rng(s["seed"])
    config = IndexConfig(
        page_size=s["page_size"],
        fanout=s["fanout"],
        top_nodes=s["top_nodes"],
        scan_nodes=s["scan_nodes"],
        probe=s["probe"],
        probe_fraction=s["probe_fraction"],
        view=s["view"],
        view_fraction=s["view_fraction"],
        seed=s["seed"],
    )
    indexes = []
    for n, inserted, kind in s["heads"]:
        keys = _keys(kind, n + inserted, s["dim"], rng).astype(np.float32)
        index = ClusterIndex(s["dim"], dataclasses.replace(config, seed=len(indexes)))
        index.build(keys[:n], np.arange(n))
        for start in range(n, n + inserted, 7):  # decoded tokens in small batches
            end = min(start + 7, n + inserted)
            index.insert(keys[start:end], np.arange(start, end))
        indexes.append(index)
    return indexes, rng


@st.composite
def _layers(draw):
    head = st.tuples(
        st.integers(0, 400),
        st.integers(0, 60),
        st.sampled_from(["gaussian", "clustered", "duplicates", "identical"]),
    )
    return {
        "heads": draw(st.lists(head, min_size=1, max_size=6)),
        "dim": draw(st.sampled_from([1, 3, 8, 16])),
        "group": draw(st.integers(1, 4)),
        "page_size": draw(st.sampled_from([2, 4, 16])),
        "fanout": draw(st.integers(2, 6)),
        "top_nodes": draw(st.integers(2, 8)),
        "scan_nodes": draw(st.sampled_from([1, 4, 16, 4096])),
        "probe": draw(st.sampled_from([1.0, 2.0, 4.0])),
        "probe_fraction": draw(st.sampled_from([0.0, 1 / 128, 0.1, 1.0])),
        "view": draw(st.sampled_from([1.0, 4.0])),
        "view_fraction": draw(st.sampled_from([0.0, 0.25, 1.0])),
        "budgets": draw(st.lists(st.integers(0, 300), min_size=1, max_size=3)),
        "queries": draw(st.sampled_from(["gaussian", "zero", "repeated"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _queries(s, rng, heads):
    shape = (heads, s["group"], s["dim"])
    if s["queries"] == "zero":
        return np.zeros(shape, np.float32)
    q = rng.standard_normal(shape).astype(np.float32)
    if s["queries"] == "repeated":  # every head of the group asks the same
        q[:] = q[:, :1]
    return q


def _assert_same_as_per_head(indexes, queries, budget):
    expected, efforts = [], []
    for index, q in zip(indexes, queries, strict=True):
        expected.append(index.search(q, budget))
        efforts.append(index.last_effort)
    got = search_heads(indexes, queries, budget)
    assert len(got) == len(expected)
    for leaves, want, index, effort in zip(got, expected, indexes, efforts, strict=True):
        assert leaves.dtype == np.int64
        assert leaves.tolist() == want.tolist()
        assert index.last_effort == effort
    tokens = [index.search_tokens(q, budget) for index, q in zip(indexes, queries, strict=True)]
    got = search_heads_tokens(indexes, queries, budget)
    assert [t.tolist() for t in got] == [t.tolist() for t in tokens]
    assert all(t.dtype == np.int64 for t in got)
    assert [index.last_effort for index in indexes] == efforts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layers())
def test_batched_search_returns_exactly_the_per_head_leaves(s):
    indexes, rng = _heads(s)
    for budget in s["budgets"]:
        _assert_same_as_per_head(indexes, _queries(s, rng, len(indexes)), budget)


@pytest.mark.parametrize("n", [2000, 20000])
def test_a_layer_of_descending_heads_at_scale(n):
    """Heads whose leaves outnumber ``scan_nodes`` (the search descends) next to a small
    one and an empty one, several budgets."""
    rng = np.random.default_rng(n)
    config = IndexConfig(scan_nodes=64)
    indexes = []
    for size in (n, n // 2, 40, 0):
        index = ClusterIndex(16, config)
        centres = 2 * rng.standard_normal((64, 16))
        keys = centres[rng.integers(0, 64, size)] + rng.standard_normal((size, 16))
        index.build(keys.astype(np.float32), np.arange(size))
        indexes.append(index)
    assert indexes[0].start_depth() > 0
    for budget in (0, 16, 192, 1000):
        for _ in range(5):
            queries = rng.standard_normal((4, 4, 16)).astype(np.float32)
            _assert_same_as_per_head(indexes, queries, budget)
    assert search_heads(indexes, queries, 64)[3].tolist() == []


def test_bad_arguments_raise_clear_errors():
    indexes = [ClusterIndex(4), ClusterIndex(4)]
    with pytest.raises(ValueError, match=r"queries must be \[2, G >= 1, 4\], got \(3, 1, 4\)"):
        search_heads(indexes, np.ones((3, 1, 4)), 8)
    with pytest.raises(ValueError, match="must have head_dim 5"):
        search_heads(indexes, np.ones((2, 1, 5)), 8)
    with pytest.raises(ValueError, match="max_tokens must be non-negative, got -1"):
        search_heads(indexes, np.ones((2, 1, 4)), -1)
    with pytest.raises(ValueError, match="max_tokens must be non-negative, got -1"):
        search_heads_tokens(indexes, np.ones((2, 1, 4)), -1)
    assert search_heads([], np.ones((0, 1, 4)), 8) == []
    assert search_heads_tokens([], np.ones((0, 1, 4)), 8) == []


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layers(), st.data())
def test_each_head_may_have_its_own_budget(s, data):
    """The store lowers a head's budget while a page leaving its window is attended."""
    indexes, rng = _heads(s)
    queries = _queries(s, rng, len(indexes))
    budgets = data.draw(st.lists(st.integers(0, 300), min_size=len(indexes), max_size=len(indexes)))
    expected = [index.search(q, b) for index, q, b in zip(indexes, queries, budgets, strict=True)]
    got = search_heads(indexes, queries, budgets)
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    zipped = zip(indexes, queries, budgets, strict=True)
    expected = [index.search_tokens(q, b) for index, q, b in zipped]
    got = search_heads_tokens(indexes, queries, budgets)
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
