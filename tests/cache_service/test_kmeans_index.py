"""Exact facts about the flat ``kmeans`` baseline: whole clusters, pages in arrival order."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_service.cluster_index import IndexConfig
from cache_service.kmeans_index import FlatKMeansIndex

DIM = 16
PAGE = 16


def _blobs(num_blobs, per_blob, dim=DIM, noise=0.3, seed=0):
    """Well-separated Gaussian blobs around ``10 * e_j``, shuffled; keys, blob of each, centres."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(dim)[:num_blobs]
    blob = rng.permutation(np.repeat(np.arange(num_blobs), per_blob))
    keys = centres[blob] + noise * rng.standard_normal((len(blob), dim))
    return keys.astype(np.float32), blob, centres.astype(np.float32)


def _augmented(index, keys):
    """Keys in the index's nearest-neighbour space: ``[k, sqrt(M² - ‖k‖²)]`` (float64)."""
    k = np.asarray(keys, dtype=np.float64)
    extra = np.sqrt(np.maximum(index.norm_bound**2 - (k**2).sum(1), 0.0))
    return np.concatenate([k, extra[:, None]], axis=1)


def _clusters(index):
    """Each cluster's pages, in order (cluster = the parent of a page)."""
    parent = index.levels[0].parent[: index.num_leaves]
    return [np.flatnonzero(parent == c).tolist() for c in range(index.num_clusters)]


def _tokens_of(index, leaves):
    leaves = list(leaves)
    if not leaves:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([index.leaf_tokens(int(leaf)) for leaf in leaves])


def _fills(index, leaves):
    return sum(index.leaf_fill(int(leaf)) for leaf in leaves)


def _assert_pages_fill_in_arrival_order(index):
    """Every cluster's pages are full but its last; the cluster's tokens are partitioned."""
    for pages in _clusters(index):
        assert pages, "a cluster without pages"
        fills = [index.leaf_fill(p) for p in pages]
        assert all(f == index.config.page_size for f in fills[:-1])
        assert 1 <= fills[-1] <= index.config.page_size


def test_bad_cluster_pages_raises():
    with pytest.raises(ValueError, match="cluster_pages must be at least 1, got 0"):
        FlatKMeansIndex(DIM, cluster_pages=0)


def test_build_makes_ceil_n_over_cluster_tokens_clusters_of_pages_in_token_order():
    keys, _, _ = _blobs(8, 30, seed=1)
    index = FlatKMeansIndex(DIM, IndexConfig(page_size=PAGE), cluster_pages=2)
    placement = index.build(keys, np.arange(240))
    index.check_invariants()
    assert index.num_clusters <= 8  # ceil(240 / 32); k-means may leave some empty
    assert sorted(placement.token_ids.tolist()) == list(range(240))
    _assert_pages_fill_in_arrival_order(index)
    for pages in _clusters(index):
        tokens = _tokens_of(index, pages)
        assert tokens.tolist() == sorted(tokens.tolist())  # filled in token order
        assert len(pages) == -(-len(tokens) // PAGE)


@pytest.mark.parametrize("seed", range(5))
def test_planted_clusters_are_recovered_with_more_clusters_than_blobs(seed):
    keys, blob, _ = _blobs(8, 32, seed=seed)
    index = FlatKMeansIndex(DIM, IndexConfig(page_size=PAGE, seed=seed), cluster_pages=1)
    index.build(keys, np.arange(256))
    assert index.num_clusters == 16
    for pages in _clusters(index):
        assert len(set(blob[_tokens_of(index, pages)])) == 1


def test_planted_clusters_are_recovered_with_one_cluster_per_blob():
    for seed in range(10):
        keys, blob, _ = _blobs(8, 32, seed=seed)
        index = FlatKMeansIndex(DIM, IndexConfig(page_size=PAGE, seed=seed), cluster_pages=2)
        index.build(keys, np.arange(256))
        for pages in _clusters(index):
            assert len(set(blob[_tokens_of(index, pages)])) == 1, f"seed {seed}"


def _planted(seed=3):
    keys, blob, centres = _blobs(8, 32, seed=seed)
    index = FlatKMeansIndex(DIM, IndexConfig(page_size=PAGE, seed=seed), cluster_pages=1)
    index.build(keys, np.arange(256))
    return index, blob, centres


def test_a_query_near_one_cluster_selects_exactly_its_pages():
    index, blob, centres = _planted()
    for j in range(8):
        pages = index.search(centres[j : j + 1] / 10, max_tokens=32)
        assert sorted(_tokens_of(index, pages).tolist()) == np.flatnonzero(blob == j).tolist()
        fewer = index.search(centres[j : j + 1] / 10, max_tokens=31)
        assert set(fewer.tolist()) < set(pages.tolist())


def test_a_query_group_selects_the_clusters_of_each_of_its_heads():
    index, blob, centres = _planted()
    pages = index.search(centres[[1, 5]] / 10, max_tokens=64)
    expected = np.flatnonzero(np.isin(blob, [1, 5])).tolist()
    assert sorted(_tokens_of(index, pages).tolist()) == expected


def _random_index(seed=0, n=500, built=300, page=8, cluster_pages=2):
    keys = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    config = IndexConfig(page_size=page, seed=seed)
    index = FlatKMeansIndex(DIM, config, cluster_pages=cluster_pages)
    index.build(keys[:built], np.arange(built))
    index.insert(keys[built:], np.arange(built, n))
    return index, keys


def test_search_takes_whole_clusters_by_centroid_score_while_they_fit():
    index, keys = _random_index()
    rng = np.random.default_rng(5)
    clusters = _clusters(index)
    for max_tokens in [0, 5, 16, 40, 100, 250, 500]:
        for _ in range(5):
            q = rng.standard_normal((2, DIM)).astype(np.float32)
            tokens = [_tokens_of(index, pages) for pages in clusters]
            scores = [(keys[t].mean(0) @ q.T).max() for t in tokens]
            order = np.argsort(-np.array(scores), kind="stable")
            sizes = np.cumsum([len(tokens[c]) for c in order])
            chosen = order[: int(np.searchsorted(sizes, max_tokens, "right"))]
            got = index.search(q, max_tokens)
            assert got.tolist() == [p for c in chosen for p in clusters[c]]
            assert _fills(index, got) <= max_tokens


def test_a_budget_covering_every_token_selects_every_page():
    index, _ = _random_index()
    got = index.search(np.ones((1, DIM), np.float32), index.num_tokens)
    assert sorted(got.tolist()) == index.leaf_ids().tolist()


def test_each_inserted_token_joins_its_nearest_cluster_in_its_open_page():
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((300, 8)).astype(np.float32)
    keys[200] *= 3  # raises the norm bound: every sum is re-augmented
    index = FlatKMeansIndex(8, IndexConfig(page_size=4, seed=1), cluster_pages=2)
    index.build(keys[:100], np.arange(100))
    num_clusters, new_pages = index.num_clusters, 0
    for token in range(100, 300):
        clusters = _clusters(index)
        before = [index.leaf_tokens(leaf) for leaf in index.leaf_ids()]
        placement = index.insert(keys[token : token + 1], np.array([token]))
        x = _augmented(index, keys)
        dist = [((x[_tokens_of(index, pages)].mean(0) - x[token]) ** 2).sum() for pages in clusters]
        last = clusters[int(np.argmin(dist))][-1]
        assert placement.token_ids.tolist() == [token]
        if len(before[last]) < 4:
            assert placement.leaves.tolist() == [last]
            assert index.leaf_tokens(last).tolist() == [*before[last].tolist(), token]
        else:
            new_pages += 1
            assert placement.leaves.tolist() == [len(before)]
            assert index.levels[0].parent[len(before)] == index.levels[0].parent[last]
        assert index.num_clusters == num_clusters  # flat: no split, ever
        for leaf, tokens in enumerate(before):
            if leaf != last:
                assert index.leaf_tokens(leaf).tolist() == tokens.tolist()
        _assert_pages_fill_in_arrival_order(index)
    index.check_invariants()
    assert new_pages >= 20


def test_selection_is_deterministic_for_a_fixed_seed():
    (a, _), (b, _) = _random_index(seed=4), _random_index(seed=4)
    for leaf in a.leaf_ids():
        assert a.leaf_tokens(leaf).tolist() == b.leaf_tokens(leaf).tolist()
    for q in np.random.default_rng(6).standard_normal((20, 2, DIM)).astype(np.float32):
        assert a.search(q, 64).tolist() == b.search(q, 64).tolist()


def test_bad_arguments_raise_clear_errors():
    index = FlatKMeansIndex(4, IndexConfig(page_size=4))
    keys = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"keys must be \[n, 4\], got shape \(10, 3\)"):
        index.build(keys[:, :3], np.arange(10))
    with pytest.raises(ValueError, match="token_ids must be 10 integers"):
        index.build(keys, np.arange(11))
    with pytest.raises(ValueError, match="token ids must be non-negative"):
        index.insert(keys, -np.arange(10))
    keys_nan = keys.copy()
    keys_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="keys contain NaN or infinity"):
        index.build(keys_nan, np.arange(10))
    index.build(keys, np.arange(10))
    with pytest.raises(RuntimeError, match=r"build\(\) was already called"):
        index.build(keys, np.arange(10, 20))
    with pytest.raises(ValueError, match="some token ids are already in the index"):
        index.insert(keys[:1], np.array([4]))
    with pytest.raises(ValueError, match="token ids repeat within one call"):
        index.insert(keys[:2], np.array([12, 12]))
    with pytest.raises(ValueError, match=r"queries must be \[G >= 1, 4\], got shape \(1, 3\)"):
        index.search(np.ones((1, 3), np.float32), 8)
    with pytest.raises(ValueError, match="max_tokens must be non-negative, got -5"):
        index.search(np.ones((1, 4), np.float32), -5)
    assert index.num_tokens == 10
    index.check_invariants()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page=st.sampled_from([2, 4, 16]),
    cluster_pages=st.integers(1, 3),
    dim=st.integers(1, 4),
    batches=st.lists(st.integers(0, 50), min_size=1, max_size=5),
    kind=st.sampled_from(["gaussian", "duplicates", "identical"]),
    seed=st.integers(0, 2**16),
)
def test_random_batches_keep_every_token_in_one_page_of_one_cluster(
    page, cluster_pages, dim, batches, kind, seed
):
    rng = np.random.default_rng(seed)
    n = sum(batches)
    if kind == "gaussian":
        keys = rng.standard_normal((n, dim)) * np.linspace(0.5, 3.0, n)[:, None]
    elif kind == "duplicates":
        keys = rng.integers(-1, 2, (n, dim)).astype(float)
    else:
        keys = np.tile(rng.standard_normal(dim), (n, 1))
    ids = rng.permutation(n) * 3
    index = FlatKMeansIndex(
        dim, IndexConfig(page_size=page, seed=seed), cluster_pages=cluster_pages
    )
    present: list[int] = []
    cuts = np.cumsum(batches)[:-1]
    for step, (k, t) in enumerate(zip(np.split(keys, cuts), np.split(ids, cuts), strict=True)):
        clusters = index.num_clusters
        index.nbytes()  # counted now: check_invariants sees it counted again after the change
        placement = (index.build if step == 0 else index.insert)(k.astype(np.float32), t)
        present += t.tolist()
        assert sorted(placement.token_ids.tolist()) == sorted(t.tolist())
        for token, leaf, slot in zip(*placement, strict=True):
            assert index.leaf_tokens(int(leaf))[slot] == token
        index.check_invariants()
        assert sorted(_tokens_of(index, index.leaf_ids()).tolist()) == sorted(present)
        _assert_pages_fill_in_arrival_order(index)
        if clusters and len(t):
            assert index.num_clusters == clusters
        max_tokens = int(rng.integers(0, 3 * page))
        q = rng.standard_normal((2, dim)).astype(np.float32)
        assert _fills(index, index.search(q, max_tokens)) <= max_tokens
