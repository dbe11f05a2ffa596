"""One search for all KV heads of a layer: ``ClusterIndex.search`` over many indexes at once.

Decoding asks, per layer, which leaves each of its KV heads attends. Searching head by head
costs ~30 NumPy calls per head, most of them on small arrays. Here the NumPy stages (the
softmax over scored tokens, the leaf masses, the leaf ranking) run once for the layer over
the heads' candidates laid end to end (ragged, no padding); what stays per head is one call
each to the compiled loops (``cache_service.compiled``: centroid scores, the covering cut,
the token top-k), the key gathers and the exact stage's matmul (each head owns its arrays).

The result is exactly ``[index.search(q, max_tokens) for index, q in zip(indexes, queries)]``
(same leaves, same order), by construction rather than by tolerance:

- centroid scores are integer dot products of int8 centroids and quantized queries, exact
  in float32 whatever the batching or summation order (``query_levels``);
- the exact stage's matmul is per head with the same operands as the per-head search;
  ``exp``, products and quotients are elementwise; sums over a leaf or a head go through
  ``np.add.reduceat`` over the same contiguous segments; maxima are exact;
- every ranking is a total order: score descending, then node id (``compiled._ranks``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cache_service import compiled
from cache_service.cluster_index import (
    ClusterIndex,
    SearchEffort,
    quantize_queries,
)
from cache_service.policies.base import fill_within, group_scores


def search_heads(
    indexes: Sequence[ClusterIndex], queries: np.ndarray, max_tokens: int | Sequence[int]
) -> list[np.ndarray]:
    """Leaves of each index for its query group, as ``ClusterIndex.search`` returns them.

    Args:
        indexes: ``[H]`` indexes of one head dimension ``D`` (e.g. the KV heads of a layer).
        queries: ``[H, G, D]`` query group of each index.
        max_tokens: token budget of every head, or of each ``[H]``.

    Returns:
        ``[H]`` arrays of leaf ids, most attention mass first; sets each ``last_effort``.
    """
    queries, budgets, live, probed = _probe_heads(indexes, queries, max_tokens)
    out = [np.empty(0, dtype=np.int64) for _ in indexes]
    if not live:
        return out
    heads = [indexes[h] for h in live]
    fills = [index.fill[nodes] for index, nodes in zip(heads, probed, strict=True)]
    ranked = _ranked(probed, _leaf_mass(heads, queries[live], probed, fills))
    for i, h in enumerate(live):
        out[h] = fill_within(ranked[i], heads[i].fill[ranked[i]], budgets[h])
    return out


def search_heads_tokens(
    indexes: Sequence[ClusterIndex], queries: np.ndarray, max_tokens: int | Sequence[int]
) -> list[np.ndarray]:
    """Token ids of each index for its query group, as ``ClusterIndex.search_tokens``
    returns them (``icecache-tokens``): the probe runs once for the layer as in
    ``search_heads``, and so does the ranking of the probed leaves' tokens
    (``ClusterIndex.heaviest_tokens`` of every head)."""
    queries, budgets, live, probed = _probe_heads(indexes, queries, max_tokens)
    out = [np.empty(0, dtype=np.int64) for _ in indexes]
    if not live:
        return out
    heads = [indexes[h] for h in live]
    found = _heaviest_tokens(heads, queries[live], probed, [budgets[h] for h in live])
    for h, tokens in zip(live, found, strict=True):
        out[h] = tokens
    return out


def _probe_heads(
    indexes: Sequence[ClusterIndex], queries: np.ndarray, max_tokens: int | Sequence[int]
) -> tuple[np.ndarray, list[int], list[int], list[np.ndarray]]:
    """Checks the arguments; the heads with leaves and budget (``live``) and, for each, the
    leaves its search scores token by token (``ClusterIndex._probe``); sets every head's
    ``last_effort``. Returns the queries as float32, every head's budget, ``live``, and the
    probed leaves of each live head."""
    queries = np.asarray(queries, dtype=np.float32)
    if len(indexes) == 0:
        return queries, [], [], []
    dim = indexes[0].dim
    if queries.ndim != 3 or queries.shape[0] != len(indexes) or queries.shape[1] == 0:
        raise ValueError(
            f"queries must be [{len(indexes)}, G >= 1, {dim}], got {tuple(queries.shape)}"
        )
    if any(index.dim != queries.shape[2] for index in indexes):
        raise ValueError(f"every index and the queries must have head_dim {queries.shape[2]}")
    budgets = [int(b) for b in np.broadcast_to(np.asarray(max_tokens), (len(indexes),))]
    if min(budgets) < 0:
        raise ValueError(f"max_tokens must be non-negative, got {min(budgets)}")
    live = [h for h, index in enumerate(indexes) if index.num_leaves and budgets[h]]
    for h in range(len(indexes)):
        indexes[h].last_effort = SearchEffort(0, 0, 0)
    if not live:
        return queries, budgets, live, []
    heads = [indexes[h] for h in live]
    group = queries[live]  # [H', G, D]
    quotas = [index.effort(budgets[h]) for h, index in zip(live, heads, strict=True)]
    qhat, step = quantize_queries(group, np.stack([index.qscale for index in heads]))
    scored, leaves = _fields_of_view(heads, qhat, step, [view for view, _ in quotas])
    scores = _centroid_scores([index.levels[0].qcent for index in heads], leaves, qhat, step)
    fills = [index.fill for index in heads]
    probed = _best(leaves, scores, fills, [exact for _, exact in quotas])
    for i, index in enumerate(heads):
        tokens = int(index.fill[probed[i]].sum())
        index.last_effort = SearchEffort(scored[i], len(leaves[i]), tokens)
    return queries, budgets, live, probed


def _fields_of_view(
    heads: list[ClusterIndex], qhat: np.ndarray, step: np.ndarray, views: list[float]
) -> tuple[list[int], list[np.ndarray]]:
    """Upper nodes scored per head, and the leaves in each head's field of view
    (``ClusterIndex._field_of_view``, one round per level for every head still above)."""
    depth = [index.start_depth() for index in heads]
    nodes = [
        np.arange(index.levels[d].n, dtype=np.int64) for index, d in zip(heads, depth, strict=True)
    ]
    scored = [0] * len(heads)
    while any(depth):
        act = [i for i, d in enumerate(depth) if d]
        levels = [heads[i].levels[depth[i]] for i in act]
        cand = [nodes[i] for i in act]
        scores = _centroid_scores([lv.qcent for lv in levels], cand, qhat[act], step[act])
        counts = [lv.counts for lv in levels]
        needs = [views[i] * 2 ** (depth[i] - 1) for i in act]
        for i, level, best in zip(act, levels, _best(cand, scores, counts, needs), strict=True):
            scored[i] += len(nodes[i])
            nodes[i] = level.children_of(best)
            depth[i] -= 1
    return scored, nodes


def _centroid_scores(
    qcents: list[np.ndarray], nodes: list[np.ndarray], qhat: np.ndarray, step: np.ndarray
) -> np.ndarray:
    """``centroid_scores`` of each head's ``nodes`` (rows of its int8 ``qcents``), laid end
    to end ``[sum of lens]``; ``qhat [H, G, D]``, ``step [H, G, 1]``. One compiled call per
    head, no gathered copy of the centroids."""
    ends = np.cumsum([len(n) for n in nodes])
    scores = np.empty(int(ends[-1]), dtype=np.float32)
    for h, (qcent, rows, end) in enumerate(zip(qcents, nodes, ends, strict=True)):
        compiled.node_scores(qcent, rows, qhat[h], step[h, :, 0], scores[end - len(rows) : end])
    return scores


def _best(
    nodes: list[np.ndarray], scores: np.ndarray, counts: list[np.ndarray], needs: list[float]
) -> list[np.ndarray]:
    """``best_covering`` of every head: its best nodes until their counts reach its
    need; ``scores`` laid end to end, ``counts`` indexed by node id. One compiled call per
    head (a partition, then a sort of the likely best)."""
    ends = np.cumsum([len(n) for n in nodes])
    return [
        compiled.best_covering(n, scores[end - len(n) : end], c, float(need))
        for n, c, need, end in zip(nodes, counts, needs, ends, strict=True)
    ]


def _leaf_mass(
    heads: list[ClusterIndex],
    queries: np.ndarray,
    leaves: list[np.ndarray],
    fills: list[np.ndarray],
) -> list[np.ndarray]:
    """``ClusterIndex._leaf_mass`` of every head's ``leaves``: tokens of all heads end to
    end, one matmul per head, every other step once for the layer."""
    tokens = np.array([int(f.sum()) for f in fills])
    ends = np.cumsum(tokens)
    scores = np.empty((queries.shape[1], int(ends[-1])), dtype=np.float32)  # [G, T]
    for h, index in enumerate(heads):
        keys = index.leaf_keys(leaves[h])
        scores[:, ends[h] - tokens[h] : ends[h]] = group_scores(queries[h], keys)
    weights = _exp_scores(scores, heads, tokens)
    flat_fills = np.concatenate(fills)
    per_leaf = np.add.reduceat(weights, np.cumsum(flat_fills) - flat_fills, axis=1)  # [G, L]
    sizes = np.array([len(n) for n in leaves])
    total = np.add.reduceat(per_leaf, np.cumsum(sizes) - sizes, axis=1)  # [G, H]
    mass = (per_leaf / np.repeat(total, sizes, axis=1)).mean(axis=0)
    return np.split(mass, np.cumsum(sizes)[:-1])


def _heaviest_tokens(
    heads: list[ClusterIndex],
    queries: np.ndarray,
    leaves: list[np.ndarray],
    budgets: list[int],
) -> list[np.ndarray]:
    """``ClusterIndex.heaviest_tokens`` of every head (``leaves`` each non-empty): tokens of
    all heads end to end, one matmul per head, the softmax once for the layer, the mass and
    the ranking in one compiled call per head."""
    found = [index.tokens_of(probed) for index, probed in zip(heads, leaves, strict=True)]
    ids, keys = [i for i, _ in found], [k for _, k in found]
    tokens = np.array([len(i) for i in ids])
    starts = np.cumsum(tokens) - tokens
    scores = np.empty((queries.shape[1], int(tokens.sum())), dtype=np.float32)  # [G, T]
    for h, (a, n) in enumerate(zip(starts, tokens, strict=True)):
        scores[:, a : a + n] = group_scores(queries[h], keys[h])
    weights = _exp_scores(scores, heads, tokens)
    totals = np.add.reduceat(weights, starts, axis=1).T.copy()  # [H, G]
    return [
        compiled.heaviest(weights[:, a : a + n], totals[h], ids[h], budget)
        for h, (a, n, budget) in enumerate(zip(starts, tokens, budgets, strict=True))
    ]


def _exp_scores(scores: np.ndarray, heads: list[ClusterIndex], tokens: np.ndarray) -> np.ndarray:
    """``exp(scale × q·k - max)`` in place of the scores ``[G, T]`` of every head's
    ``tokens`` laid end to end, the max per query head and head (as ``leaf_mass`` and
    ``token_mass`` take it head by head)."""
    scales = np.array([index.softmax_scale for index in heads], dtype=np.float32)
    if (scales == scales[0]).all():
        scores *= heads[0].softmax_scale
    else:
        scores *= np.repeat(scales, tokens)[None, :]
    top = np.maximum.reduceat(scores, np.cumsum(tokens) - tokens, axis=1)  # [G, H]
    scores -= np.repeat(top, tokens, axis=1)
    return np.exp(scores, out=scores)


def _ranked(ids: list[np.ndarray], mass: list[np.ndarray]) -> list[np.ndarray]:
    """Each head's leaf ids by mass descending, then id."""
    return [compiled.ranked(m, n) for n, m in zip(ids, mass, strict=True)]
