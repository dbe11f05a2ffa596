"""The compiled loops of the index (``cache_service.compiled``) against plain NumPy
formulations of what they must return, bit for bit."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_service import cluster_index, compiled
from cache_service.cluster_index import (
    CENTROID_LEVELS,
    ClusterIndex,
    IndexConfig,
    numpy_two_means,
    quantize_queries,
    query_levels,
)
from cache_service.policies.base import best_covering


def _exact_scores(qcent, rows, qhat, step):
    """Integer dot products in int64, then float32 as the search computes them."""
    dots = qhat.astype(np.int64) @ qcent[rows].astype(np.int64).T  # [G, m], exact
    scaled = dots.astype(np.float32) * step[:, None]  # exact cast: |dot| < 2**24
    return scaled.max(axis=0) + np.float32(0)


@pytest.mark.parametrize("dim", [1, 7, 63, 64, 128, 129, 256])
@pytest.mark.parametrize("groups", [1, 3, 4])
def test_node_scores_are_the_exact_integer_scores(dim, groups):
    rng = np.random.default_rng(dim * 10 + groups)
    n = 300
    qcent = rng.integers(-CENTROID_LEVELS, CENTROID_LEVELS + 1, (n, dim)).astype(np.int8)
    qcent[0] = CENTROID_LEVELS  # the largest sums the levels allow
    qcent[1] = -CENTROID_LEVELS
    levels = query_levels(dim)
    qhat = rng.integers(-levels, levels + 1, (groups, dim)).astype(np.float32)
    qhat[0] = levels
    step = rng.uniform(1e-4, 10, groups).astype(np.float32)
    rows = rng.integers(0, n, 500).astype(np.int64)  # repeats and any order
    rows[:2] = [0, 1]
    out = np.empty(len(rows), dtype=np.float32)
    compiled.node_scores(qcent, rows, qhat, step, out)
    np.testing.assert_array_equal(out, _exact_scores(qcent, rows, qhat, step))


def _numpy_quantize_queries(queries, scale):
    levels = query_levels(queries.shape[-1])
    q = queries.astype(np.float32) * np.expand_dims(scale.astype(np.float32), -2)
    top = np.abs(q).max(axis=-1, keepdims=True)
    step = np.where(top > 0, top / np.float32(levels), np.float32(1)).astype(np.float32)
    return np.clip(np.rint(q / step), -levels, levels).astype(np.float32), step


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 5), st.integers(1, 140),
    st.sampled_from(["normal", "zeros", "nan", "huge", "per head"]),
)  # fmt: skip
def test_quantized_queries_are_numpys_bit_for_bit(seed, heads, groups, dim, kind):
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((heads, groups, dim)).astype(np.float32)
    scale = rng.uniform(1e-3, 3.0, (heads, dim))
    if kind == "zeros":
        queries[:, 0] = 0.0
    elif kind == "nan":
        queries[0, 0, dim // 2] = np.nan
    elif kind == "huge":
        queries *= np.float32(1e30)
    elif kind == "per head":  # one head's group [G, D] with its scale [D]
        queries, scale = queries[0], scale[0]
    want = _numpy_quantize_queries(queries, scale)
    got = quantize_queries(queries, scale)
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    if kind == "normal" and heads > 1:  # one scale for every head, broadcast
        want = _numpy_quantize_queries(queries, scale[0])
        for w, g in zip(want, quantize_queries(queries, scale[0]), strict=True):
            np.testing.assert_array_equal(g, w)


def test_node_scores_of_quantized_queries_and_no_rows():
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((4, 32)).astype(np.float32)
    qhat, step = quantize_queries(queries, rng.uniform(0.5, 2, 32))
    qcent = rng.integers(-127, 128, (50, 32)).astype(np.int8)
    rows = np.arange(50, dtype=np.int64)
    out = np.empty(50, dtype=np.float32)
    compiled.node_scores(qcent, rows, qhat, step[:, 0], out)
    np.testing.assert_array_equal(out, _exact_scores(qcent, rows, qhat, step[:, 0]))
    zero = np.zeros((2, 32), dtype=np.float32)  # scores 0.0, never -0.0
    compiled.node_scores(qcent, rows, zero, -np.ones(2, dtype=np.float32), out)
    assert np.signbit(out).sum() == 0
    empty = np.empty(0, dtype=np.float32)
    compiled.node_scores(qcent, np.empty(0, dtype=np.int64), qhat, step[:, 0], empty)


@st.composite
def _candidates(draw):
    n = draw(st.integers(1, 400))
    m = draw(st.integers(0, n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    nodes = rng.choice(n, m, replace=False).astype(np.int64)
    kind = draw(st.sampled_from(["normal", "few values", "all equal", "huge ids"]))
    if kind == "normal":
        scores = rng.standard_normal(m)
    elif kind == "few values":  # many ties: the lower id first
        scores = rng.integers(-2, 3, m).astype(float)
    elif kind == "all equal":
        scores = np.full(m, draw(st.sampled_from([0.0, -1.5, 3e38])))
    else:  # ids far above 2**20
        nodes += 2**21
        scores = rng.standard_normal(m)
    counts = np.zeros(int(nodes.max(initial=0)) + 1, dtype=np.int64)
    counts[nodes] = rng.integers(1, 20, m)
    total = int(counts.sum())
    need = draw(st.one_of(st.just(0.0), st.floats(0, 1.3 * total + 1)))
    return nodes, scores.astype(np.float32), counts, need


@settings(max_examples=300, deadline=None)
@given(_candidates())
def test_best_covering_is_the_lexsorted_prefix(case):
    nodes, scores, counts, need = case
    got = compiled.best_covering(nodes, scores, counts, need)
    want = best_covering(nodes, scores, counts[nodes], need)
    assert got.dtype == np.int64
    assert got.tolist() == want.tolist()


@settings(max_examples=300, deadline=None)
@given(_candidates())
def test_ranked_is_the_lexsorted_order(case):
    nodes, scores, _, _ = case
    got = compiled.ranked(scores, nodes)
    assert got.dtype == np.int64
    assert got.tolist() == nodes[np.lexsort((nodes, -scores))].tolist()


def test_widened_halves_are_numpys_cast_of_every_half():
    """All 65536 float16 values, bit for bit (NaNs: NaN; a signalling one comes out quiet)."""
    bits = np.arange(2**16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = compiled.widened(bits)
    nan = np.isnan(want)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()
    assert compiled.widened(bits[:0]).shape == (0,)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.sampled_from([1, 8, 64, 128]))
def test_half_rows_gather_and_widen_as_numpy(seed, n, dim):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 2**16, (50, dim), dtype=np.uint16)
    table[np.isnan(table.view(np.float16))] = 0x3C00  # 1.0 where the bits were a NaN
    rows = rng.integers(0, 50, n).astype(np.int64)  # repeats and any order
    got = compiled.half_rows(table, rows)
    want = table.view(np.float16)[rows].astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (n, dim)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@st.composite
def _weights(draw):
    groups, count = draw(st.integers(1, 8)), draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["softmax", "ties", "underflow"]))
    scores = rng.standard_normal((groups, count)) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    if kind == "ties":  # equal masses: the lower id first
        scores = np.round(scores)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True)).astype(np.float32)
    if kind == "underflow":  # exp(score - max) is 0 far below the max (which is 1)
        weights[(weights < 1) & (rng.random((groups, count)) < 0.5)] = 0
    ids = rng.choice(10 * count + 2**20 * draw(st.integers(0, 3)), count, replace=False)
    take = draw(st.integers(1, count + 5))
    return weights, ids.astype(np.int64), take


@settings(max_examples=300, deadline=None)
@given(_weights(), st.booleans())
def test_heaviest_is_the_lexsorted_top_by_numpys_mass(case, strided):
    weights, ids, take = case
    totals = np.add.reduceat(weights, [0], axis=1)[:, 0]
    mass = (weights / totals[:, None]).mean(axis=0)
    want = np.sort(ids[np.lexsort((ids, -mass))[:take]])
    if strided:  # a head's columns of the layer's weights, as the batched search passes
        wide = np.zeros((weights.shape[0], weights.shape[1] + 3), dtype=np.float32)
        wide[:, 2:-1] = weights
        weights = wide[:, 2:-1]
    got = compiled.heaviest(weights, totals, ids, take)
    assert got.dtype == np.int64
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize(
    "dim", [2, 3, 7, 8, 9, 65, 127, 128, 129, 136, 200, 248, 255, 256, 257, 1031, 4099]
)
def test_squared_distances_sum_as_numpy_does(dim):
    """Row sums of squares in NumPy's pairwise order (blocks of 128, halves above), bit for
    bit, on values of very different magnitudes (where the order shows)."""
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((40, dim)) * rng.lognormal(0, 3, (40, dim))
    centre = rng.standard_normal(dim)
    out = np.empty(40)
    compiled._sq_dists(x, centre, out)
    np.testing.assert_array_equal(out, ((x - centre) ** 2).sum(1))


@st.composite
def _points(draw):
    n, dim = draw(st.integers(2, 150)), draw(st.integers(2, 140))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "lattice", "identical", "clusters", "scaled"]))
    if kind == "normal":
        return rng.standard_normal((n, dim))
    if kind == "lattice":  # many equal distances
        return rng.integers(-1, 2, (n, dim)).astype(np.float64)
    if kind == "identical":
        return np.tile(rng.standard_normal(dim), (n, 1))
    if kind == "clusters":
        centres = 3 * rng.standard_normal((4, dim))
        return centres[rng.integers(0, 4, n)] + 1e-3 * rng.standard_normal((n, dim))
    return rng.standard_normal((n, dim)) * rng.lognormal(0, 4, dim)


@settings(max_examples=400, deadline=None)
@given(_points(), st.sampled_from([0, 1, 8]))
def test_two_means_is_numpys(x, iters):
    got = compiled.two_means(x, iters)
    want = numpy_two_means(x, iters)
    assert got.dtype == np.bool_ and 0 < got.sum() < len(x)
    assert got.tolist() == want.tolist()


def _clear_rows(x, cent):
    """NumPy's labels (``argmin`` of ``_sq_dist``) and the rows whose nearest centroid is
    nearer than the next by more than a dot product's rounding (elsewhere summing in
    another order may pick the other one)."""
    dist = cluster_index._sq_dist(x, cent)
    ordered = np.sort(dist, axis=1)
    gap = ordered[:, 1] - ordered[:, 0] if cent.shape[0] > 1 else np.full(len(x), np.inf)
    scale = np.abs(x).sum(1) * np.abs(cent).sum(1).max() + (cent * cent).sum(1).max()
    return np.argmin(dist, axis=1), gap > 1e-12 * scale


@settings(max_examples=400, deadline=None)
@given(_points(), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_nearest_is_the_argmin_of_numpys_distances(x, k, seed):
    rng = np.random.default_rng(seed)
    cent = np.concatenate([x[rng.integers(0, len(x), k)], rng.standard_normal((1, x.shape[1]))])
    want, clear = _clear_rows(x, cent)
    assert compiled.nearest(x, cent)[clear].tolist() == want[clear].tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 70), st.integers(1, 6))
def test_nearest_of_integer_points_ties_to_the_first_as_numpy(seed, n, dim, k):
    """Small integers: every sum is exact, so ties are real and go to the first centroid."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (n, dim)).astype(np.float64)
    cent = rng.integers(-2, 3, (k, dim)).astype(np.float64)
    want = np.argmin(cluster_index._sq_dist(x, cent), axis=1)
    assert compiled.nearest(x, cent).tolist() == want.tolist()


@settings(max_examples=300, deadline=None)
@given(_points())
def test_two_means_labels_are_the_two_means_split_then_the_nearer_mean(x):
    second = numpy_two_means(x, 8)
    want, clear = _clear_rows(x, np.stack([x[~second].mean(0), x[second].mean(0)]))
    assert compiled.two_means_labels(x, 8)[clear].tolist() == want[clear].tolist()


@pytest.mark.parametrize("dim", [8, 64])
def test_an_index_lays_out_the_same_leaves_with_numpys_two_means(dim, monkeypatch):
    """A build (its last cuts: ``two_means_labels``, ``nearest``) and inserts (their
    descent, appends, and splits that call ``two_means``) give the same layout, compiled or
    in NumPy."""
    rng = np.random.default_rng(dim)
    centres = 2 * rng.standard_normal((24, dim))
    keys = (centres[rng.integers(0, 24, 3000)] + rng.standard_normal((3000, dim))).astype("f4")

    def layout():
        index = ClusterIndex(dim, IndexConfig(seed=3))
        index.build(keys[:2500], np.arange(2500))
        index.insert(keys[2500:], np.arange(2500, 3000))
        leaves = index.num_leaves
        sums = index.levels[0].sums[:leaves].tolist()
        return index.tokens[:leaves].tolist(), index.fill[:leaves].tolist(), sums

    compiled_layout = layout()
    monkeypatch.setattr(cluster_index, "two_means", numpy_two_means)
    monkeypatch.setattr(compiled, "nearest", _numpy_nearest)
    monkeypatch.setattr(compiled, "two_means_labels", _numpy_two_means_labels)
    monkeypatch.setattr(ClusterIndex, "nearest_leaves", _numpy_nearest_leaves)
    monkeypatch.setattr(compiled, "append_fitting", _numpy_append_fitting)
    assert layout() == compiled_layout


@settings(max_examples=300, deadline=None)
@given(_points(), st.sampled_from([np.float32, np.float64]), st.floats(0.0, 3.0))
def test_augmented_keys_and_quantized_centroids_are_numpys_bit_for_bit(x, sums_dtype, spread):
    rng = np.random.default_rng(len(x))
    bound = float(np.sqrt((x**2).sum(1).max())) * (0.5 + spread)  # some rows above it
    extra = np.sqrt(np.maximum(bound**2 - (x**2).sum(1), 0.0))
    want = np.concatenate([x, extra[:, None]], axis=1)
    np.testing.assert_array_equal(compiled.augmented(x, bound**2), want)
    counts = rng.integers(0, 9, len(x))
    sums = (x * np.maximum(counts, 1)[:, None] * (1 + spread)).astype(sums_dtype)
    scale = np.abs(x).max(0) * rng.uniform(0.001, 0.05, x.shape[1]) + 1e-3  # some clip
    nodes = np.flatnonzero(rng.random(len(x)) < 0.6)
    cent = (sums[nodes] / np.maximum(counts[nodes], 1)[:, None]).astype(np.float32)
    want = np.zeros((len(x), x.shape[1]), np.int8)
    q = np.rint(cent / scale)
    want[nodes] = np.clip(q, -CENTROID_LEVELS, CENTROID_LEVELS)
    got = np.zeros_like(want)
    compiled.quantize(sums, counts, scale, nodes, CENTROID_LEVELS, got)
    np.testing.assert_array_equal(got, want)


def test_augmented_keys_take_the_bound_squared_as_the_index_squares_it():
    """``M**2`` (libm's ``pow``) and ``M * M`` differ in the last bit for ~1 bound in 1300:
    the caller squares, so the last column is the NumPy formulation's for every bound."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3)) * 50
    bounds = rng.uniform(100.0, 1000.0, 20000).tolist()
    differ = [b for b in bounds if b**2 != b * b]
    assert differ  # the case the argument exists for
    for bound in differ[:200]:
        extra = np.sqrt(np.maximum(bound**2 - (x**2).sum(1), 0.0))
        want = np.concatenate([x, extra[:, None]], axis=1)
        np.testing.assert_array_equal(compiled.augmented(x, bound**2), want)


def _numpy_append_fitting(target, x, token_ids, page_size, fill, tokens, sums, counts):
    """What ``_insert_page`` did in NumPy for the leaves with room (the reference)."""
    leaves, count = np.unique(target, return_counts=True)
    fits = fill[leaves] + count <= page_size
    rows = np.flatnonzero(np.isin(target, leaves[fits]))
    order = rows[np.argsort(target[rows], kind="stable")]
    leaf_of = target[order]
    group_start = np.searchsorted(leaf_of, leaf_of, side="left")
    slots = fill[leaf_of] + np.arange(len(order)) - group_start
    tokens[leaf_of, slots] = token_ids[order]
    np.add.at(sums, leaf_of, x[order])
    np.add.at(counts, leaf_of, 1)
    np.add.at(fill, leaf_of, 1)
    return leaves, order, leaf_of, slots, leaves[~fits]


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 16), st.integers(1, 12), st.integers(2, 16))
def test_append_fitting_is_the_numpy_page_insert_bit_for_bit(seed, m, leaves, page):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, leaves, m)
    x = rng.standard_normal((m, 5)) * rng.choice([1e-3, 1.0, 1e4], (m, 1))
    token_ids = rng.permutation(1000)[:m].astype(np.int64)
    fill = rng.integers(0, page + 1, leaves)
    tokens = np.where(np.arange(page) < fill[:, None], 7, -1).astype(np.int32)
    sums = rng.standard_normal((leaves, 5)).astype(np.float32)
    counts = fill.copy()
    want_state = [a.copy() for a in (fill, tokens, sums, counts)]
    want = _numpy_append_fitting(target, x, token_ids, page, *want_state)
    got = compiled.append_fitting(target, x, token_ids, page, fill, tokens, sums, counts)
    for w, g in zip(want, got, strict=True):
        assert g.tolist() == w.tolist()
    for w, g in zip(want_state, (fill, tokens, sums, counts), strict=True):
        np.testing.assert_array_equal(g, w)


def _numpy_nearest_leaves(index, x):
    """``ClusterIndex.nearest_leaves`` in NumPy: distances by ``_sq_dist`` (BLAS), each
    key's ``insert_beam`` nearest by ``argpartition``, children from the child lists."""
    cand = np.arange(index.levels[-1].n, dtype=np.int64)
    for depth in range(len(index.levels) - 1, 0, -1):
        level = index.levels[depth]
        dist = cluster_index._sq_dist(x, level.centroids(cand))
        beam = min(index.config.insert_beam, len(cand))
        if beam < len(cand):
            kept = np.unique(np.argpartition(dist, beam - 1, axis=1)[:, :beam])
        else:
            kept = np.arange(len(cand))
        cand = np.sort(level.children_of(cand[kept]))
    return cand[np.argmin(cluster_index._sq_dist(x, index.levels[0].centroids(cand)), axis=1)]


def _level(rng, nodes, dim, sums_dtype, integers=False):
    """Sums and counts of a level of ``nodes`` (small integers: every sum exact) and an
    ascending subset of candidates."""
    if integers:
        sums = rng.integers(-2, 3, (nodes, dim)).astype(sums_dtype)
        counts = np.ones(nodes, dtype=np.int64)
    else:
        counts = rng.integers(0, 12, nodes)  # 0: an empty node counts as 1
        sums = (rng.standard_normal((nodes, dim)) * np.maximum(counts, 1)[:, None]).astype(
            sums_dtype
        )
    cand = np.flatnonzero(rng.random(nodes) < 0.7).astype(np.int64)
    return sums, counts, cand if len(cand) else np.arange(nodes, dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**32 - 1), st.integers(1, 17), st.integers(1, 90), st.integers(1, 60),
    st.sampled_from([np.float32, np.float64]), st.integers(1, 5),
)  # fmt: skip
def test_descent_steps_are_numpys_distances_on_keys_clear_of_rounding(
    seed, m, nodes, dim, sums_dtype, beam
):
    rng = np.random.default_rng(seed)
    sums, counts, cand = _level(rng, nodes, dim, sums_dtype)
    x = rng.standard_normal((m, dim))
    xt = np.ascontiguousarray(x.T)
    cent = (sums[cand] / np.maximum(counts[cand], 1)[:, None]).astype(np.float32)
    dist = cluster_index._sq_dist(x, cent)
    ordered = np.sort(dist, axis=1)
    scale = np.abs(x).sum(1) * np.abs(cent.astype(np.float64)).sum(1).max() + 1.0
    # the nearest leaf: where the best is clear of the second
    want, clear = _clear_rows(x, cent.astype(np.float64))
    got = compiled.nearest_nodes(xt, sums, counts, cand)
    assert got[clear].tolist() == cand[want][clear].tolist()
    # one level's beam: where the beam-th nearest is clear of the next, for every key
    parents = rng.integers(-1, nodes, 3 * nodes)
    below = int(rng.integers(0, 3 * nodes + 1))
    got = compiled.beam_children(xt, sums, counts, cand, beam, parents, below)
    if beam < len(cand):
        gaps = ordered[:, beam] - ordered[:, beam - 1]
        if not (gaps > 1e-12 * scale).all():
            return
        kept = cand[np.unique(np.argpartition(dist, beam - 1, axis=1)[:, :beam])]
    else:
        kept = cand
    children = np.flatnonzero(np.isin(parents[:below], kept))
    assert got.tolist() == children.tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 17), st.integers(1, 40), st.integers(1, 30))
def test_descent_steps_of_integer_points_keep_the_first_of_equals(seed, m, nodes, dim):
    """Small integers: every distance is exact, ties are real, and the first node wins."""
    rng = np.random.default_rng(seed)
    sums, counts, cand = _level(rng, nodes, dim, np.float32, integers=True)
    x = rng.integers(-2, 3, (m, dim)).astype(np.float64)
    xt = np.ascontiguousarray(x.T)
    dist = cluster_index._sq_dist(x, sums[cand].astype(np.float64))  # [m, k], exact
    got = compiled.nearest_nodes(xt, sums, counts, cand)
    assert got.tolist() == cand[np.argmin(dist, axis=1)].tolist()
    beam = min(3, len(cand))
    kept = set()
    for row in dist:
        kept.update(cand[np.lexsort((np.arange(len(cand)), row))[:beam]].tolist())
    parents = np.arange(nodes, dtype=np.int64)  # node v's only child is v
    got = compiled.beam_children(xt, sums, counts, cand, beam, parents, nodes)
    assert got.tolist() == sorted(kept)


def _numpy_nearest(x, cent):
    return np.argmin(cluster_index._sq_dist(x, cent), axis=1)


def _numpy_two_means_labels(x, iters):
    second = numpy_two_means(x, iters)
    return _numpy_nearest(x, np.stack([x[~second].mean(0), x[second].mean(0)]))


_SEARCH_AFTER_WARM_UP = """
import json

import numpy as np
from cache_service import compiled
from cache_service.batched_search import search_heads, search_heads_tokens
from cache_service.cluster_index import ClusterIndex, IndexConfig
functions = [
    compiled.node_scores, compiled.best_covering, compiled.heaviest, compiled.two_means,
    compiled.two_means_labels, compiled.nearest, compiled.probe, compiled.search,
    compiled.beam_children, compiled.nearest_nodes, compiled.augmented, compiled.quantize,
    compiled.append_fitting, compiled.quantized_queries,
]
compiled.warm_up()
warm = [len(f.signatures) for f in functions]
rng = np.random.default_rng(0)
indexes = []
for seed in range(2):
    index = ClusterIndex(8, IndexConfig(seed=seed, scan_nodes=16))
    index.build(rng.standard_normal((2000, 8)).astype(np.float32), np.arange(2000))
    index.insert(rng.standard_normal((40, 8)).astype(np.float32), np.arange(2000, 2040))
    indexes.append(index)
queries = rng.standard_normal((2, 3, 8)).astype(np.float32)
search_heads(indexes, queries, 64)
search_heads_tokens(indexes, queries, 64)
indexes[0].search(queries[0], 64)
indexes[0].search_tokens(queries[0], 64)
print(json.dumps([warm, [len(f.signatures) for f in functions]]))
"""


def test_warm_up_compiles_every_signature_a_build_and_a_search_use():
    """A fresh process: after ``warm_up`` no build, insert or search compiles anything more
    (a call site passing other dtypes would compile at its first request)."""
    out = subprocess.run(
        [sys.executable, "-c", _SEARCH_AFTER_WARM_UP],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    warm, used = json.loads(out.stdout)
    assert used == warm and min(warm) >= 1
