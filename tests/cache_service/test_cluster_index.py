"""Exact facts about ``ClusterIndex``: planted clusters, nearest-leaf inserts, splits, search."""

import copy
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_service.cluster_index import (
    ClusterIndex,
    IndexConfig,
    Placement,
    add_rows,
    capped_labels,
    kmeans_labels,
    quantize_queries,
    two_means,
)
from cache_service.policies.base import KeyTable, best_covering

DIM = 16
# Three shapes of tree; over 1024 tokens: two levels (leaves + <= 64 top nodes), five, nine.
SHALLOW = IndexConfig()
DEEP = IndexConfig(page_size=8, fanout=4, top_nodes=4)
DEEPEST = IndexConfig(page_size=4, fanout=2, top_nodes=2)


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


def _tokens_of(index, leaves):
    leaves = list(leaves)
    if not leaves:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([index.leaf_tokens(int(leaf)) for leaf in leaves])


def _fills(index, leaves):
    return sum(index.leaf_fill(int(leaf)) for leaf in leaves)


def _assert_placement_is_current(index, placement):
    """Every placed token is where the placement says, and is listed once."""
    assert len(np.unique(placement.token_ids)) == len(placement.token_ids)
    for token, leaf, slot in zip(*placement, strict=True):
        assert index.leaf_tokens(int(leaf))[slot] == token


def _built(config=DEEP, n=600, inserted=300, seed=0, dim=DIM):
    """An index over ``n`` Gaussian keys, the last ``inserted`` of them added by insert()."""
    keys = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    index = ClusterIndex(dim, config)
    index.build(keys[: n - inserted], np.arange(n - inserted))
    index.insert(keys[n - inserted :], np.arange(n - inserted, n))
    return index, keys


# ---------------------------------------------------------------- building blocks


def test_two_means_separates_two_distant_groups():
    rng = np.random.default_rng(0)
    group = rng.permutation(np.repeat([0, 1], [5, 7]))
    x = rng.normal(0, 0.1, (12, 3)) + 5.0 * group[:, None]
    second = two_means(x)
    assert second.tolist() == (group == group[second][0]).tolist()
    assert 0 < second.sum() < 12


@pytest.mark.parametrize("n", [2, 3, 8])
def test_two_means_halves_identical_points_in_order(n):
    second = two_means(np.ones((n, 4)))
    assert second.tolist() == [i >= n // 2 for i in range(n)]


@given(
    st.integers(0, 300),
    st.integers(1, 40),
    st.sampled_from([(), (3,), (65,)]),
    st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_add_rows_equals_numpy_add_at_bit_for_bit(rows, targets, tail, seed):
    # Sums whose order matters (magnitudes 1e-8..1e8, many repeats of few targets) into
    # rows that do not start at zero: the same bits as np.add.at's sequential loop.
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, *tail)) * 10.0 ** rng.integers(
        -8, 9, (rows,) + (1,) * len(tail)
    )
    index = rng.integers(0, targets, rows)
    start = rng.standard_normal((targets, *tail))
    expected, got = start.copy(), start.copy()
    np.add.at(expected, index, values)
    add_rows(got, index, values)
    assert np.array_equal(got, expected)


def test_kmeans_labels_recovers_two_blobs_and_is_deterministic():
    keys, blob, _ = _blobs(2, 50, seed=4)
    labels = kmeans_labels(keys, 2, seed=1, niter=10)
    assert labels.dtype == np.int64 and labels.shape == (100,)
    assert len(set(labels[blob == 0])) == 1 and len(set(labels[blob == 1])) == 1
    assert labels[blob == 0][0] != labels[blob == 1][0]
    assert np.array_equal(labels, kmeans_labels(keys, 2, seed=1, niter=10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"page_size": 1}, "page_size must be at least 2, got 1"),
        ({"build_fill": 0.0}, r"build_fill must be in \(0, 1\], got 0.0"),
        ({"build_fill": 1.5}, r"build_fill must be in \(0, 1\], got 1.5"),
        ({"fanout": 1}, "fanout and top_nodes must be at least 2, got 1, 64"),
        ({"top_nodes": 1}, "fanout and top_nodes must be at least 2, got 16, 1"),
        ({"probe": 0.5}, "probe must be >= 1"),
        ({"probe_fraction": 1.5}, r"probe_fraction in \[0, 1\]"),
        ({"view": 0.5}, "view must be >= 1"),
        ({"view_fraction": -0.1}, r"view_fraction in \[0, 1\]"),
        ({"softmax_scale": 0.0}, "softmax_scale must be positive, got 0.0"),
        ({"niter": 0}, "niter must be at least 1, got 0"),
        ({"insert_beam": 0}, "insert_beam must be at least 1, got 0"),
    ],
)
def test_bad_config_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexConfig(**kwargs)


def test_bad_head_dim_raises():
    with pytest.raises(ValueError, match="head_dim must be positive, got 0"):
        ClusterIndex(0)


# ---------------------------------------------------------------- build


@pytest.mark.parametrize("config", [SHALLOW, DEEP, DEEPEST], ids=["shallow", "deep", "deepest"])
def test_build_places_every_token_once_in_leaves_filled_at_most_build_fill(config):
    keys, _, _ = _blobs(16, 64)
    index = ClusterIndex(DIM, config)
    placement = index.build(keys, np.arange(len(keys)))
    index.check_invariants()
    assert isinstance(placement, Placement)
    assert sorted(placement.token_ids.tolist()) == list(range(len(keys)))
    _assert_placement_is_current(index, placement)
    cap = int(config.build_fill * config.page_size)
    assert all(1 <= index.leaf_fill(leaf) <= cap for leaf in index.leaf_ids())
    assert index.num_tokens == len(keys)
    assert len(index.levels) >= (2 if config is SHALLOW else 5)
    assert index.levels[-1].n <= config.top_nodes


@pytest.mark.parametrize("config", [SHALLOW, DEEP, DEEPEST], ids=["shallow", "deep", "deepest"])
def test_packed_leaves_are_fuller_and_keep_planted_clusters_apart(config):
    keys, blob, _ = _blobs(16, 64, seed=2)
    packed = dataclasses.replace(config, build_fill=1.0, pack_push=0.1)
    index = ClusterIndex(DIM, packed)
    index.build(keys, np.arange(len(keys)))
    index.check_invariants()
    free = ClusterIndex(DIM, config)
    free.build(keys, np.arange(len(keys)))
    assert index.num_leaves < 0.8 * free.num_leaves
    assert index.num_tokens / index.num_leaves >= 0.6 * packed.page_size
    for leaf in index.leaf_ids():
        assert len(set(blob[index.leaf_tokens(leaf)])) == 1, f"leaf {leaf} mixes blobs"


def test_capped_labels_take_nearest_rows_first_and_report_the_cost():
    # 1-D: centroids 0 and 10, two rows each. Row 2 (nearest 0, at distance 4) finds 0 full
    # (rows 0 and 1 are nearer) and goes to 10 (distance 64): cost (64 - 4) / (0 + 1 + 4 + 0).
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    labels, cost = capped_labels(x, np.array([[0.0], [10.0]]), cap=2)
    assert labels.tolist() == [0, 0, 1, 1]
    assert cost == pytest.approx(60 / 5)
    # Room for every row at its nearest centroid: the nearest, at no cost.
    labels, cost = capped_labels(x, np.array([[0.0], [10.0]]), cap=3)
    assert labels.tolist() == [0, 0, 0, 1] and cost == 0
    with pytest.raises(ValueError, match="2 groups of 1 cannot hold 4 rows"):
        capped_labels(x, np.array([[0.0], [10.0]]), cap=1)


@given(st.integers(2, 200), st.integers(1, 8), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_capped_labels_respect_the_capacity(rows, cap, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 3))
    k = -(-rows // cap)
    labels, cost = capped_labels(x, x[rng.choice(rows, k, replace=False)], cap)
    assert labels.min() >= 0 and np.bincount(labels, minlength=k).max() <= cap
    assert cost >= 0


def test_always_packing_one_cloud_uses_the_fewest_leaves():
    keys = np.random.default_rng(4).standard_normal((150, DIM)).astype(np.float32)
    index = ClusterIndex(DIM, IndexConfig(build_fill=1.0, pack_push=1e9))
    index.build(keys, np.arange(150))
    assert index.num_leaves == 10  # ceil(150 / 16): nine full leaves and one of 6
    free = ClusterIndex(DIM, IndexConfig(build_fill=1.0, pack_push=None))
    free.build(keys, np.arange(150))
    assert free.num_leaves > 10


@pytest.mark.parametrize("config", [SHALLOW, DEEP, DEEPEST], ids=["shallow", "deep", "deepest"])
def test_planted_clusters_are_recovered(config):
    keys, blob, _ = _blobs(16, 64, seed=2)
    index = ClusterIndex(DIM, config)
    index.build(keys, np.arange(len(keys)))
    for leaf in index.leaf_ids():
        assert len(set(blob[index.leaf_tokens(leaf)])) == 1, f"leaf {leaf} mixes blobs"


@pytest.mark.parametrize("config", [SHALLOW, DEEP, DEEPEST], ids=["shallow", "deep", "deepest"])
def test_a_query_near_one_cluster_selects_exactly_its_leaves(config):
    keys, blob, centres = _blobs(16, 64, seed=3)
    index = ClusterIndex(DIM, config)
    index.build(keys, np.arange(len(keys)))
    for j in range(16):
        leaves = index.search(centres[j : j + 1] / 10, max_tokens=64)
        assert sorted(_tokens_of(index, leaves).tolist()) == np.flatnonzero(blob == j).tolist()
        # One token less: a strict subset of the same cluster's leaves, the rest of the
        # budget filled by leaves of other clusters that still fit.
        fewer = index.search(centres[j : j + 1] / 10, max_tokens=63)
        ours = [leaf for leaf in fewer.tolist() if leaf in set(leaves.tolist())]
        assert fewer.tolist()[: len(ours)] == ours and set(ours) < set(leaves.tolist())
        assert _fills(index, fewer) <= 63


def test_a_query_group_selects_the_clusters_of_each_of_its_heads():
    keys, blob, centres = _blobs(8, 40, seed=5)
    index = ClusterIndex(DIM, DEEP)
    index.build(keys, np.arange(len(keys)))
    leaves = index.search(centres[[2, 6]] / 10, max_tokens=80)
    assert (
        sorted(_tokens_of(index, leaves).tolist()) == np.flatnonzero(np.isin(blob, [2, 6])).tolist()
    )


def test_build_is_deterministic_for_a_fixed_seed():
    keys = np.random.default_rng(7).standard_normal((700, DIM)).astype(np.float32)
    a, b = ClusterIndex(DIM, DEEP), ClusterIndex(DIM, DEEP)
    pa, pb = a.build(keys[:500], np.arange(500)), b.build(keys[:500], np.arange(500))
    for x, y in zip(pa, pb, strict=True):
        assert np.array_equal(x, y)
    pa, pb = a.insert(keys[500:], np.arange(500, 700)), b.insert(keys[500:], np.arange(500, 700))
    for x, y in zip(pa, pb, strict=True):
        assert np.array_equal(x, y)
    queries = np.random.default_rng(8).standard_normal((20, 2, DIM)).astype(np.float32)
    for q in queries:
        assert np.array_equal(a.search(q, 64), b.search(q, 64))


def test_empty_build_then_insert_builds():
    index = ClusterIndex(4, DEEP)
    placement = index.build(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert len(placement.token_ids) == 0 and index.num_leaves == 0
    assert len(index.search(np.ones((1, 4), np.float32), 100)) == 0
    index.check_invariants()
    keys = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    placement = index.insert(keys, np.arange(30))
    assert sorted(placement.token_ids.tolist()) == list(range(30))
    index.check_invariants()


def test_identical_keys_fill_leaves_and_split_in_order():
    config = IndexConfig(page_size=4, fanout=2, top_nodes=2)
    index = ClusterIndex(3, config)
    keys = np.ones((50, 3), np.float32)
    index.build(keys, np.arange(50))
    assert all(index.leaf_fill(leaf) <= 3 for leaf in index.leaf_ids())
    index.insert(keys, np.arange(50, 100))
    index.check_invariants()
    assert sorted(_tokens_of(index, index.leaf_ids()).tolist()) == list(range(100))


# ---------------------------------------------------------------- insert


def test_each_inserted_token_lands_in_its_nearest_leaf_or_is_split_with_it():
    """With a beam as wide as every level, the descent is the brute-force nearest leaf (in
    the augmented space, before the insert); a full leaf is split with the token by 2-means,
    the part of its oldest token keeping its id."""
    rng = np.random.default_rng(11)
    keys = rng.standard_normal((200, 8)).astype(np.float32)
    keys[[80, 150]] *= 3  # inserts that raise the norm bound (every key is re-augmented)
    config = IndexConfig(page_size=4, fanout=2, top_nodes=2, seed=3, insert_beam=10_000)
    index = ClusterIndex(8, config)
    index.build(keys[:40], np.arange(40))
    splits = raised = 0
    for token in range(40, 200):
        before = [index.leaf_tokens(leaf) for leaf in index.leaf_ids()]
        bound = index.norm_bound
        parents = index.levels[0].parent[: len(before)].copy()
        placement = index.insert(keys[token : token + 1], np.array([token]))
        x = _augmented(index, keys)  # with the bound this insert used
        raised += index.norm_bound > bound
        dist = [((x[toks].mean(0) - x[token]) ** 2).sum() for toks in before]
        nearest = int(np.argmin(dist))
        landed = int(placement.leaves[placement.token_ids == token][0])
        old = before[nearest]
        if len(old) < config.page_size:
            assert landed == nearest
            assert index.num_leaves == len(before)
            assert index.leaf_tokens(nearest).tolist() == [*old.tolist(), token]
            assert placement.token_ids.tolist() == [token]
        else:  # full: old id kept by the part of its oldest token, new id for the other
            splits += 1
            new = len(before)
            assert index.num_leaves == new + 1
            together = np.array([*old.tolist(), token])
            second = two_means(x[together])
            parts = sorted([together[~second], together[second]], key=lambda p: p[0] != old[0])
            assert index.leaf_tokens(nearest).tolist() == parts[0].tolist()
            assert index.leaf_tokens(new).tolist() == parts[1].tolist()
            assert landed in (nearest, new)
            assert sorted(placement.token_ids.tolist()) == sorted(together.tolist())
            if len(index.levels) > 1 and index.levels[1].n == parents.max() + 1:
                # no parent split: the new leaf hangs under the old leaf's parent
                assert index.levels[0].parent[new] == parents[nearest]
        for leaf in range(len(before)):
            if leaf != nearest:
                assert index.leaf_tokens(leaf).tolist() == before[leaf].tolist()
        _assert_placement_is_current(index, placement)
        index.check_invariants()
    assert splits >= 25 and raised >= 1


def test_the_default_beam_finds_the_nearest_leaf_of_most_tokens():
    """A quality floor, not a benchmark: the descent (beam 4, a page of 16 keys at a time)
    against brute force over all leaves, on clustered keys of a four-level tree (measured:
    1.0 at this seed; beam 1: 0.92)."""
    rng = np.random.default_rng(5)
    centres = 3.0 * rng.standard_normal((64, DIM))
    keys = (centres[rng.integers(0, 64, 6000)] + rng.standard_normal((6000, DIM))).astype("f4")
    index = ClusterIndex(DIM, IndexConfig(page_size=16, fanout=8, top_nodes=8))
    index.build(keys[:5000], np.arange(5000))
    assert len(index.levels) >= 4
    x = _augmented(index, keys[5000:])
    found = np.concatenate([index.nearest_leaves(x[i : i + 16]) for i in range(0, 1000, 16)])
    cent = index.levels[0].centroids(slice(0, index.num_leaves)).astype(np.float64)
    exact = np.argmin(((x[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
    assert (found == exact).mean() >= 0.98


def test_a_full_leaf_splits_keeping_its_id_and_its_parent():
    rng = np.random.default_rng(2)
    config = IndexConfig(page_size=4, build_fill=1.0, fanout=16, top_nodes=2)
    keys = rng.standard_normal((60, 5)).astype(np.float32)
    index = ClusterIndex(5, config)
    index.build(keys[:40], np.arange(40))
    assert len(index.levels) == 2
    # A full leaf and a key whose nearest leaf (brute force) it is: the mean of its keys.
    x = _augmented(index, keys[:40])
    cents = np.stack([x[index.leaf_tokens(leaf)].mean(0) for leaf in index.leaf_ids()])
    full = []
    for leaf in index.leaf_ids():
        probe = keys[index.leaf_tokens(leaf)].mean(0)
        nearest = np.argmin(((cents - _augmented(index, probe[None])) ** 2).sum(1))
        if index.leaf_fill(leaf) == 4 and nearest == leaf:
            full.append((int(leaf), probe))
    assert full
    leaf, probe = full[0]
    old = set(index.leaf_tokens(leaf).tolist())
    n = index.num_leaves
    index.insert(probe[None], np.array([100]))
    assert index.num_leaves == n + 1
    got = set(index.leaf_tokens(leaf).tolist()) | set(index.leaf_tokens(n).tolist())
    assert got == old | {100}
    assert index.leaf_fill(leaf) >= 1 and index.leaf_fill(n) >= 1
    assert index.levels[0].parent[n] == index.levels[0].parent[leaf]
    assert n in index.levels[1].children[int(index.levels[0].parent[leaf])]
    index.check_invariants()


def test_many_inserts_split_inner_nodes_and_keep_levels_consistent():
    keys = np.random.default_rng(3).standard_normal((800, 6)).astype(np.float32)
    config = IndexConfig(page_size=4, fanout=2, top_nodes=2)
    index = ClusterIndex(6, config)
    index.build(keys[:50], np.arange(50))
    upper = [level.n for level in index.levels[1:]]
    index.insert(keys[50:], np.arange(50, 800))
    index.check_invariants()
    assert len(index.levels) > len(upper) + 1  # inserts grew the tree by a level
    assert index.levels[1].n > upper[0]  # inner nodes split
    assert max(len(c) for c in index.levels[1].children[: index.levels[1].n]) <= 4
    assert sorted(_tokens_of(index, index.leaf_ids()).tolist()) == list(range(800))


def test_a_batch_insert_equals_inserting_page_by_page():
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((400, 8)).astype(np.float32)
    keys[0] *= 4  # the bound set at build covers every later key: no re-augmentation
    config = IndexConfig(page_size=4, fanout=2, top_nodes=2)
    batch, paged = ClusterIndex(8, config), ClusterIndex(8, config)
    batch.build(keys[:100], np.arange(100))
    paged.build(keys[:100], np.arange(100))
    batch.insert(keys[100:], np.arange(100, 400))
    for start in range(100, 400, 4):
        paged.insert(keys[start : start + 4], np.arange(start, start + 4))
    assert batch.num_leaves == paged.num_leaves > 100 // 3
    for leaf in batch.leaf_ids():
        assert batch.leaf_tokens(leaf).tolist() == paged.leaf_tokens(leaf).tolist()


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("config", [SHALLOW, DEEP, DEEPEST], ids=["shallow", "deep", "deepest"])
def test_search_never_exceeds_the_budget(config):
    index, _ = _built(config)
    rng = np.random.default_rng(9)
    for max_tokens in [0, 1, 3, 4, 7, 16, 17, 64, 100, 255, 256, 599, 600, 10_000]:
        for _ in range(5):
            leaves = index.search(rng.standard_normal((3, DIM)).astype(np.float32), max_tokens)
            assert leaves.dtype == np.int64
            assert len(np.unique(leaves)) == len(leaves)
            assert ((leaves >= 0) & (leaves < index.num_leaves)).all()
            assert _fills(index, leaves) <= max_tokens
            if max_tokens >= config.page_size:
                assert len(leaves) > 0  # the best leaf always fits


@pytest.mark.parametrize("config", [SHALLOW, DEEP, DEEPEST], ids=["shallow", "deep", "deepest"])
def test_a_budget_covering_every_token_selects_every_leaf(config):
    index, _ = _built(config)
    q = np.random.default_rng(10).standard_normal((2, DIM)).astype(np.float32)
    assert sorted(index.search(q, index.num_tokens).tolist()) == index.leaf_ids().tolist()


def _mass_ranking(index, keys, q, max_tokens):
    """Brute force: every leaf's attention mass (each query head's softmax over all tokens,
    mean over the group), best first; then each leaf taken while it still fits. The index
    scores the keys as its float16 copy holds them."""
    keys = keys.astype(np.float16).astype(np.float32)
    probs = np.exp((q @ keys.T) * index.dim**-0.5)  # [G, N]
    probs /= probs.sum(1, keepdims=True)
    leaves = index.leaf_ids()
    mass = np.array([probs[:, index.leaf_tokens(int(leaf))].sum(1).mean() for leaf in leaves])
    chosen, left = [], max_tokens
    for leaf in leaves[np.argsort(-mass, kind="stable")]:
        if index.leaf_fill(int(leaf)) <= left:
            chosen.append(int(leaf))
            left -= index.leaf_fill(int(leaf))
    return chosen, mass


@pytest.mark.parametrize("config", [DEEP, DEEPEST], ids=["deep", "deepest"])
def test_exact_probe_ranks_leaves_by_attention_mass_and_fills_the_budget(config):
    """With every leaf in view and probed, the selection is the brute-force one: leaves by
    attention mass, each taken if it still fits (a smaller later leaf fills the rest)."""
    exact = dataclasses.replace(config, probe_fraction=1.0, view_fraction=1.0)
    index, keys = _built(exact)
    rng = np.random.default_rng(12)
    for max_tokens in [8, 50, 128]:
        for _ in range(10):
            q = rng.standard_normal((2, DIM)).astype(np.float32)
            expected, mass = _mass_ranking(index, keys, q, max_tokens)
            got = index.search(q, max_tokens)
            assert got.tolist() == expected
            assert got[0] == int(np.argmax(mass))  # the heaviest leaf is selected first
            assert max_tokens - _fills(index, got) < min(index.fill[: index.num_leaves])


def test_a_large_probe_is_the_brute_force_mass_ranking():
    config = IndexConfig(page_size=8, fanout=4, top_nodes=4, probe=1000.0)
    index, keys = _built(config, n=1000, inserted=200)
    rng = np.random.default_rng(13)
    for _ in range(30):
        q = rng.standard_normal((4, DIM)).astype(np.float32)
        assert index.search(q, 16).tolist() == _mass_ranking(index, keys, q, 16)[0]


def _probe_reference(index, q, max_tokens):
    """The probe level by level in NumPy, from the lists the index keeps: every node of
    ``start_depth`` scored by its int8 centroid (exact integer dot products in float64), the
    best covering each level's need, their children next; the leaves' best covering the
    exact quota. Returns the leaves and (upper nodes scored, leaves scored)."""
    view, exact = index.effort(max_tokens)
    qhat, step = quantize_queries(q, index.qscale)
    start = index.start_depth()
    nodes = np.arange(index.levels[start].n)
    scored = 0
    for depth in range(start, -1, -1):
        level = index.levels[depth]
        dots = qhat.astype(np.float64) @ level.qcent[nodes].astype(np.float64).T  # [G, m]
        scores = (dots.astype(np.float32) * step).max(axis=0) + np.float32(0)
        counts = index.fill[nodes] if depth == 0 else level.counts[nodes]
        need = exact if depth == 0 else view * 2 ** (depth - 1)
        best = best_covering(nodes, scores, counts, need)
        if depth == 0:
            return best, (scored, len(nodes))
        scored += len(nodes)
        nodes = np.array([c for node in best for c in level.children[node]], dtype=np.int64)


@pytest.mark.parametrize("config", [SHALLOW, DEEP, DEEPEST], ids=["shallow", "deep", "deepest"])
def test_the_probe_is_the_best_covering_cut_level_by_level(config):
    index, _ = _built(config, n=3000, inserted=500)
    rng = np.random.default_rng(21)
    for max_tokens in [1, 16, 64, 300]:
        for _ in range(5):
            q = rng.standard_normal((3, DIM)).astype(np.float32)
            want, (scored, seen) = _probe_reference(index, q, max_tokens)
            got = index._probe(q, max_tokens)
            assert got.tolist() == want.tolist()
            tokens = int(index.fill[want].sum())
            assert index.last_effort == (scored, seen, tokens)


def _token_mass(index, keys, q):
    """Brute force in float64: each token's attention mass (each query head's softmax over
    all tokens, the keys as the index's float16 copy holds them; mean over the group)."""
    keys = keys.astype(np.float16).astype(np.float64)
    logits = (q.astype(np.float64) @ keys.T) * index.dim**-0.5  # [G, N]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return (probs / probs.sum(1, keepdims=True)).mean(0)


@pytest.mark.parametrize("config", [DEEP, DEEPEST], ids=["deep", "deepest"])
def test_search_tokens_with_every_leaf_probed_is_the_exact_top_by_attention_mass(config):
    exact = dataclasses.replace(config, probe_fraction=1.0, view_fraction=1.0)
    index, keys = _built(exact)
    rng = np.random.default_rng(14)
    for max_tokens in [1, 7, 50, 128, 600, 10_000]:
        for _ in range(5):
            q = rng.standard_normal((3, DIM)).astype(np.float32)
            got = index.search_tokens(q, max_tokens)
            heaviest = np.argsort(-_token_mass(index, keys, q), kind="stable")[:max_tokens]
            assert got.dtype == np.int64
            assert got.tolist() == sorted(heaviest.tolist())


def test_search_tokens_carry_at_least_the_mass_of_the_leaves_search_takes():
    """Default effort: the same leaves are scored exactly; taking their heaviest tokens one
    by one fills the budget (as far as they hold it) and never carries less mass than the
    whole leaves ``search`` takes out of them."""
    index, keys = _built(DEEP, n=1000, inserted=200)
    rng = np.random.default_rng(15)
    for max_tokens in [5, 16, 37, 64]:
        for _ in range(10):
            q = rng.standard_normal((2, DIM)).astype(np.float32)
            got = index.search_tokens(q, max_tokens)
            scored = index.last_effort.tokens
            leaves = index.search(q, max_tokens)
            assert index.last_effort.tokens == scored  # the same leaves probed
            assert len(got) == len(set(got.tolist())) == min(max_tokens, scored)
            mass = _token_mass(index, keys, q)
            assert mass[got].sum() >= mass[_tokens_of(index, leaves)].sum() - 1e-9


def test_default_probe_finds_most_top_tokens_on_clustered_keys():
    """A sanity floor, not a benchmark: measured 0.80 at this seed."""
    rng = np.random.default_rng(0)
    centres = 2.0 * rng.standard_normal((32, DIM))
    keys = (centres[rng.integers(0, 32, 3000)] + rng.standard_normal((3000, DIM))).astype("f4")
    index = ClusterIndex(DIM, DEEP)
    index.build(keys[:2000], np.arange(2000))
    index.insert(keys[2000:], np.arange(2000, 3000))
    hits = 0
    for _ in range(100):
        q = rng.standard_normal((2, DIM)).astype(np.float32)
        hits += index.token_leaf[int(np.argmax((keys @ q.T).max(1)))] in index.search(q, 64)
    assert hits >= 65


# ---------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_clear_errors():
    index = ClusterIndex(4, DEEP)
    keys = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"keys must be \[n, 4\], got shape \(10, 3\)"):
        index.build(keys[:, :3], np.arange(10))
    with pytest.raises(ValueError, match=r"keys must be \[n, 4\], got shape \(4,\)"):
        index.build(keys[0], np.arange(1))
    with pytest.raises(ValueError, match="token_ids must be 10 integers, one per key; got int64"):
        index.build(keys, np.arange(9))
    with pytest.raises(ValueError, match="token_ids must be 10 integers.*float64"):
        index.build(keys, np.arange(10.0))
    with pytest.raises(ValueError, match="token ids must be non-negative"):
        index.build(keys, np.arange(-1, 9))
    with pytest.raises(ValueError, match="token ids repeat within one call"):
        index.build(keys, np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8]))
    with pytest.raises(ValueError, match=r"token ids must be below 2\*\*31, got 2147483648"):
        index.build(keys, np.arange(2**31 - 9, 2**31 + 1))
    bad = keys.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="keys contain NaN or infinity"):
        index.build(bad, np.arange(10))
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="keys contain NaN or infinity"):
        index.build(bad, np.arange(10))
    bad[3, 1] = -70000.0  # finite, but past what the index's float16 copy holds
    with pytest.raises(ValueError, match=r"keys must lie within \+-65504.*got 70000"):
        index.build(bad, np.arange(10))
    assert not index.built and index.num_tokens == 0  # nothing half-applied

    index.build(keys, np.arange(10))
    with pytest.raises(RuntimeError, match=r"build\(\) was already called; add tokens with insert"):
        index.build(keys, np.arange(10, 20))
    with pytest.raises(ValueError, match="some token ids are already in the index"):
        index.insert(keys[:2], np.array([10, 3]))
    with pytest.raises(ValueError, match="token ids repeat within one call"):
        index.insert(keys[:2], np.array([11, 11]))
    with pytest.raises(ValueError, match=r"keys must be \[n, 4\]"):
        index.insert(keys[:2, :2], np.array([11, 12]))
    with pytest.raises(ValueError, match=r"queries must be \[G >= 1, 4\], got shape \(2, 5\)"):
        index.search(np.ones((2, 5), np.float32), 10)
    with pytest.raises(ValueError, match=r"queries must be \[G >= 1, 4\], got shape \(4,\)"):
        index.search(np.ones(4, np.float32), 10)
    with pytest.raises(ValueError, match=r"queries must be \[G >= 1, 4\], got shape \(0, 4\)"):
        index.search(np.ones((0, 4), np.float32), 10)
    with pytest.raises(ValueError, match="max_tokens must be non-negative, got -1"):
        index.search(np.ones((1, 4), np.float32), -1)
    assert index.num_tokens == 10 and sorted(_tokens_of(index, index.leaf_ids())) == list(range(10))
    index.check_invariants()


# ---------------------------------------------------------------- random operation sequences


@st.composite
def _scenarios(draw):
    return {
        "page_size": draw(st.sampled_from([2, 4, 16])),
        "dim": draw(st.integers(1, 5)),
        "fanout": draw(st.integers(2, 4)),
        "top_nodes": draw(st.integers(2, 4)),
        "build_fill": draw(st.sampled_from([0.5, 0.75, 1.0])),
        "insert_beam": draw(st.sampled_from([1, 2, 4, 1000])),
        "batches": draw(st.lists(st.integers(0, 60), min_size=1, max_size=6)),
        "keys": draw(st.sampled_from(["gaussian", "duplicates", "identical", "zero"])),
        "ids": draw(st.sampled_from(["ascending", "shuffled", "sparse"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _scenario_config(s):
    return IndexConfig(
        page_size=s["page_size"],
        fanout=s["fanout"],
        top_nodes=s["top_nodes"],
        build_fill=s["build_fill"],
        insert_beam=s["insert_beam"],
    )


def _scenario_data(s):
    """Keys ``[n, dim]`` and token ids ``[n]`` for a scenario, cut into its batches."""
    rng = np.random.default_rng(s["seed"])
    n, dim = sum(s["batches"]), s["dim"]
    if s["keys"] == "gaussian":  # norms grow batch by batch: the bound is raised on insert
        keys = rng.standard_normal((n, dim)) * np.linspace(0.5, 3.0, n)[:, None]
    elif s["keys"] == "duplicates":
        keys = rng.integers(-1, 2, (n, dim)).astype(float)
    elif s["keys"] == "identical":
        keys = np.tile(rng.standard_normal(dim), (n, 1))
    else:
        keys = np.zeros((n, dim))
    ids = np.arange(n)
    if s["ids"] == "shuffled":
        ids = rng.permutation(n)
    elif s["ids"] == "sparse":
        ids = 1000 + 7 * rng.permutation(n)
    cuts = np.cumsum(s["batches"])[:-1]
    return list(zip(np.split(keys.astype(np.float32), cuts), np.split(ids, cuts), strict=True))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenarios())
def test_random_build_and_insert_batches_keep_every_token_in_exactly_one_slot(s):
    config = _scenario_config(s)
    index = ClusterIndex(s["dim"], config)
    present: list[int] = []
    rng = np.random.default_rng(s["seed"] + 1)
    for step, (keys, ids) in enumerate(_scenario_data(s)):
        index.nbytes()  # counted now: check_invariants sees it counted again after the change
        placement = (index.build if step == 0 else index.insert)(keys, ids)
        present += ids.tolist()
        assert set(ids.tolist()) <= set(placement.token_ids.tolist())
        _assert_placement_is_current(index, placement)
        index.check_invariants()
        held = _tokens_of(index, index.leaf_ids()).tolist()
        assert sorted(held) == sorted(present)  # each exactly once, none lost, none invented
        assert index.num_tokens == len(present)
        fills = [index.leaf_fill(leaf) for leaf in index.leaf_ids()]
        assert all(1 <= f <= s["page_size"] for f in fills)
        for token in ids[:5]:
            assert index.token_leaf[token] >= 0
        max_tokens = int(rng.integers(0, 2 * s["page_size"] + 20))
        q = rng.standard_normal((2, s["dim"])).astype(np.float32)
        found = index.search(q, max_tokens)
        assert _fills(index, found) <= max_tokens
        assert len(set(found.tolist())) == len(found)
        assert all(0 <= leaf < index.num_leaves and index.leaf_fill(leaf) for leaf in found)


@pytest.mark.parametrize("config", [DEEP, DEEPEST], ids=["deep", "deepest"])
def test_search_scores_every_leaf_centroid_when_the_leaves_are_few(config):
    """With at most ``scan_nodes`` leaves, upper levels do not prune: the search equals the
    same index cut down to its leaves."""
    narrow = dataclasses.replace(config, probe=1.0, probe_fraction=0.0, view=1.0, view_fraction=0)
    index, _ = _built(narrow)
    assert len(index.levels) > 2
    flat = copy.deepcopy(index)
    flat.levels = flat.levels[:1]
    flat.levels[0].parent[:] = -1
    rng = np.random.default_rng(5)
    for _ in range(20):
        queries = rng.standard_normal((2, DIM)).astype(np.float32)
        assert np.array_equal(index.search(queries, 40), flat.search(queries, 40))
        assert index.last_effort.nodes == 0 and index.last_effort.leaves == index.num_leaves
    # ... whereas scanning only the top level prunes top-down and changes some selections.
    index.config = dataclasses.replace(narrow, scan_nodes=1)
    differs = sum(
        not np.array_equal(index.search(q, 40), flat.search(q, 40))
        for q in rng.standard_normal((20, 2, DIM)).astype(np.float32)
    )
    assert differs > 0


def test_nbytes_counts_what_the_index_allocates():
    """``nbytes`` (what the memory ceiling counts) against what Python's allocator traced
    while an index was built and took inserts, with only the index kept."""
    import gc
    import tracemalloc

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((4096, 64)).astype(np.float32)
    more = rng.standard_normal((512, 64)).astype(np.float32)
    ClusterIndex(64).build(keys[:256], np.arange(256))  # lazy imports before tracing
    tracemalloc.start()
    try:
        index = ClusterIndex(64)
        index.build(keys, np.arange(4096))
        for start in range(0, 512, 16):
            index.insert(more[start : start + 16], np.arange(4096 + start, 4112 + start))
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 0.9 * traced <= index.nbytes() <= 1.1 * traced


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenarios())
def test_an_index_reading_keys_from_a_source_keeps_no_copy_and_decides_the_same(s):
    """Given where to read keys (a body's pool pages), an index keeps no key copy and
    places, splits and searches exactly as one keeping its float16 copy does, for keys that
    float16 holds exactly."""
    config = _scenario_config(s)
    batches = [(k.astype(np.float16).astype(np.float32), i) for k, i in _scenario_data(s)]
    ids_end = max((int(i.max()) + 1 for _, i in batches if len(i)), default=0)
    store = np.zeros((ids_end, s["dim"]), np.float32)
    reads = []

    def source(ids):
        reads.append(len(ids))
        return store[ids]

    class InPlace:
        """A source the compiled search reads in place: token t's key is row t."""

        def __init__(self, rows):
            self.rows = rows

        def __call__(self, ids):
            return source(ids)

        def table(self):
            places = np.arange(ids_end, dtype=np.int32)
            return KeyTable(self.rows, places, np.zeros(ids_end, np.int32), 1)

    own, sourced = ClusterIndex(s["dim"], config), ClusterIndex(s["dim"], config, source)
    # The same keys read in place, as float32 and as float16 bits (what a pool holds).
    halves = np.zeros(store.shape, np.float16)
    in_place = [
        ClusterIndex(s["dim"], config, InPlace(store)),
        ClusterIndex(s["dim"], config, InPlace(halves.view(np.uint16))),
    ]
    assert sourced.keys is None
    rng = np.random.default_rng(s["seed"] + 2)
    for step, (keys, ids) in enumerate(batches):
        store[ids] = keys  # the caller stores a token's key before the index sees it
        halves[ids] = keys
        a = (own.build if step == 0 else own.insert)(keys, ids)
        b = (sourced.build if step == 0 else sourced.insert)(keys, ids)
        for index in in_place:
            (index.build if step == 0 else index.insert)(keys, ids)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        sourced.check_invariants()
        q = rng.standard_normal((2, s["dim"])).astype(np.float32)
        budget = int(rng.integers(1, 3 * s["page_size"] + 20))
        np.testing.assert_array_equal(own.search(q, budget), sourced.search(q, budget))
        tokens = own.search_tokens(q, budget)
        np.testing.assert_array_equal(tokens, sourced.search_tokens(q, budget))
        for index in in_place:
            np.testing.assert_array_equal(tokens, index.search_tokens(q, budget))
    assert own.keys is not None
    assert sourced.nbytes() == own.nbytes() - own.keys.nbytes
