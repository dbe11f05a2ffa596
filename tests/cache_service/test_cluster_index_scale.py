"""``ClusterIndex.search`` at long context: planted clusters found among 131072 tokens, an
effort that grows with the sequence, and leaves ranked by the attention mass they carry."""

import dataclasses

import numpy as np
import pytest

from cache_service.cluster_index import ClusterIndex, IndexConfig
from cache_service.policies.base import fill_within

DIM = 8
PLANTED = 48  # tokens per planted cluster


def _background(n, seed):
    """``n`` keys of dim 8 scoring low against every query used here (noise of scale 0.5)."""
    return 0.5 * np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def planted_128k():
    """131072 tokens: 4 clusters of 48 tokens around ``8 e_j`` (j < 4) at random positions,
    the rest background; the index and the planted token ids of each cluster."""
    n = 131072
    rng = np.random.default_rng(1)
    keys = _background(n, 2)
    where = rng.choice(n, 4 * PLANTED, replace=False).reshape(4, PLANTED)
    for j in range(4):
        keys[where[j]] = 8.0 * np.eye(DIM)[j] + 0.05 * rng.standard_normal((PLANTED, DIM))
    index = ClusterIndex(DIM)
    index.build(keys, np.arange(n))
    return index, where


def _selected_tokens(index, leaves):
    return set(np.concatenate([index.leaf_tokens(int(leaf)) for leaf in leaves]).tolist())


def test_planted_clusters_are_selected_among_131072_tokens(planted_128k):
    index, where = planted_128k
    assert index.num_tokens == 131072 and len(index.levels) >= 3
    # Query heads aim at two clusters each; background scores have std ~1.4 (max ~6.5),
    # planted ones 16.
    q = np.zeros((2, DIM), np.float32)
    q[0, [0, 1]] = 2.0
    q[1, [2, 3]] = 2.0
    leaves = index.search(q, 256)
    assert set(where.ravel().tolist()) <= _selected_tokens(index, leaves)
    assert sum(index.leaf_fill(int(leaf)) for leaf in leaves) <= 256
    # One cluster per head, a budget for two clusters: exactly those two are found.
    q = np.zeros((2, DIM), np.float32)
    q[0, 1] = q[1, 3] = 3.0
    chosen = _selected_tokens(index, index.search(q, 2 * PLANTED + 16))
    assert set(where[[1, 3]].ravel().tolist()) <= chosen
    assert not set(where[[0, 2]].ravel().tolist()) & chosen


def test_effort_grows_with_the_sequence():
    """Leaves in view and tokens scored exactly are at least fixed shares of the sequence
    (``view_fraction``, ``probe_fraction``), so both grow with it at a fixed budget."""
    config = IndexConfig(scan_nodes=256)
    q = np.ones((2, DIM), np.float32)
    efforts = []
    for n in (4096, 16384, 65536):
        index = ClusterIndex(DIM, config)
        index.build(_background(n, n), np.arange(n))
        index.search(q, 8)  # quotas from the budget: 4 x 8 tokens in view, 32 exact
        effort = index.last_effort
        assert index.levels[0].n > config.scan_nodes  # the descent prunes at every size
        assert effort.tokens >= config.probe_fraction * n
        assert effort.leaves * config.page_size >= config.view_fraction * n
        efforts.append(effort)
    assert efforts[0].tokens < efforts[1].tokens < efforts[2].tokens
    assert efforts[0].leaves < efforts[1].leaves < efforts[2].leaves
    # A larger budget, not only a longer sequence, widens the search too.
    index.search(q, 4096)
    assert index.last_effort.tokens >= config.probe * 4096


def test_a_leaf_of_many_good_tokens_beats_a_leaf_with_one_slightly_better_token():
    """Leaf A: 10 tokens scoring 4; leaf B: one token scoring 4.2 and 9 scoring 3. A budget
    of one leaf takes A (mass 10 e^2 = 74 against e^2.1 + 9 e^1.5 = 49 at softmax scale
    1/2), not B, the leaf of the best token; with a query 30x as sharp the best token
    dominates (e^63 against 10 e^60) and B is taken."""
    rng = np.random.default_rng(0)
    good = np.array([4.0, 3.0, 0, 0]) + 0.01 * rng.standard_normal((10, 4))
    rest = np.array([3.0, -3.0, 0, 0]) + 0.01 * rng.standard_normal((9, 4))
    keys = np.concatenate([good, [[4.2, -3.0, 0, 0]], rest]).astype(np.float32)
    index = ClusterIndex(4, IndexConfig(probe_fraction=1.0, view_fraction=1.0))
    index.build(keys, np.arange(20))
    a, b = index.token_leaf[0], index.token_leaf[10]
    assert set(index.leaf_tokens(a).tolist()) == set(range(10))  # the layout assumed
    assert set(index.leaf_tokens(b).tolist()) == set(range(10, 20))
    q = np.array([[1.0, 0, 0, 0]], np.float32)
    assert index.search(q, 10).tolist() == [a]
    assert index.search(30 * q, 10).tolist() == [b]


def test_fill_within_takes_ranked_pages_that_still_fit():
    pages = np.array([7, 3, 9, 4, 5, 8], dtype=np.int64)
    fills = np.array([5, 4, 6, 2, 1, 1])
    assert fill_within(pages, fills, 9).tolist() == [7, 3]
    assert fill_within(pages, fills, 12).tolist() == [7, 3, 4, 5]
    assert fill_within(pages, fills, 11).tolist() == [7, 3, 4]
    assert fill_within(pages, fills, 0).tolist() == []
    assert fill_within(pages, fills, 100).tolist() == pages.tolist()
    assert fill_within(pages[:0], fills[:0], 10).tolist() == []


def test_search_is_unchanged_by_a_softmax_scale_that_matches_the_default():
    index = ClusterIndex(DIM, IndexConfig(page_size=4))
    keys = np.random.default_rng(3).standard_normal((500, DIM)).astype(np.float32)
    index.build(keys, np.arange(500))
    twin = ClusterIndex(DIM, dataclasses.replace(index.config, softmax_scale=DIM**-0.5))
    twin.build(keys, np.arange(500))
    for q in np.random.default_rng(4).standard_normal((10, 2, DIM)).astype(np.float32):
        assert index.search(q, 64).tolist() == twin.search(q, 64).tolist()
