"""Inner loops of the index search, build and page inserts (and the pool's copy of single
tokens into scratch pages) compiled with numba: work that NumPy runs as tens of calls per KV
head (a gather, a cast, a matmul, a reduction, a sort) on arrays of a few dozen to a few
thousand rows, where the calls cost more than the arithmetic.

Each function computes exactly what its NumPy formulation computes (the tests compare them
bit for bit), except two kinds. The token stage of ``search`` (``heaviest_keys``,
``heaviest_leaves``) sums its dot products in vector lanes and takes libm's ``exp``, so it is
its own reference: every search path calls it, so a batched and a per-head search agree
exactly, and the tests compare its choice with a float64 brute force. ``nearest`` (a
build's last cuts) and an insert's descent (``beam_children``, ``nearest_nodes``) sum in
order where NumPy's formulation calls BLAS, so a choice could differ where two centroids
are within a dot product's rounding of a key (the tests compare the keys clear of that,
exact ties, and whole builds and inserts). Compiled code is cached next to this file
(``__pycache__``), so a process compiles only what no earlier one did.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@numba.njit(cache=True, nogil=True, boundscheck=False)
def node_scores(
    qcent: np.ndarray, rows: np.ndarray, qhat: np.ndarray, step: np.ndarray, out: np.ndarray
) -> None:
    """``out[i] = max_g step[g] × (qhat[g] · qcent[rows[i]]) + 0`` in float32.

    The dot products are integer sums (int16 query levels times int8 centroids) kept in
    int32, which lets LLVM sum them in 32-bit lanes with the CPU's widening multiply-add
    (``vpmaddwd``, 16 products an instruction): a 32k layer's centroid scores take ~10%
    less time than summed in float32 here at head dim 128, ~40% less at odd dims.
    Every one is an integer below 2**24, exact in int32 and in float32, so the result is
    the float32 formulation's bit for bit.

    Args:
        qcent: ``[n, D]`` int8 quantized centroids.
        rows: ``[m]`` int64 rows of ``qcent`` to score.
        qhat: ``[G, D]`` float32 integers in ``[-L, L]`` (``query_levels``; ``L`` < 2**15).
        step: ``[G]`` float32 step of each query.
        out: ``[m]`` float32, written.
    """
    groups, dim = qhat.shape
    levels = np.empty((groups, dim), dtype=np.int16)
    for g in range(groups):
        for d in range(dim):
            levels[g, d] = np.int16(qhat[g, d])
    dots = np.empty(groups, dtype=np.int32)  # int32: the sums' low 32 bits are all they are
    count = rows.shape[0]
    for i in range(count):
        if i + PREFETCH_AHEAD < count:
            _prefetch_row(qcent, rows[i + PREFETCH_AHEAD])
        row = rows[i]
        for g in range(groups):
            acc = 0
            for d in range(dim):
                acc += np.int16(qcent[row, d]) * levels[g, d]
            dots[g] = acc
        best = np.float32(-np.inf)
        for g in range(groups):
            score = np.float32(dots[g]) * step[g]
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
def ranked(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` (int64) by ``values`` (float32, no NaN) descending, then id ascending:
    ``ids[np.lexsort((ids, -values))]``."""
    return (np.sort(_ranks(values, ids)) & _LOW).astype(np.int64)


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


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _block_sum(a: np.ndarray, start: int, n: int) -> float:
    """NumPy's ``pairwise_sum`` of at most 128 values: eight accumulators, then the rest."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[start + i]
        return res
    r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
    r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
    i = 8
    while i < n - n % 8:  # eight accumulators in registers (no array to allocate)
        b = start + i
        r0, r1, r2, r3 = r0 + a[b], r1 + a[b + 1], r2 + a[b + 2], r3 + a[b + 3]
        r4, r5, r6, r7 = r4 + a[b + 4], r5 + a[b + 5], r6 + a[b + 6], r7 + a[b + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _pairwise_sum(a: np.ndarray, start: int, n: int) -> float:
    """NumPy's float64 ``add.reduce`` over ``a[start : start + n]`` (``pairwise_sum``: blocks
    of up to 128 values, larger runs split in halves of a multiple of 8, left + right), bit
    for bit. Iterative: numba's cache does not reload recursive functions safely."""
    if n <= 128:
        return _block_sum(a, start, n)
    half = n // 2 - (n // 2) % 8
    if n - half <= 128:  # two blocks (a key of up to ~250 dims): no stack to allocate
        return _block_sum(a, start, half) + _block_sum(a, start + half, n - half)
    starts, sizes = np.empty(128, np.int64), np.empty(128, np.int64)
    phases, values = np.zeros(128, np.int64), np.empty(128)
    starts[0], sizes[0], top, held = start, n, 1, 0
    while top:
        s, m = starts[top - 1], sizes[top - 1]
        half = m // 2 - (m // 2) % 8
        if m <= 128:
            values[held] = _block_sum(a, s, m)
            held += 1
            top -= 1
        elif phases[top - 1] == 0:  # the left half first
            phases[top - 1] = 1
            starts[top], sizes[top], phases[top] = s, half, 0
            top += 1
        elif phases[top - 1] == 1:  # then the right half
            phases[top - 1] = 2
            starts[top], sizes[top], phases[top] = s + half, m - half, 0
            top += 1
        else:  # both summed: left + right
            values[held - 2] = values[held - 2] + values[held - 1]
            held -= 1
            top -= 1
    return values[0]


def _widen_half(typingctx: object, bits: types.Type) -> object:
    """``_single``'s typing and code: the float32 value of a float16 given by its bits
    (``uint16``), by LLVM's ``fpext``, which x86 CPUs with F16C (all since 2012) run 8 values
    to an instruction. Exact for every half; a signalling NaN comes out quiet, as the
    hardware widens it."""
    if bits != types.uint16:
        return None

    def codegen(context: object, builder: ir.IRBuilder, signature: object, args: list) -> object:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


_single: Any = intrinsic(_widen_half)
"""``_single(bits)`` in compiled code: a float16's bits (``uint16``) -> its float32 value."""


def _prefetch_code(
    typingctx: object, array: types.Type, row: types.Type, offset: types.Type
) -> object:
    """``_prefetch``'s typing and code: LLVM's ``prefetch`` (read, keep in every cache level)
    of byte ``offset`` of row ``row`` of a 2-D array, a hint with no effect on any value."""
    if not (isinstance(array, types.Array) and array.ndim == 2):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: list) -> object:
        view = context.make_array(signature.args[0])(context, builder, args[0])
        stride = builder.extract_value(view.strides, 0)
        byte = builder.add(builder.mul(args[1], stride), args[2])
        data = builder.bitcast(view.data, ir.IntType(8).as_pointer())
        address = builder.gep(data, [byte])
        int32 = ir.IntType(32)
        prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch",
            (),
            ir.FunctionType(ir.VoidType(), [address.type, int32, int32, int32]),
        )
        flags = [ir.Constant(int32, 0), ir.Constant(int32, 3), ir.Constant(int32, 1)]
        builder.call(prefetch, [address, *flags])
        return context.get_dummy_value()

    return types.none(array, types.intp, types.intp), codegen


_prefetch: Any = intrinsic(_prefetch_code)
"""``_prefetch(array, row, offset)`` in compiled code: start loading byte ``offset`` of
``array[row]`` into the caches (scattered rows: the loads of the next rows overlap the
work on this one)."""


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _prefetch_row(array: np.ndarray, row: int) -> None:
    """``_prefetch`` every cache line of ``array[row]`` (2-D, rows contiguous)."""
    last = array.shape[1] * array.itemsize - 1
    for offset in range(0, last, 64):
        _prefetch(array, row, offset)
    _prefetch(array, row, last)


PREFETCH_AHEAD = 8
"""Rows a scattered read asks for ahead of the one it works on (measured at 32k: centroid
scores of a head's leaves, scattered over ~570 KB, ~1.6x faster; a layer's whole
``icecache-tokens`` search, its keys scattered over the pool, ~7% faster)."""


@numba.njit(cache=True, nogil=True, boundscheck=False)
def widened(halves: np.ndarray) -> np.ndarray:
    """float16 values given by their bits ``[n]`` uint16 as float32 ``[n]``:
    ``halves.view(np.float16).astype(np.float32)`` (NumPy's cast is scalar code, ~20x
    slower on this project's CPU)."""
    out = np.empty(halves.shape[0], dtype=np.float32)
    for i in range(halves.shape[0]):
        out[i] = _single(halves[i])
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def half_rows(halves: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows ``[n, D]`` float32 of float16 rows given by their bits ``[R, D]`` uint16:
    ``halves.view(np.float16)[rows].astype(np.float32)`` in one pass (selection reads the
    keys it scores exactly this way, scattered over the pool's pages)."""
    dim = halves.shape[1]
    out = np.empty((rows.shape[0], dim), dtype=np.float32)
    for i in range(rows.shape[0]):
        row = rows[i]
        for d in range(dim):
            out[i, d] = _single(halves[row, d])
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def copy_slots(
    rows: np.ndarray,
    positions: np.ndarray,
    fill: np.ndarray,
    src_pages: np.ndarray,
    src_slots: np.ndarray,
    dest_pages: np.ndarray,
    dest_slots: np.ndarray,
) -> None:
    """Copy single tokens of a page pool: the key, value and position at ``(src_pages[i],
    src_slots[i])`` to ``(dest_pages[i], dest_slots[i])``; a destination page's fill grows
    to cover its slot. What ``PagePool.read_slots`` then ``write_slots`` do (less the version
    bump), in one pass instead of ~15 NumPy calls: a scratch gather of a layer's picks.

    Args:
        rows: the pool's data as rows ``[pages × 2 × P, D]`` (page ``p``'s keys are rows
            ``2pP .. 2pP + P - 1``, its values the next ``P``); float32 or float16 bits.
        positions: ``[pages, P]`` int64; fill: ``[pages]`` int64.
        src_pages, src_slots, dest_pages, dest_slots: ``[n]`` int64; no destination is a
            source.
    """
    size = positions.shape[1]
    dim = rows.shape[1]
    count = src_pages.shape[0]
    for i in range(count):
        if i + PREFETCH_AHEAD < count:  # the sources are scattered over the pool
            page, slot = src_pages[i + PREFETCH_AHEAD], src_slots[i + PREFETCH_AHEAD]
            _prefetch_row(rows, page * 2 * size + slot)
            _prefetch_row(rows, page * 2 * size + slot + size)
            _prefetch(positions, page, slot * positions.itemsize)
        page, slot = dest_pages[i], dest_slots[i]
        src = src_pages[i] * 2 * size + src_slots[i]
        dest = page * 2 * size + slot
        for d in range(dim):
            rows[dest, d] = rows[src, d]
            rows[dest + size, d] = rows[src + size, d]
        positions[page, slot] = positions[src_pages[i], src_slots[i]]
        if fill[page] <= slot:
            fill[page] = slot + 1


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _children(ptr: np.ndarray, flat: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The children of ``nodes``, node by node, from a level's CSR copy (``ptr``, ``flat``)."""
    total = 0
    for i in range(nodes.shape[0]):
        total += ptr[nodes[i] + 1] - ptr[nodes[i]]
    out = np.empty(total, dtype=np.int64)
    k = 0
    for i in range(nodes.shape[0]):
        for j in range(ptr[nodes[i]], ptr[nodes[i] + 1]):
            out[k] = flat[j]
            k += 1
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def probe(
    qcents: Any, counts: Any, ptrs: Any, flats: Any, top: int, needs: np.ndarray,
    qhat: np.ndarray, step: np.ndarray,
) -> tuple[np.ndarray, int, int]:  # fmt: skip
    """The leaves a search scores token by token (``ClusterIndex._probe``): all ``top`` nodes
    of the first level scored, at each level the best ones until their counts reach its
    need (``best_covering``), their children the next level's candidates; at the leaves,
    the best ones until their fills reach the last need.

    Args:
        qcents: tuple of ``[n_l, D]`` int8 quantized centroids, one a level from the first
            one scored down to the leaves.
        counts: tuple of ``[n_l]`` int64 tokens under each node (the leaves' fills last).
        ptrs, flats: tuple of each level's children as CSR (the leaves' entries unused).
        top: nodes of the first level.
        needs: ``[levels]`` float64 tokens each level's best nodes must cover.
        qhat, step: the quantized query group (``node_scores``).

    Returns:
        the leaves (best first), the upper nodes scored and the leaves scored.
    """
    nodes = np.arange(top)
    scored = 0
    last = len(qcents) - 1
    for i in range(last):
        scores = np.empty(nodes.shape[0], dtype=np.float32)
        node_scores(qcents[i], nodes, qhat, step, scores)
        best = best_covering(nodes, scores, counts[i], needs[i])
        scored += nodes.shape[0]
        nodes = _children(ptrs[i], flats[i], best)
    scores = np.empty(nodes.shape[0], dtype=np.float32)
    node_scores(qcents[last], nodes, qhat, step, scores)
    return best_covering(nodes, scores, counts[last], needs[last]), scored, nodes.shape[0]


def _as_single(value: Any) -> np.float32:
    """A key coordinate as float32: the float16 bits (``uint16``) widened, a float32 as is
    (the compiled form is ``_as_single_compiled``)."""
    if isinstance(value, np.uint16):
        return np.float32(np.array(value).view(np.float16))
    return np.float32(value)


@overload(_as_single)
def _as_single_compiled(value):  # type: ignore[no-untyped-def]  # numba matches the bare signature
    if value == types.uint16:
        return lambda value: _single(value)
    if value == types.float32:
        return lambda value: value
    return None


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "contract"})
def _scaled_dots(
    table: np.ndarray, rows: np.ndarray, queries: np.ndarray, scale: Any, out: np.ndarray
) -> None:
    """``out[g, t] = scale × queries[g] · table[rows[t]]`` in float32, each key row widened
    once. Its sums are reassociated (vector lanes), the same way for every call: a token's
    score depends on its key and the queries only, not on the other tokens."""
    groups, dim = queries.shape
    key = np.empty(dim, dtype=np.float32)
    count = rows.shape[0]
    for t in range(count):
        if t + PREFETCH_AHEAD < count:
            _prefetch_row(table, rows[t + PREFETCH_AHEAD])
        row = rows[t]
        for d in range(dim):
            key[d] = _as_single(table[row, d])
        for g in range(groups):
            acc = np.float32(0)
            for d in range(dim):
                acc += key[d] * queries[g, d]
            out[g, t] = acc * scale


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def heaviest_keys(
    table: np.ndarray, rows: np.ndarray, ids: np.ndarray, queries: np.ndarray, scale: float,
    take: int,
) -> np.ndarray:  # fmt: skip
    """Ids (ascending) of the ``take`` tokens with the most attention mass: each query's
    softmax of ``scale × q·k`` over the tokens, mean over the group (``heaviest``).

    Args:
        table: ``[R, D]`` keys: float16 bits (``uint16``) or float32.
        rows: ``[T >= 1]`` row of each token's key.
        ids: ``[T]`` token ids, distinct, below 2**32.
        queries: ``[G, D]`` float32.
    """
    groups, count = queries.shape[0], rows.shape[0]
    weights = np.empty((groups, count), dtype=np.float32)
    _scaled_dots(table, rows, queries, np.float32(scale), weights)
    totals = np.empty(groups, dtype=np.float32)
    for g in range(groups):
        top = weights[g, 0]
        for t in range(1, count):
            top = max(top, weights[g, t])
        total = np.float32(0)
        for t in range(count):
            weights[g, t] = np.exp(weights[g, t] - top)
            total += weights[g, t]
        totals[g] = total
    return heaviest(weights, totals, ids, min(take, count))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _token_rows(
    leaves: np.ndarray, fill: np.ndarray, tokens: np.ndarray, token_page: np.ndarray,
    token_slot: np.ndarray, rows_per_page: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Token ids ``[T]`` of ``leaves`` (leaf by leaf, slot order) and the row of each one's
    key in a key table (``search``)."""
    size = tokens.shape[1]
    n = 0
    for leaf in leaves:
        n += fill[leaf]
    ids = np.empty(n, dtype=np.int64)
    rows = np.empty(n, dtype=np.int64)
    k = 0
    for leaf in leaves:
        for slot in range(fill[leaf]):
            token = tokens[leaf, slot]
            ids[k] = token
            if rows_per_page:
                rows[k] = np.int64(token_page[token]) * rows_per_page + token_slot[token]
            else:
                rows[k] = leaf * size + slot
            k += 1
    return ids, rows


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def heaviest_leaves(
    table: np.ndarray, rows: np.ndarray, leaves: np.ndarray, fill: np.ndarray,
    queries: np.ndarray, scale: float, take: int,
) -> np.ndarray:  # fmt: skip
    """Of ``leaves`` (``[L >= 1]``, each with ``fill[leaf] >= 1`` tokens whose keys are the
    ``rows`` of ``table``, leaf by leaf), those that carry the most attention mass, most
    first (ties: the lower id), as many as fit ``take`` tokens: the longest prefix that
    fits, then any later leaf small enough for what is left (``fill_within``). A leaf's
    mass: ``exp(scale × q·k - max)`` summed over its tokens, each query's sums normalised
    over the leaves, mean over the group."""
    groups, count = queries.shape[0], rows.shape[0]
    weights = np.empty((groups, count), dtype=np.float32)
    _scaled_dots(table, rows, queries, np.float32(scale), weights)
    sums = np.zeros((groups, leaves.shape[0]), dtype=np.float32)
    for g in range(groups):
        top = weights[g, 0]
        for t in range(1, count):
            top = max(top, weights[g, t])
        t = 0
        for i in range(leaves.shape[0]):
            for _ in range(fill[leaves[i]]):
                sums[g, i] += np.exp(weights[g, t] - top)
                t += 1
    mass = np.zeros(leaves.shape[0], dtype=np.float32)
    for g in range(groups):
        total = np.float32(0)
        for i in range(leaves.shape[0]):
            total += sums[g, i]
        for i in range(leaves.shape[0]):
            mass[i] += sums[g, i] / total
    ranks = ranked(mass / np.float32(groups), leaves)
    out = np.empty(ranks.shape[0], dtype=np.int64)
    taken, left, i = 0, take, 0
    while i < ranks.shape[0] and fill[ranks[i]] <= left:  # the longest prefix that fits
        left -= fill[ranks[i]]
        out[taken] = ranks[i]
        taken += 1
        i += 1
    while i < ranks.shape[0] and left > 0:  # then whatever still fits
        if fill[ranks[i]] <= left:
            left -= fill[ranks[i]]
            out[taken] = ranks[i]
            taken += 1
        i += 1
    return out[:taken]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def search(
    qcents: Any, counts: Any, ptrs: Any, flats: Any, top: int, needs: np.ndarray,
    qhat: np.ndarray, step: np.ndarray, tokens: np.ndarray, table: np.ndarray,
    token_page: np.ndarray, token_slot: np.ndarray, rows_per_page: int,
    queries: np.ndarray, scale: float, take: int, leaves: bool,
) -> tuple[np.ndarray, int, int, int]:  # fmt: skip
    """A whole ``ClusterIndex.search`` (``leaves``) or ``search_tokens`` in one call:
    ``probe``, then ``heaviest_leaves`` of the probed leaves or ``heaviest_keys`` of their
    tokens, the keys read in place.

    Args:
        tokens: ``[leaves, P]`` token id in each leaf slot.
        table: ``[R, D]`` keys (float16 bits or float32). Token ``t`` of leaf slot ``(l, s)``
            has its key in row ``token_page[t] × rows_per_page + token_slot[t]``, or, with
            ``rows_per_page`` 0, in row ``l × P + s`` (the index's own copy).

    Returns:
        leaf ids (most mass first) or token ids (ascending), upper nodes scored, leaves
        scored, tokens scored.
    """
    probed, scored, seen = probe(qcents, counts, ptrs, flats, top, needs, qhat, step)
    fill = counts[len(counts) - 1]
    ids, rows = _token_rows(probed, fill, tokens, token_page, token_slot, rows_per_page)
    if ids.shape[0] == 0:
        return ids, scored, seen, 0
    if leaves:
        found = heaviest_leaves(table, rows, probed, fill, queries, scale, take)
    else:
        found = heaviest_keys(table, rows, ids, queries, scale, take)
    return found, scored, seen, ids.shape[0]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _sq_dists(x: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    """``out = ((x - c) ** 2).sum(1)`` as NumPy computes it (rows ``[n, d]`` contiguous)."""
    dim = x.shape[1]
    diff = np.empty(dim)
    for i in range(x.shape[0]):
        for j in range(dim):
            t = x[i, j] - c[j]
            diff[j] = t * t
        out[i] = 0.0 + _pairwise_sum(diff, 0, dim)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _mean_rows(x: np.ndarray, take: np.ndarray, want: bool) -> np.ndarray:
    """``x[take == want].mean(0)`` as NumPy computes it for ``d >= 2`` (each column summed
    row by row, then divided by the count)."""
    out = np.zeros(x.shape[1])
    count = 0
    for i in range(x.shape[0]):
        if take[i] == want:
            count += 1
            for j in range(x.shape[1]):
                out[j] += x[i, j]
    return out / count


@numba.njit(cache=True, nogil=True, boundscheck=False)
def two_means(x: np.ndarray, iters: int) -> np.ndarray:
    """``cluster_index.two_means`` of ``x [n >= 2, d >= 2]`` (float64, C order), exactly:
    the same seeds, the same float64 arithmetic in NumPy's order, the same stopping rule."""
    n = x.shape[0]
    da, db = np.empty(n), np.empty(n)
    _sq_dists(x, _mean_rows(x, np.ones(n, dtype=np.bool_), True), da)
    a = x[np.argmax(da)].copy()
    _sq_dists(x, a, da)
    b = x[np.argmax(da)].copy()
    _sq_dists(x, b, db)
    second = db < da
    for _ in range(iters):
        count = second.sum()
        if not 0 < count < n:
            break
        a, b = _mean_rows(x, second, False), _mean_rows(x, second, True)
        _sq_dists(x, a, da)
        _sq_dists(x, b, db)
        new = db < da
        if (new == second).all():
            break
        second = new
    count = second.sum()
    if not 0 < count < n:  # identical points: halve in order
        second = np.arange(n) >= n // 2
    return second


@numba.njit(cache=True, nogil=True, boundscheck=False)
def nearest(x: np.ndarray, cent: np.ndarray) -> np.ndarray:
    """The nearest centroid of each row ``[n]`` int64, the first of equals: the argmin of
    ``‖c‖² - 2 x·c`` (``cluster_index._sq_dist``) over ``cent [k, d]`` for every row of
    ``x [n, d]`` (float64, C order). ``‖c‖²`` is NumPy's sum; the dot products are summed
    in order, where ``_sq_dist`` uses BLAS: the same labels unless two centroids are as
    near as the last bits of a dot product (ties of exact values go to the first in both)."""
    n, dim = x.shape
    k = cent.shape[0]
    norms = np.empty(k)
    square = np.empty(dim)
    for j in range(k):
        for d in range(dim):
            square[d] = cent[j, d] * cent[j, d]
        norms[j] = _pairwise_sum(square, 0, dim)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        best, label = np.inf, 0
        for j in range(k):
            dot = 0.0
            for d in range(dim):
                dot += x[i, d] * cent[j, d]
            dist = norms[j] - 2.0 * dot
            if dist < best:
                best, label = dist, j
        out[i] = label
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def quantized_queries(
    queries: np.ndarray, scale: np.ndarray, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """``cluster_index.quantize_queries`` of ``queries [H, G, D]`` (float32) with each
    head's ``scale [H, D]`` (float64), exactly, in one pass: ``q = query × float32(scale)``
    in float32, a step of ``max |q| / levels`` per query (1 where that is 0, or NaN as a
    NaN query gives it), ``clip(rint(q / step), -levels, levels)``. Returns ``qhat [H, G, D]``
    and the steps ``[H, G]`` (float32)."""
    heads, groups, dim = queries.shape
    qhat = np.empty((heads, groups, dim), dtype=np.float32)
    steps = np.empty((heads, groups), dtype=np.float32)
    q = np.empty(dim, dtype=np.float32)
    top_level = np.float32(levels)
    for h in range(heads):
        for g in range(groups):
            top = np.float32(0.0)
            nan = False
            for d in range(dim):
                value = queries[h, g, d] * np.float32(scale[h, d])
                q[d] = value
                size = abs(value)
                if size > top:
                    top = size
                elif size != size:
                    nan = True
            step = top / top_level if top > 0 and not nan else np.float32(1.0)
            steps[h, g] = step
            for d in range(dim):
                level = np.rint(q[d] / step)
                if level < -top_level:
                    level = -top_level
                elif level > top_level:
                    level = top_level
                qhat[h, g, d] = level
    return qhat, steps


@numba.njit(cache=True, nogil=True, boundscheck=False)
def augmented(keys: np.ndarray, top: float) -> np.ndarray:
    """``ClusterIndex._augment`` of ``keys [n, d]`` (float64, C order), exactly: each row
    and ``sqrt(max(top - ‖k‖², 0))`` as a last column, ``‖k‖²`` summed as NumPy sums.
    ``top`` is the bound squared by the caller (Python's ``M**2`` calls libm's ``pow``,
    which can differ from ``M * M`` in the last bit)."""
    n, dim = keys.shape
    out = np.empty((n, dim + 1))
    square = np.empty(dim)
    for i in range(n):
        for d in range(dim):
            value = keys[i, d]
            out[i, d] = value
            square[d] = value * value
        out[i, dim] = np.sqrt(max(top - _pairwise_sum(square, 0, dim), 0.0))
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _centroid(sums: np.ndarray, node: int, d: int, count: float) -> float:
    """Coordinate ``d`` of node ``node``'s centroid as ``_Level.centroids`` gives it:
    ``sums / max(count, 1)`` (``count`` given so) in float64, rounded to float32."""
    return np.float64(np.float32(np.float64(sums[node, d]) / count))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def quantize(
    sums: np.ndarray,
    counts: np.ndarray,
    scale: np.ndarray,
    nodes: np.ndarray,
    levels: int,
    qcent: np.ndarray,
) -> None:
    """``_Level.quantize`` of ``nodes``, exactly: ``qcent[node] = clip(rint(c / scale),
    -levels, levels)`` for the centroid's key coordinates ``c`` (``sums / max(count, 1)``
    in float64, rounded to float32), in one pass instead of ~8 NumPy calls."""
    dim = qcent.shape[1]
    for i in range(nodes.shape[0]):
        node = nodes[i]
        count = np.float64(max(counts[node], 1))
        for d in range(dim):
            q = np.rint(_centroid(sums, node, d, count) / scale[d])
            qcent[node, d] = np.int8(min(max(q, -levels), levels))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def append_fitting(
    target: np.ndarray,
    x: np.ndarray,
    token_ids: np.ndarray,
    page_size: int,
    fill: np.ndarray,
    tokens: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The part of a page insert (``ClusterIndex._insert_page``) whose leaves have room:
    the rows (keys ``x [m, d]``, ``token_ids [m]``) whose leaf ``target [m]`` can take all
    of the page's rows bound for it are appended after its tokens, leaf by leaf in arrival
    order (``tokens``, ``fill``, the leaf ``sums`` (float32: each row added in float64,
    then rounded, as ``np.add.at`` does) and ``counts`` updated).

    Returns ``leaves`` (the distinct targets, ascending), ``order`` (the appended rows, by
    leaf then arrival), their ``leaf_of`` and ``slots``, and ``overflow`` (the leaves that
    cannot take their rows, ascending: the caller splits them)."""
    m = target.shape[0]
    fits = np.empty(m, dtype=np.bool_)
    for i in range(m):
        bound = 0  # rows of the page bound for this row's leaf
        for j in range(m):
            if target[j] == target[i]:
                bound += 1
        fits[i] = fill[target[i]] + bound <= page_size
    order = np.empty(m, dtype=np.int64)  # insertion sorts by leaf: stable, m is a page
    leaves = np.empty(m, dtype=np.int64)
    leaf_fits = np.empty(m, dtype=np.bool_)
    taken, distinct = 0, 0
    for i in range(m):
        leaf = target[i]
        k = distinct
        while k > 0 and leaves[k - 1] > leaf:
            k -= 1
        if k == 0 or leaves[k - 1] != leaf:  # a new leaf: shift the larger ones up
            for j in range(distinct, k, -1):
                leaves[j], leaf_fits[j] = leaves[j - 1], leaf_fits[j - 1]
            leaves[k], leaf_fits[k] = leaf, fits[i]
            distinct += 1
        if fits[i]:
            k = taken
            while k > 0 and target[order[k - 1]] > leaf:
                order[k] = order[k - 1]
                k -= 1
            order[k] = i
            taken += 1
    leaf_of = np.empty(taken, dtype=np.int64)
    slots = np.empty(taken, dtype=np.int64)
    for r in range(taken):
        row = order[r]
        leaf = target[row]
        slot = fill[leaf]
        leaf_of[r], slots[r] = leaf, slot
        tokens[leaf, slot] = token_ids[row]
        fill[leaf] = slot + 1
        counts[leaf] += 1
        for d in range(x.shape[1]):
            sums[leaf, d] = np.float64(sums[leaf, d]) + x[row, d]
    overflow = np.empty(distinct, dtype=np.int64)
    count = 0
    for k in range(distinct):
        if not leaf_fits[k]:
            overflow[count] = leaves[k]
            count += 1
    return leaves[:distinct], order[:taken], leaf_of, slots, overflow[:count]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _centroid_dists(
    xt: np.ndarray, sums: np.ndarray, counts: np.ndarray, nodes: np.ndarray, out: np.ndarray
) -> None:
    """``out[j, i] = ‖c‖² - 2 x_i·c`` for ``c`` node ``nodes[j]``'s centroid as
    ``_Level.centroids`` gives it (``sums / max(count, 1)`` in float64, rounded to float32)
    and ``x_i`` column ``i`` of ``xt [d, m]`` (float64, C order): what
    ``cluster_index._sq_dist`` computes, ``‖c‖²`` as NumPy sums it and each dot product
    summed in order (as ``nearest``). The centroids are laid out by coordinate, so a key's
    dot products with all of them are vector lanes (2.2x faster than lanes over keys)
    without reordering any sum."""
    dim, m = xt.shape
    k = nodes.shape[0]
    cent = np.empty((k, dim))
    square = np.empty(dim)
    norms = np.empty(k)
    for j in range(k):
        node = nodes[j]
        count = np.float64(max(counts[node], 1))
        for d in range(dim):
            value = _centroid(sums, node, d, count)
            cent[j, d] = value
            square[d] = value * value
        norms[j] = _pairwise_sum(square, 0, dim)
    by_coord = np.ascontiguousarray(cent.T)  # [d, j]
    dots = np.empty(k)
    for i in range(m):
        dots[:] = 0.0
        for d in range(dim):
            value = xt[d, i]
            for j in range(k):
                dots[j] += value * by_coord[d, j]
        for j in range(k):
            out[j, i] = norms[j] - 2.0 * dots[j]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def beam_children(
    xt: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    nodes: np.ndarray,
    beam: int,
    parents: np.ndarray,
    below: int,
) -> np.ndarray:
    """One level of an insert's descent (``ClusterIndex.nearest_leaves``): of the candidate
    ``nodes`` (sums and counts of their level), each key (column of ``xt [d, m]``) keeps its
    ``beam`` nearest (all when there are no more); returns the children of the nodes any key
    kept, ascending: the nodes ``v < below`` of the level beneath whose ``parents[v]`` was
    kept. Distances as ``_centroid_dists``; of equal distances the first node is kept."""
    k, m = nodes.shape[0], xt.shape[1]
    kept = np.zeros(sums.shape[0], dtype=np.bool_)
    if beam >= k:
        for j in range(k):
            kept[nodes[j]] = True
    else:
        dist = np.empty((k, m))
        _centroid_dists(xt, sums, counts, nodes, dist)
        taken = np.zeros(k, dtype=np.bool_)
        for i in range(m):
            taken[:] = False
            for _ in range(beam):
                best, arg = np.inf, 0
                for j in range(k):
                    if not taken[j] and dist[j, i] < best:
                        best, arg = dist[j, i], j
                taken[arg] = True
                kept[nodes[arg]] = True
    out = np.empty(below, dtype=np.int64)
    count = 0
    for v in range(below):
        parent = parents[v]
        if parent >= 0 and kept[parent]:
            out[count] = v
            count += 1
    return out[:count]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def nearest_nodes(
    xt: np.ndarray, sums: np.ndarray, counts: np.ndarray, nodes: np.ndarray
) -> np.ndarray:
    """The nearest of ``nodes`` to each key (column of ``xt [d, m]``) ``[m]``, the first of
    equals: the last step of an insert's descent. Distances as ``_centroid_dists``."""
    k, m = nodes.shape[0], xt.shape[1]
    if k == 0:
        raise ValueError("no candidate nodes to choose from")
    dist = np.empty((k, m))
    _centroid_dists(xt, sums, counts, nodes, dist)
    out = np.empty(m, dtype=np.int64)
    for i in range(m):
        best, arg = np.inf, 0
        for j in range(k):
            if dist[j, i] < best:
                best, arg = dist[j, i], j
        out[i] = nodes[arg]
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def two_means_labels(x: np.ndarray, iters: int) -> np.ndarray:
    """``x [n >= 2, d >= 2]`` (float64, C order) split by ``two_means``, then each row
    labelled by the nearer of the two groups' means (``nearest``): the last cut of a
    build into two leaves, in one call instead of ~10 NumPy calls."""
    second = two_means(x, iters)
    cent = np.empty((2, x.shape[1]))
    cent[0] = _mean_rows(x, second, False)
    cent[1] = _mean_rows(x, second, True)
    return nearest(x, cent)


def warm_up() -> None:
    """Compile (or load from the cache) every function here for the argument types the
    index passes, so that no request pays for it: a first compile takes ~1 min of CPU on
    this project's 2-core machine, a load from the cache well under a second. ``make setup`` and
    the container build run it; a cache service runs it when it starts."""
    qcent = np.zeros((3, 4), dtype=np.int8)
    rows = np.arange(3, dtype=np.int64)
    node_scores(
        qcent, rows, np.ones((2, 4), np.float32), np.ones(2, np.float32), np.empty(3, np.float32)
    )
    best_covering(rows, np.ones(3, np.float32), np.ones(3, np.int64), 2.0)
    ranked(np.ones(3, np.float32), rows)
    halves = np.ones((3, 4), np.float16).view(np.uint16)
    half_rows(halves, rows)
    widened(halves.reshape(-1))
    weights = np.ones((2, 5), dtype=np.float32)[:, 1:4]  # a head's columns of the layer's
    heaviest(weights, np.ones(2, np.float32), np.arange(3, dtype=np.int32), 2)
    # A search scores the leaves and the levels above them it descends, one signature per
    # count: 1 up to ~4k leaves (~30k tokens), 2 up to ~4k level-1 nodes (~460k), 3 beyond.
    qhat, queries = np.ones((2, 4), np.float32), np.ones((2, 4), np.float32)
    tokens, places = np.arange(6, dtype=np.int32).reshape(3, 2), np.zeros(6, np.int32)
    for levels in range(1, 4):
        plan = (
            tuple(qcent for _ in range(levels)),
            tuple(np.full(3, 2, np.int64) for _ in range(levels)),
            tuple(np.arange(4, dtype=np.int64) for _ in range(levels)),  # node i: child i
            tuple(rows for _ in range(levels)),
            3,
            np.full(levels, 2.0),
        )
        probe(*plan, qhat, np.ones(2, np.float32))
        for table in (np.ones((6, 4), np.float16).view(np.uint16), np.ones((6, 4), np.float32)):
            search(*plan, qhat, np.ones(2, np.float32), tokens, table, places, places, 1,
                   queries, 0.5, 2, True)  # fmt: skip
    keys = np.ones((6, 4), np.float32)  # read through a plain key source
    heaviest_keys(keys, np.arange(6), np.arange(6, dtype=np.int32), queries, 0.5, 2)
    heaviest_leaves(keys, np.arange(6), rows, np.full(3, 2, np.int64), queries, 0.5, 2)
    two_means(np.arange(8, dtype=np.float64).reshape(4, 2), 8)
    two_means_labels(np.arange(8, dtype=np.float64).reshape(4, 2), 8)
    nearest(np.ones((3, 2)), np.ones((2, 2)))
    xt, nodes, parents = np.ones((2, 3)), np.arange(2, dtype=np.int64), np.zeros(4, np.int64)
    for sums in (np.ones((2, 2), np.float32), np.ones((2, 2))):  # leaves' sums are float32
        beam_children(xt, sums, np.ones(2, np.int64), nodes, 1, parents, 4)
        nearest_nodes(xt, sums, np.ones(2, np.int64), nodes)
        quantize(sums, np.ones(2, np.int64), np.ones(1), nodes, 127, np.zeros((2, 1), np.int8))
    augmented(np.ones((2, 3)), 2.0)
    quantized_queries(np.ones((2, 3, 4), np.float32), np.ones((2, 4)), 127)
    append_fitting(nodes, np.ones((2, 3)), nodes, 4, np.zeros(2, np.int64),
                   np.full((2, 4), -1, np.int32), np.zeros((2, 3), np.float32),
                   np.zeros(2, np.int64))  # fmt: skip
    places = np.zeros(1, np.int64)  # the pool's rows: float32, or float16 as its bits
    for pool_rows in (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint16)):
        copy_slots(pool_rows, np.zeros((1, 2), np.int64), places.copy(), places, places,
                   places, places)  # fmt: skip
