"""Inner loops of the index search compiled with numba: work that NumPy runs as a gather, a
cast, a matmul and a reduction per KV head, on arrays of a few thousand rows, where the calls
cost more than the arithmetic.

Each function computes exactly what its NumPy formulation computes (the tests compare them
bit for bit). Compiled code is cached next to this file (``__pycache__``), so a process
compiles only what no earlier one did.
"""

from __future__ import annotations

import numba
import numpy as np

_EXACT = {"reassoc", "contract"}
"""Float flags for sums of integers below 2**24 in magnitude: float32 holds every partial
sum exactly, so reordering (which lets the loop vectorize) and fused multiply-adds cannot
change a bit."""


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_EXACT)
def node_scores(
    qcent: np.ndarray, rows: np.ndarray, qhat: np.ndarray, step: np.ndarray, out: np.ndarray
) -> None:
    """``out[i] = max_g step[g] × (qhat[g] · qcent[rows[i]]) + 0`` in float32.

    Args:
        qcent: ``[n, D]`` int8 quantized centroids.
        rows: ``[m]`` int64 rows of ``qcent`` to score.
        qhat: ``[G, D]`` float32 integers in ``[-L, L]`` (``query_levels``): every dot
            product and partial sum is an integer below 2**24, exact in float32.
        step: ``[G]`` float32 step of each query.
        out: ``[m]`` float32, written.
    """
    groups, dim = qhat.shape
    for i in range(rows.shape[0]):
        row = rows[i]
        best = np.float32(-np.inf)
        for g in range(groups):
            acc = np.float32(0)
            for d in range(dim):
                acc += np.float32(qcent[row, d]) * qhat[g, d]
            score = acc * step[g]
            if score > best:
                best = score
        out[i] = best + np.float32(0)  # -0.0 -> 0.0, as NumPy's max(...) + 0


_LOW = np.uint64(0xFFFFFFFF)
_SIGN = np.uint64(0x80000000)
_SHIFT = np.uint64(32)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _ranks(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """One ``uint64`` per entry whose ascending order is ``values`` (float32) descending,
    then ``ids`` (below 2**32) ascending: ``np.lexsort((ids, -values))`` as one key."""
    bits = values.view(np.uint32)
    keys = np.empty(values.shape[0], dtype=np.uint64)
    for i in range(values.shape[0]):
        b = np.uint64(bits[i])
        ascending = (_LOW - b) if b & _SIGN else (b | _SIGN)
        keys[i] = ((_LOW - ascending) << _SHIFT) | np.uint64(ids[i])
    return keys


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _covering(ranked: np.ndarray, counts: np.ndarray, need: float) -> int:
    """How many of the sorted ``ranked`` keys it takes for their ids' ``counts`` to reach
    ``need`` (0 if they never do)."""
    covered = 0
    for i in range(ranked.shape[0]):
        covered += counts[np.int64(ranked[i] & _LOW)]
        if covered >= need:
            return i + 1
    return 0


@numba.njit(cache=True, nogil=True, boundscheck=False)
def best_covering(
    nodes: np.ndarray, scores: np.ndarray, counts: np.ndarray, need: float
) -> np.ndarray:
    """``policies.base.best_covering``: the best-scoring ``nodes`` (score descending, then
    node id) until their ``counts`` (indexed by node id) reach ``need``; all of them if
    they never do. Only the likely best are sorted (a partition first), all of them when
    those fall short."""
    m = nodes.shape[0]
    keys = _ranks(scores, nodes)
    total = 0
    for i in range(m):
        total += counts[nodes[i]]
    likely = 2 * int(np.ceil(need * m / max(total, 1))) + 1
    if likely < m:
        best = np.sort(keys[keys < np.partition(keys, likely)[likely]])
        taken = _covering(best, counts, need)
        if taken:
            return (best[:taken] & _LOW).astype(np.int64)
    ranked = np.sort(keys)
    taken = _covering(ranked, counts, need) or m
    return (ranked[:taken] & _LOW).astype(np.int64)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def heaviest(weights: np.ndarray, totals: np.ndarray, ids: np.ndarray, take: int) -> np.ndarray:
    """Ids (ascending, int64) of the ``take`` tokens with the most attention mass, ties to
    the lower id: ``mass = (weights / totals[:, None]).mean(axis=0)`` in float32, as NumPy
    computes it (each quotient rounded, summed over the group in order, divided by ``G``).

    Args:
        weights: ``[G, T]`` float32 ``exp`` of each query's scores of the tokens.
        totals: ``[G]`` float32 sums of each query's weights.
        ids: ``[T]`` token ids, distinct, below 2**32.
        take: at least 1.
    """
    groups, count = weights.shape
    mass = np.empty(count, dtype=np.float32)
    for i in range(count):
        m = weights[0, i] / totals[0]
        for g in range(1, groups):
            m += weights[g, i] / totals[g]
        mass[i] = m / np.float32(groups)
    keys = _ranks(mass, ids)
    if take < count:
        keys = np.partition(keys, take - 1)[:take]
    out = (keys & _LOW).astype(np.int64)
    out.sort()
    return out
