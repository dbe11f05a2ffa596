"""One search for all KV heads of a layer: ``ClusterIndex.search`` over many indexes at once.

Decoding asks, per layer, which leaves (``icecache``) or tokens (``icecache-tokens``) each
of its KV heads attends. The queries are quantized once for the layer; each head's probe
(``compiled.probe``: centroid scores and covering cuts, level by level) is one compiled
call. For ``icecache-tokens`` so is the rest of the head's search (``compiled.search_tokens``:
the probed leaves' keys read in place, scored, the softmax, the top tokens). Those calls
hold no lock, but two threads over a layer's heads did not help in a decode step: a layer's
centroids and keys come from DRAM there, not the caches (1.5x faster warm, 1.0x cold, at
32k). For ``icecache`` the NumPy stages (the softmax over scored tokens, the leaf masses)
run once for the layer over the heads' candidates laid end to end (ragged, no padding),
one matmul per head.

The result is exactly ``[index.search(q, max_tokens) for index, q in zip(indexes, queries)]``
(same leaves, same order), by construction rather than by tolerance:

- a head's probe and token search are the same compiled calls as its own search's, on the
  same operands (the quantization is elementwise and per query);
- the leaf stage's matmul is per head with the same operands as the per-head search;
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
    queries, budgets, live = _checked(indexes, queries, max_tokens)
    out = [np.empty(0, dtype=np.int64) for _ in indexes]
    if not live:
        return out
    heads = [indexes[h] for h in live]
    qhat, step = _quantized(heads, queries[live])
    probed = []
    for i, (h, index) in enumerate(zip(live, heads, strict=True)):
        plan = index.probe_plan(budgets[h])
        assert plan is not None, "a live head has leaves and a budget"
        probed.append(index.quantized_probe(plan, qhat[i], step[i]))
    fills = [index.fill[nodes] for index, nodes in zip(heads, probed, strict=True)]
    ranked = _ranked(probed, _leaf_mass(heads, queries[live], probed, fills))
    for i, h in enumerate(live):
        out[h] = fill_within(ranked[i], heads[i].fill[ranked[i]], budgets[h])
    return out


def search_heads_tokens(
    indexes: Sequence[ClusterIndex], queries: np.ndarray, max_tokens: int | Sequence[int]
) -> list[np.ndarray]:
    """Token ids of each index for its query group, as ``ClusterIndex.search_tokens``
    returns them (``icecache-tokens``): the queries quantized once for the layer, then
    each head's whole search in one compiled call."""
    queries, budgets, live = _checked(indexes, queries, max_tokens)
    out = [np.empty(0, dtype=np.int64) for _ in indexes]
    if not live:
        return out
    qhat, step = _quantized([indexes[h] for h in live], queries[live])
    for i, h in enumerate(live):
        out[h] = indexes[h].quantized_search_tokens(queries[h], qhat[i], step[i], budgets[h])
    return out


def _checked(
    indexes: Sequence[ClusterIndex], queries: np.ndarray, max_tokens: int | Sequence[int]
) -> tuple[np.ndarray, list[int], list[int]]:
    """Checks the arguments; returns the queries as float32, every head's budget, and the
    heads with leaves and budget (``live``). Clears every other head's ``last_effort``."""
    queries = np.asarray(queries, dtype=np.float32)
    if len(indexes) == 0:
        return queries, [], []
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
    for h in set(range(len(indexes))) - set(live):
        indexes[h].last_effort = SearchEffort(0, 0, 0)
    return queries, budgets, live


def _quantized(heads: list[ClusterIndex], queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_queries`` of every head's group ``[H, G, D]`` at once (elementwise and per
    query: the values a head's own call gives); the steps as ``[H, G]``."""
    qhat, step = quantize_queries(queries, np.stack([index.qscale for index in heads]))
    return qhat, step[..., 0]


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
