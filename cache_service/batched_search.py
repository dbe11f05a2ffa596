"""One search for all KV heads of a layer: ``ClusterIndex.search`` (``search_tokens``) over
many indexes at once.

Decoding asks, per layer, which leaves (``icecache``) or tokens (``icecache-tokens``) each
of its KV heads attends. The queries are quantized once for the layer; each head's whole
search is then one compiled call (``compiled.search``:
the probe level by level, the probed leaves' keys read in place, their scores, the softmax,
the ranking), the very call its own ``search`` makes, so the result is exactly
``[index.search(q, max_tokens) for index, q in zip(indexes, queries)]`` (the quantization is
elementwise and per query).

Those calls hold no lock, but two threads over a layer's heads did not help in a decode
step: a layer's centroids and keys come from DRAM there, not the caches (1.5x faster warm,
1.0x cold, at 32k).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cache_service.cluster_index import (
    ClusterIndex,
    SearchEffort,
    quantize_queries,
)


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
    return _search(indexes, queries, max_tokens, ClusterIndex.quantized_search)


def search_heads_tokens(
    indexes: Sequence[ClusterIndex], queries: np.ndarray, max_tokens: int | Sequence[int]
) -> list[np.ndarray]:
    """Token ids of each index for its query group, as ``ClusterIndex.search_tokens``
    returns them (``icecache-tokens``); arguments as ``search_heads``'s."""
    return _search(indexes, queries, max_tokens, ClusterIndex.quantized_search_tokens)


def _search(
    indexes: Sequence[ClusterIndex],
    queries: np.ndarray,
    max_tokens: int | Sequence[int],
    search: Callable[[ClusterIndex, np.ndarray, np.ndarray, np.ndarray, int], np.ndarray],
) -> list[np.ndarray]:
    """``search`` (a ``ClusterIndex.quantized_*`` method) of every head with leaves and
    budget, the queries quantized once for the layer; empty arrays for the others."""
    queries, budgets, live = _checked(indexes, queries, max_tokens)
    out = [np.empty(0, dtype=np.int64) for _ in indexes]
    if not live:
        return out
    qhat, step = _quantized([indexes[h] for h in live], queries[live])
    for i, h in enumerate(live):
        out[h] = search(indexes[h], queries[h], qhat[i], step[i], budgets[h])
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
