"""The IceCache index: keys clustered by meaning into leaves of one physical page each.

One index serves one (sequence, layer, KV head). It knows keys, token ids, leaves and
slots; which physical page a leaf is, and the K/V bytes, belong to the caller
(``cache_service.policies.indexed``), which applies the returned ``Placement``\\ s (or,
for ``icecache-tokens``, leaves its tokens in their positional pages). The cache service's
indexes read the keys they score from the caller's pages (a ``KeySource``); a standalone
index keeps its own float16 copy.

Geometry. Attention ranks keys by inner product with the query, so maximum inner product
search is turned into nearest-neighbour search: each key ``k`` is augmented with
``sqrt(M² - ‖k‖²)`` (``M`` a running bound on the key norm) and queries with ``0``. In
that space Euclidean clusters are groups of keys that score alike against any query, and
``q·centroid`` is the mean score of a node's tokens. Clustering and nearest-leaf insertion
use the augmented vectors; search needs only the first ``D`` coordinates.

Structure. ``levels[0]`` are the leaves, each holding at most ``page_size`` tokens
stored contiguously in slots ``0..fill-1``. ``levels[l]`` (l ≥ 1) groups the nodes of
level ``l-1``; the top level has no parent. Every node keeps the sum and count of the
augmented vectors of all tokens below it, so centroids stay exact under updates.

Build (prefill): leaves by recursive FAISS k-means into ``fanout`` clusters while a
cluster holds more than ``fanout`` leaves' worth of tokens (``cap = build_fill ×
page_size`` each), then cut freely (k-means into the fewest leaves that could hold it,
parts over ``cap`` cut again), leaving room for inserts: leaves ~45% full. Opt-in packing
(``pack_push``, with ``build_fill`` 1.0) gives the last cut the fewest leaves that hold it,
each token taken by the nearest centroid with room, where that costs at most
``pack_push`` of the cut's squared error: leaves ~70% full on the model's real keys (a third
fewer pages, a third less index) at the same recall at 8k but 2.4% less at 16k
(``bench/results/leaf_packing.md``), so it is off by default. Upper levels by FAISS
k-means over the centroids below (weighted by token counts), ``fanout`` children per node,
until at most ``top_nodes`` remain.

Insert (decode), a page of tokens at a time: each token descends the hierarchy (at every
level it keeps its ``insert_beam`` nearest nodes; the children of the nodes kept by any
token of the page are the next candidates) to the nearest candidate leaf, so the cost
grows with the beam, not with the number of leaves. A leaf that would overflow is split
together with its new tokens by 2-means until every part fits a page; the part of its
oldest token keeps its id, the others get new ids under the same parent; a parent with
more than ``2 × fanout`` children splits the same way, up to the top.

Search, in three stages whose effort grows with the sequence (as DCI's field of view
does): (1) score every node of the lowest level with at most ``scan_nodes`` nodes (the
leaves themselves while they are few) against the query group (max over the group's
heads) and descend under the best nodes until the leaves reached hold the field of view,
``max(view × exact, view_fraction × n)`` tokens; (2) rank those leaves by centroid score and
keep the best holding ``exact = max(probe × max_tokens, probe_fraction × n)`` tokens;
(3) score their tokens exactly and rank the leaves by the attention mass they carry
(``exp(scale × q·k - max)`` summed over the leaf, each query head normalised over the
probed leaves, mean over the group). The budget is filled in that order, each leaf taken
if it still fits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import faiss
import numpy as np

from cache_service import compiled
from cache_service.policies.base import (
    KeyTable,
    array_bytes,
)


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built and searched.

    Attributes:
        page_size: leaf capacity in tokens (one physical page).
        seed: k-means seed; an index is deterministic for a fixed seed and input.
        build_fill: leaves are built at most this full (room left for decoded tokens
            goes unused by the tokens a selection moves; full leaves split on insert).
        pack_push: ``None`` (default): the last cut of a build is free (each token to its
            nearest centroid, parts over ``cap`` cut again). A number: the last cut packs
            leaves to ``cap`` where that raises its squared error by at most this share
            (tried with the fewest leaves that hold the tokens and one more; else free).
            Measured with ``build_fill`` 1.0 and 0.1: leaves 0.46 -> 0.70 full on real
            keys, same recall at 8k, 2.4% less at 16k.
        fanout: children per inner node at build; a node with more than twice this many
            splits.
        top_nodes: upper levels are added until the top has at most this many nodes.
        probe: leaves scored token by token hold at least ``probe × max_tokens`` tokens,
        probe_fraction: ... and at least this share of all tokens (effort grows with the
            sequence, as DCI's field of view does).
        view: the leaves whose centroids are scored (the field of view) hold at least
            ``view ×`` the tokens scored exactly,
        view_fraction: ... and at least this share of all tokens.
        scan_nodes: search scores every node of the lowest level (leaves included) that
            has at most this many nodes, and descends from there.
        softmax_scale: attention's scale of ``q·k`` when leaves are ranked by attention
            mass; ``None``: ``head_dim ** -0.5``.
        niter: k-means iterations.
        insert_beam: an inserted key keeps this many nearest nodes per level on its way
            down to a leaf.
    """

    page_size: int = 16
    seed: int = 0
    build_fill: float = 0.75
    fanout: int = 16
    top_nodes: int = 64
    probe: float = 4.0
    probe_fraction: float = 1 / 128
    view: float = 4.0
    view_fraction: float = 1 / 4
    scan_nodes: int = 4096
    softmax_scale: float | None = None
    niter: int = 10
    insert_beam: int = 4
    pack_push: float | None = None

    def exact_quota(self, max_tokens: int, num_tokens: int) -> float:
        """Tokens a search of ``num_tokens`` scores exactly for a budget of ``max_tokens``."""
        return max(self.probe * max_tokens, self.probe_fraction * num_tokens)

    def __post_init__(self) -> None:
        if self.page_size < 2:
            raise ValueError(f"page_size must be at least 2, got {self.page_size}")
        if not 0.0 < self.build_fill <= 1.0:
            raise ValueError(f"build_fill must be in (0, 1], got {self.build_fill}")
        if self.fanout < 2 or self.top_nodes < 2:
            raise ValueError(
                f"fanout and top_nodes must be at least 2, got {self.fanout}, {self.top_nodes}"
            )
        if self.probe < 1.0 or not 0.0 <= self.probe_fraction <= 1.0:
            raise ValueError(
                f"probe must be >= 1 and probe_fraction in [0, 1], got {self.probe}, "
                f"{self.probe_fraction}"
            )
        if self.view < 1.0 or not 0.0 <= self.view_fraction <= 1.0:
            raise ValueError(
                f"view must be >= 1 and view_fraction in [0, 1], got {self.view}, "
                f"{self.view_fraction}"
            )
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"softmax_scale must be positive, got {self.softmax_scale}")
        if self.scan_nodes < 1:
            raise ValueError(f"scan_nodes must be positive, got {self.scan_nodes}")
        if self.pack_push is not None and self.pack_push < 0:
            raise ValueError(f"pack_push must be non-negative, got {self.pack_push}")
        if self.niter < 1:
            raise ValueError(f"niter must be at least 1, got {self.niter}")
        if self.insert_beam < 1:
            raise ValueError(f"insert_beam must be at least 1, got {self.insert_beam}")


class SearchEffort(NamedTuple):
    """What one search examined: upper nodes scored by centroid, leaves scored by centroid
    (its field of view), tokens scored exactly."""

    nodes: int
    leaves: int
    tokens: int


class ProbePlan(NamedTuple):
    """An index's levels as ``compiled.probe`` reads them, from the first level it scores
    whole down to the leaves (see its docstring)."""

    qcents: tuple[np.ndarray, ...]
    counts: tuple[np.ndarray, ...]
    ptrs: tuple[np.ndarray, ...]
    flats: tuple[np.ndarray, ...]
    top: int
    needs: np.ndarray


_NO_NODES = np.zeros(1, dtype=np.int64)  # the leaves' CSR entries in a ProbePlan (unused)
_NO_TOKENS = np.zeros(1, dtype=np.int32)  # KeyTable maps of an index's own copy (unused)


class Placement(NamedTuple):
    """Where tokens now live: token ``token_ids[i]`` is in leaf ``leaves[i]``, slot
    ``slots[i]``. Each token appears once, with its final place after the call."""

    token_ids: np.ndarray  # [n] int64
    leaves: np.ndarray  # [n] int64
    slots: np.ndarray  # [n] int64


def _trained_kmeans(
    x: np.ndarray, k: int, seed: int, niter: int, weights: np.ndarray | None, plus_plus: bool
) -> tuple[np.ndarray, faiss.IndexFlatL2]:
    """A FAISS k-means of ``x [n, d]`` (float32, contiguous) into ``k`` clusters: the
    centroids ``[k, d]`` float32 and the flat index it trained with (holding them).

    What ``faiss.Kmeans(d, k, niter=, seed=, min_points_per_centroid=1).train`` does, without
    its Python bookkeeping (parameters set by name through ``getattr``, every iteration's
    statistics copied out): a build makes hundreds of these calls on a few hundred rows, where
    that bookkeeping cost a tenth of the build."""
    params = faiss.ClusteringParameters()
    params.niter, params.seed, params.min_points_per_centroid = niter, seed, 1
    if plus_plus:
        params.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    clustering = faiss.Clustering(x.shape[1], k, params)
    index = faiss.IndexFlatL2(x.shape[1])
    clustering.train(x, index, None if weights is None else np.ascontiguousarray(weights, "f4"))
    return faiss.vector_float_to_array(clustering.centroids).reshape(k, x.shape[1]), index


def kmeans_labels(
    x: np.ndarray,
    k: int,
    seed: int,
    niter: int,
    weights: np.ndarray | None = None,
    plus_plus: bool = False,
) -> np.ndarray:
    """FAISS k-means of ``x [n, d]`` into ``k`` clusters; the label of every row ``[n]``.

    ``plus_plus`` seeds with k-means++ instead of random rows: slower, but one run does not
    merge well-separated clusters (what a single flat level needs; the recursive build
    splits a merged cluster again anyway).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    _, labels = _trained_kmeans(x, k, seed, niter, weights, plus_plus)[1].search(x, 1)
    return labels[:, 0].astype(np.int64)


def kmeans_centroids(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """FAISS k-means centroids ``[k, d]`` of ``x [n, d]`` (random rows as seeds)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _trained_kmeans(x, k, seed, niter, None, False)[0].astype(np.float64)


def capped_labels(x: np.ndarray, cent: np.ndarray, cap: int) -> tuple[np.ndarray, float]:
    """Each row of ``x [m, d]`` assigned to one of the centroids ``cent [k, d]``, at most
    ``cap`` rows each (``k × cap >= m``): in rounds, every unassigned row asks for its
    nearest centroid that has room, and each centroid takes the nearest of those that asked
    while it has room. Ties go to the lower row.

    Returns the labels ``[m]`` and what the capacity cost: the sum over rows of
    ``d(row, its centroid) - d(row, its nearest centroid)`` relative to the sum of
    ``d(row, its nearest centroid)`` (``d`` squared distance; 0 when every row has its
    nearest centroid)."""
    if len(cent) * cap < len(x):
        raise ValueError(f"{len(cent)} groups of {cap} cannot hold {len(x)} rows")
    xx = x.astype(np.float64)
    dist = _sq_dist(xx, cent) + (xx * xx).sum(axis=1)[:, None]  # [m, k]
    labels = np.full(len(x), -1, dtype=np.int64)
    room = np.full(len(cent), cap, dtype=np.int64)
    while (free := np.flatnonzero(labels < 0)).size:
        d = np.where(room[None, :] > 0, dist[free], np.inf)
        want = np.argmin(d, axis=1)
        order = np.lexsort((free, d[np.arange(len(free)), want], want))
        wanted = want[order]
        rank = np.arange(len(order)) - np.searchsorted(wanted, wanted, side="left")
        taken = rank < room[wanted]
        labels[free[order[taken]]] = wanted[taken]
        room -= np.bincount(wanted[taken], minlength=len(cent))
    nearest = dist.min(axis=1)
    pushed = dist[np.arange(len(x)), labels] - nearest
    return labels, float(pushed.sum() / max(float(nearest.sum()), 1e-30))


TWO_MEANS_ITERS = 8
"""Reassignment rounds of a 2-means split (it stops sooner once no row moves)."""


def two_means(x: np.ndarray, iters: int = TWO_MEANS_ITERS) -> np.ndarray:
    """Deterministic 2-means of ``x [n >= 2, d]`` (float64); boolean mask of the second
    group, both groups non-empty. Seeds: the point farthest from the mean, then the farthest
    from it. Compiled (``compiled.two_means``, the same bits) for ``d >= 2``: a build makes
    hundreds of these calls on a few dozen rows."""
    if x.ndim == 2 and x.shape[1] >= 2 and x.dtype == np.float64:
        return compiled.two_means(np.ascontiguousarray(x), iters)
    return numpy_two_means(x, iters)


def numpy_two_means(x: np.ndarray, iters: int = TWO_MEANS_ITERS) -> np.ndarray:
    """``two_means`` in NumPy (the reference of the compiled one, and its path for ``d``
    of 1, where NumPy sums a column pairwise)."""
    a = x[np.argmax(((x - x.mean(0)) ** 2).sum(1))]
    b = x[np.argmax(((x - a) ** 2).sum(1))]
    second = ((x - b) ** 2).sum(1) < ((x - a) ** 2).sum(1)
    for _ in range(iters):
        if not 0 < second.sum() < len(x):
            break
        a, b = x[~second].mean(0), x[second].mean(0)
        new = ((x - b) ** 2).sum(1) < ((x - a) ** 2).sum(1)
        if np.array_equal(new, second):
            break
        second = new
    if not 0 < second.sum() < len(x):  # identical points: halve in order
        second = np.arange(len(x)) >= len(x) // 2
    return second


KEY_DTYPE = np.float16
"""The index's own copy of the keys, when it keeps one (scored exactly by search,
re-clustered by splits): half of float32's bytes; keys on the wire are within float16's
range already. An index given a ``KeySource`` keeps none."""

KeySource = Callable[[np.ndarray], np.ndarray]
"""Keys ``[n, D]`` float32 of token ids ``[n]``, exactly as they were given to ``build`` or
``insert`` (the caller's own storage: the pool's pages). A source that also has a
``table()`` method returning a ``KeyTable`` lets the search read the keys in place."""


KEY_LIMIT = float(np.finfo(np.float16).max)

TOKEN_DTYPE = np.int32
"""Token ids, leaves and slots in the index's maps (ids and leaves below 2**31; the public
results are int64)."""

CENTROID_LEVELS = 127
"""Quantized centroid coordinates lie in ``[-127, 127]`` (int8)."""


def query_levels(dim: int) -> int:
    """Largest ``L`` for which the dot product of an int8 centroid and a query of integers in
    ``[-L, L]`` stays below 2**24 in magnitude, whatever the order of its partial sums: float32
    then computes it exactly, so a score does not depend on how a matmul was batched. At most
    2**15 - 1, so that the levels fit int16 (``compiled.node_scores``); only ``dim`` <= 4
    would allow more."""
    return min((2**24 - 1) // (CENTROID_LEVELS * dim), 2**15 - 1)


def quantize_queries(queries: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries ``[..., G, D]`` in the quantized centroid space: integers ``q̂`` in ``[-L, L]``
    (float32) and a step ``[..., G, 1]`` with ``q·c ≈ step × (q̂·ĉ)`` for
    ``ĉ = round(c / scale)``; ``scale`` ``[..., D]`` per dimension (float64)."""
    shape = queries.shape
    heads = np.array(queries, dtype=np.float32).reshape(-1, *shape[-2:])  # writable: one
    # compiled signature, whatever the caller's buffer (a request's may be read-only)
    lead = np.broadcast_to(scale, (*shape[:-2], shape[-1]))  # as [..., 1, D] would
    scales = np.array(lead, dtype=np.float64).reshape(-1, shape[-1])  # a writable copy
    qhat, step = compiled.quantized_queries(heads, scales, query_levels(shape[-1]))
    return qhat.reshape(shape), step.reshape(*shape[:-1], 1)


def _sq_dist(x: np.ndarray, cent: np.ndarray) -> np.ndarray:
    """Squared distances ``[m, n]`` of rows ``x [m, d]`` to ``cent [n, d]``, up to a per-row
    constant (``‖x‖²`` left out)."""
    c = cent.astype(np.float64)
    return (c * c).sum(axis=1)[None, :] - 2.0 * (x @ c.T)


def add_rows(out: np.ndarray, targets: np.ndarray, values: np.ndarray) -> None:
    """``np.add.at(out, targets, values)``, bit for bit, in a few vectorized rounds: round
    ``r`` adds every target's ``r``-th value (in the order given), so each row of ``out``
    sums its values in the same order as ``np.add.at``, whose unbuffered loop over rows of
    ``values`` took a quarter of an index build (30-70 of ~200 ms for 8k keys)."""
    if len(targets) == 0:
        return
    order = np.argsort(targets, kind="stable")
    ranked = targets[order]
    rank = np.arange(len(order)) - np.searchsorted(ranked, ranked, side="left")
    by_rank = np.argsort(rank, kind="stable")
    ends = np.searchsorted(rank[by_rank], np.arange(1, int(rank.max()) + 2))
    start = 0
    for end in ends.tolist():
        rows = order[by_rank[start:end]]  # distinct targets: a plain indexed add is exact
        out[targets[rows]] += values[rows]
        start = end


def token_rows(leaves: np.ndarray, fills: np.ndarray, page_size: int) -> np.ndarray:
    """Leaf slots (``leaf × page_size + slot``) holding the tokens of ``leaves`` (``fills``
    of each), leaf by leaf ``[sum(fills)]``."""
    starts = leaves * page_size - (np.cumsum(fills) - fills)
    return np.repeat(starts, fills) + np.arange(int(fills.sum()))


class _Level:
    """One level of nodes: augmented sums and counts of the tokens below, parents, children.

    ``qcent`` are the centroids' first ``dim - 1`` (key) coordinates quantized per dimension
    to int8 by ``scale`` (the index's, shared and updated in place): ``round(cent / scale)``.
    The centroids themselves are not kept (``centroids``: from the sums where needed).
    """

    def __init__(self, dim: int, scale: np.ndarray, sums_dtype: type = np.float64) -> None:
        self.n = 0
        self.scale = scale  # [dim - 1] float64, owned by the index
        self.qcent = np.zeros((0, dim - 1), dtype=np.int8)
        self.sums: np.ndarray = np.zeros((0, dim), dtype=sums_dtype)
        self.counts = np.zeros(0, dtype=np.int64)
        self.parent = np.zeros(0, dtype=np.int64)
        self.children: list[list[int]] = []
        self.changed()

    def add(self, count: int = 1) -> np.ndarray:
        """Append ``count`` empty nodes; their ids."""
        need = self.n + count
        if need > len(self.counts):
            self.reserve(max(need, len(self.counts) + len(self.counts) // 4, 16))
        ids = np.arange(self.n, need)
        self.children.extend([] for _ in range(count))
        self.n = need
        self.changed()
        return ids

    def reserve(self, cap: int) -> None:
        """Room for ``cap`` nodes without copying the arrays again."""
        if cap > len(self.counts):
            grow = cap - len(self.counts)
            zeros = np.zeros((grow, self.sums.shape[1]), self.sums.dtype)
            self.sums = np.concatenate([self.sums, zeros])
            self.counts = np.concatenate([self.counts, np.zeros(grow, np.int64)])
            self.parent = np.concatenate([self.parent, np.full(grow, -1, np.int64)])
            self.qcent = np.concatenate([self.qcent, np.zeros((grow, self.qcent.shape[1]), "i1")])

    def changed(self) -> None:
        """Call after changing ``children``: drops the flat copy ``children_of`` uses."""
        self._flat: tuple[np.ndarray, np.ndarray] | None = None

    def children_of(self, nodes: np.ndarray) -> np.ndarray:
        """The children of ``nodes``, node by node, each node's in list order.

        From a flat copy of every child list while it is current; a few nodes' children
        straight from their lists (after a change, not worth rebuilding the copy for)."""
        if self._flat is None and 8 * len(nodes) < self.n:
            chained = itertools.chain.from_iterable(self.children[i] for i in nodes.tolist())
            return np.fromiter(chained, np.int64)
        ptr, flat = self._csr()
        starts, lens = ptr[nodes], ptr[nodes + 1] - ptr[nodes]
        offsets = np.repeat(starts - (np.cumsum(lens) - lens), lens)
        return flat[offsets + np.arange(int(lens.sum()))]

    def _csr(self) -> tuple[np.ndarray, np.ndarray]:
        if self._flat is None:
            lens = np.fromiter(map(len, self.children), np.int64, self.n)
            flat = np.fromiter(itertools.chain.from_iterable(self.children), np.int64)
            self._flat = (np.concatenate([[0], np.cumsum(lens)]), flat)
        return self._flat

    def centroids(self, nodes: np.ndarray | slice) -> np.ndarray:
        """Augmented centroids ``[len(nodes), dim]`` float32 of ``nodes``: sums / counts."""
        return (self.sums[nodes] / np.maximum(self.counts[nodes], 1)[:, None]).astype(np.float32)

    def refresh(self, nodes: np.ndarray | list[int]) -> None:
        """Call after changing the sums of ``nodes``: quantizes their centroids again."""
        self.quantize(np.asarray(nodes, dtype=np.int64))

    def quantize(self, nodes: np.ndarray) -> None:
        """Recompute ``qcent`` of ``nodes`` from their centroids: ``clip(rint(c / scale))``
        of their key coordinates (``compiled.quantize``)."""
        compiled.quantize(self.sums, self.counts, self.scale, nodes, CENTROID_LEVELS, self.qcent)


class ClusterIndex:
    """Hierarchical semantic index over the keys of one (sequence, layer, KV head)."""

    def __init__(
        self,
        head_dim: int,
        config: IndexConfig | None = None,
        key_source: KeySource | None = None,
    ) -> None:
        """Args:
        key_source: where the index reads the keys of tokens it holds (exact scoring,
            splits), e.g. the pool pages of the body it lays out; ``None``: it keeps its
            own float16 copy (``KEY_DTYPE``, 2 bytes per coordinate per leaf slot)."""
        if head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        self.dim = head_dim
        self.config = config or IndexConfig()
        size = self.config.page_size
        self.norm_bound = 0.0  # M of the augmentation
        self.key_bound = np.zeros(head_dim)  # per dimension, above every |key|: quantization
        self.qscale = np.ones(head_dim)  # centroid quantization step per dimension
        self.key_source = key_source
        self.keys: np.ndarray | None = None  # [leaf, slot, D], the own copy (no source)
        if key_source is None:
            self.keys = np.zeros((0, size, head_dim), dtype=KEY_DTYPE)
        self.tokens = np.zeros((0, size), dtype=TOKEN_DTYPE)  # [leaf, slot], -1 empty
        self.fill = np.zeros(0, dtype=np.int64)  # [leaf]
        self.token_leaf = np.zeros(0, dtype=TOKEN_DTYPE)  # token id -> leaf, -1 absent
        self.token_slot = np.zeros(0, dtype=TOKEN_DTYPE)
        # A leaf sums at most a page of tokens (float32 holds that); upper levels float64.
        self.levels: list[_Level] = [self.new_level(np.float32)]
        self.built = False
        self.last_effort = SearchEffort(0, 0, 0)
        self._nbytes: int | None = None  # nbytes() until the next build or insert

    # ---------------------------------------------------------------- public API

    def new_level(self, sums_dtype: type = np.float64) -> _Level:
        """An empty level whose centroids quantize with this index's ``qscale``."""
        return _Level(self.dim + 1, self.qscale, sums_dtype)

    @property
    def num_tokens(self) -> int:
        return int(self.fill[: self.num_leaves].sum())

    @property
    def num_leaves(self) -> int:
        return self.levels[0].n

    def nbytes(self) -> int:
        """Bytes of the index's arrays: its key copy (if any) and token maps, every level's
        sums, quantized centroids and child lists (a list counted as 64 bytes, a link in it
        as 8). Counted again after a build or insert (the store asks at every step)."""
        if self._nbytes is None:
            nodes = sum(level.n for level in self.levels)
            links = nodes - self.levels[-1].n
            self._nbytes = (
                array_bytes(self)
                + sum(array_bytes(level) for level in self.levels)
                + 64 * nodes
                + 8 * links
            )
        return self._nbytes

    def _changing(self) -> None:
        """Call before a build or insert changes the index: its size is counted again."""
        self._nbytes = None

    def leaf_ids(self) -> np.ndarray:
        return np.arange(self.num_leaves, dtype=np.int64)

    def leaf_fill(self, leaf: int) -> int:
        return int(self.fill[leaf])

    def leaf_tokens(self, leaf: int) -> np.ndarray:
        return self.tokens[leaf, : self.fill[leaf]].astype(np.int64)

    def build(self, keys: np.ndarray, token_ids: np.ndarray) -> Placement:
        """Index the prefill keys ``[n, D]`` of tokens ``token_ids [n]`` (once)."""
        if self.built:
            raise RuntimeError("build() was already called; add tokens with insert()")
        keys, token_ids = self._check(keys, token_ids)
        self._changing()
        self.built = True
        if len(keys) == 0:
            return _empty_placement()
        self._raise_bound(keys)
        self._lay_out(keys, self._augment(keys), token_ids)
        return self._placement(token_ids)

    def _lay_out(self, keys: np.ndarray, x: np.ndarray, token_ids: np.ndarray) -> None:
        """Build the structure over the first tokens (augmented ``x``)."""
        groups = self._leaf_groups(x, np.arange(len(keys)), self.config.seed)
        # Room for some leaves inserts will split off (+1/8), so that decoding does not copy
        # the leaf arrays soon after the build (later they grow by a quarter at a time).
        self.levels[0].reserve(len(groups) + len(groups) // 8 + 16)
        self._fill_new_leaves(groups, keys, x, token_ids)
        self._build_upper_levels()

    def insert(self, keys: np.ndarray, token_ids: np.ndarray) -> Placement:
        """Add decoded tokens, a page (``page_size`` tokens) at a time: each token of a page
        goes to the leaf the hierarchy leads it to (``nearest_leaves``); a leaf that would
        overflow is split with its new tokens by 2-means until every part fits."""
        if not self.built:
            return self.build(keys, token_ids)
        keys, token_ids = self._check(keys, token_ids)
        if len(keys) == 0:
            return _empty_placement()
        self._changing()
        if self.num_leaves == 0:
            self.built = False
            return self.build(keys, token_ids)
        self._raise_bound(keys)
        x = self._augment(keys)
        touched = [token_ids]
        size = self.config.page_size
        for start in range(0, len(keys), size):
            rows = slice(start, start + size)
            touched.append(self._insert_page(keys[rows], x[rows], token_ids[rows]))
        self._maybe_add_level()
        return self._placement(np.unique(np.concatenate(touched)))

    def nearest_leaves(self, x: np.ndarray) -> np.ndarray:
        """The leaf each augmented key ``x [m, D + 1]`` descends to ``[m]``: from the top
        level, each key keeps its ``insert_beam`` nearest nodes per level, and the children
        of the nodes any key kept are the next level's candidates; the nearest leaf among
        the last candidates (with a beam as wide as every level, the nearest leaf). Each
        level is one compiled call (``compiled.beam_children``, ``nearest_nodes``): the
        distances ``_sq_dist`` gives, its dot products summed in order instead of by BLAS."""
        xt = np.ascontiguousarray(x.T, dtype=np.float64)  # [D + 1, m]: rows are lanes
        cand = np.arange(self.levels[-1].n, dtype=np.int64)
        for depth in range(len(self.levels) - 1, 0, -1):
            level, below = self.levels[depth], self.levels[depth - 1]
            cand = compiled.beam_children(
                xt, level.sums, level.counts, cand, self.config.insert_beam, below.parent, below.n
            )
        leaves = self.levels[0]
        return compiled.nearest_nodes(xt, leaves.sums, leaves.counts, cand)

    def _insert_page(self, keys: np.ndarray, x: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        """Insert up to a page of tokens; the ids of every token whose place changed."""
        target = self.nearest_leaves(x)
        level = self.levels[0]
        # Tokens whose leaf has room: appended after its tokens, in arrival order (one
        # compiled pass: tokens, fills, sums, counts).
        leaves, order, leaf_of, slots, overflow = compiled.append_fitting(
            target, x, token_ids, self.config.page_size, self.fill, self.tokens, level.sums,
            level.counts,
        )  # fmt: skip
        moved = [token_ids]
        touched = [leaves]
        if len(order):
            if self.keys is not None:
                self.keys[leaf_of, slots] = keys[order]
            self._track(token_ids[order], leaf_of, slots)
            level.refresh(leaf_of)  # a leaf named twice is quantized twice, the same
        # Leaves that would overflow: split with their new tokens.
        for leaf in overflow.tolist():
            rows = np.flatnonzero(target == leaf)
            f = int(self.fill[leaf])
            all_keys = np.concatenate([self.leaf_keys(np.array([leaf])), keys[rows]])
            all_ids = np.concatenate([self.tokens[leaf, :f], token_ids[rows]])
            moved.append(all_ids)
            touched.append(np.asarray(self._split_into(leaf, all_keys, all_ids), np.int64))
        self._refresh_ancestors(np.concatenate(touched))
        return np.concatenate(moved)

    def _split_into(self, leaf: int, keys: np.ndarray, token_ids: np.ndarray) -> list[int]:
        """Lay ``leaf``'s tokens (more than a page) out over ``leaf`` and new sibling leaves,
        by 2-means until every part fits; the leaves used."""
        parts = [np.arange(len(keys))]
        done: list[np.ndarray] = []
        x = self._augment(keys)
        while parts:
            part = parts.pop()
            if len(part) <= self.config.page_size:
                done.append(part)
                continue
            second = two_means(x[part])
            parts += [part[second], part[~second]]
        done.sort(key=lambda part: int(part.min()))  # the part of the oldest token keeps the id
        used = [leaf]
        self._set_leaf(leaf, keys[done[0]], token_ids[done[0]])
        for part in done[1:]:
            new = int(self.levels[0].add()[0])
            self._grow_leaf_arrays()
            self._set_leaf(new, keys[part], token_ids[part])
            self._adopt(0, leaf, new)
            used.append(new)
        return used

    def _refresh_ancestors(self, leaves: np.ndarray) -> None:
        """Recompute sums, counts and centroids of every ancestor of ``leaves`` from its
        children, bottom-up (after the page's splits: every child is current by then)."""
        nodes = leaves
        for depth in range(1, len(self.levels)):
            below, level = self.levels[depth - 1], self.levels[depth]
            nodes = np.unique(below.parent[nodes])
            nodes = nodes[nodes >= 0]
            if len(nodes) == 0:
                return
            lens = np.fromiter((len(level.children[i]) for i in nodes.tolist()), np.int64)
            kids, starts = level.children_of(nodes), np.cumsum(lens) - lens
            level.sums[nodes] = np.add.reduceat(below.sums[kids], starts, axis=0, dtype=np.float64)
            level.counts[nodes] = np.add.reduceat(below.counts[kids], starts)
            level.refresh(nodes)

    def search(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        """Leaves for a query group ``[G, D]``, most attention mass first, holding at most
        ``max_tokens``.

        Upper nodes narrow the search to the leaves of the field of view, their centroids
        pick the leaves scored exactly (both quotas grow with the sequence, see
        ``effort``), and those leaves are ranked by the attention mass their tokens carry.
        Ties rank the lower node id first. One compiled call (``compiled.search``);
        ``cache_service.batched_search.search_heads`` makes the same calls for all heads of
        a layer.
        """
        queries = self._check_queries(queries, max_tokens)
        qhat, step = quantize_queries(queries, self.qscale)
        return self.quantized_search(queries, qhat, step[:, 0], max_tokens)

    def search_tokens(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        """Token ids ``[k]`` (ascending) for a query group ``[G, D]``: of the tokens ``search``
        scores exactly, the ``max_tokens`` that carry the most attention mass (each query
        head's softmax over them, mean over the group; ties: the lower id).

        Single tokens instead of whole leaves: a leaf's low-scoring tokens no longer take
        the budget (``icecache-tokens`` gathers them into scratch pages, as the oracle does).
        The whole search is one compiled call (``compiled.search``).
        """
        queries = self._check_queries(queries, max_tokens)
        qhat, step = quantize_queries(queries, self.qscale)
        return self.quantized_search_tokens(queries, qhat, step[:, 0], max_tokens)

    def quantized_search(
        self, queries: np.ndarray, qhat: np.ndarray, step: np.ndarray, max_tokens: int
    ) -> np.ndarray:
        """``search`` of checked float32 ``queries [G, D]``, given them quantized
        (``quantize_queries``: ``qhat [G, D]``, ``step [G]``)."""
        return self._searched(queries, qhat, step, max_tokens, tokens=False)

    def quantized_search_tokens(
        self, queries: np.ndarray, qhat: np.ndarray, step: np.ndarray, max_tokens: int
    ) -> np.ndarray:
        """``search_tokens`` of checked float32 ``queries [G, D]``, given them quantized."""
        return self._searched(queries, qhat, step, max_tokens, tokens=True)

    def _searched(
        self, queries: np.ndarray, qhat: np.ndarray, step: np.ndarray, max_tokens: int,
        tokens: bool,
    ) -> np.ndarray:  # fmt: skip
        """Leaves (``tokens`` False) or token ids found by the compiled search; sets
        ``last_effort``."""
        plan = self._probe_plan(max_tokens)
        if plan is None:
            return np.empty(0, dtype=np.int64)
        scale, take = self.softmax_scale, max_tokens
        table = self._key_table()
        if table is None:  # a plain key source: probe, read the keys through it, rank
            probed, scored, seen = compiled.probe(*plan, qhat, step)
            ids, keys = self.tokens_of(probed)
            rows, scored_tokens = np.arange(len(ids)), len(ids)
            if scored_tokens == 0:
                found = np.empty(0, dtype=np.int64)
            elif tokens:
                found = compiled.heaviest_keys(keys, rows, ids, queries, scale, take)
            else:
                found = compiled.heaviest_leaves(
                    keys, rows, probed, self.fill, queries, scale, take
                )
        else:
            found, scored, seen, scored_tokens = compiled.search(
                *plan, qhat, step, self.tokens, *table, queries, scale, take, not tokens
            )
        self.last_effort = SearchEffort(scored, seen, scored_tokens)
        return found

    def _key_table(self) -> KeyTable | None:
        """Where the keys of the index's tokens are, for ``compiled.search``; None if
        the key source can only be called."""
        if self.keys is not None:  # the own copy, by leaf slot
            rows = self.keys.reshape(-1, self.dim).view(np.uint16)
            return KeyTable(rows, _NO_TOKENS, _NO_TOKENS, 0)
        table = getattr(self.key_source, "table", None)
        return None if table is None else table()

    def tokens_of(self, leaves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[T]`` and keys ``[T, D]`` float32 of the tokens of ``leaves``, leaf by
        leaf in slot order."""
        rows = token_rows(leaves, self.fill[leaves], self.config.page_size)
        ids = self.tokens.reshape(-1)[rows]
        return ids, self._keys_at(rows, ids)

    def _probe(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        """The leaves a search scores token by token (sets ``last_effort``)."""
        plan = self._probe_plan(max_tokens)
        if plan is None:
            return np.empty(0, dtype=np.int64)
        qhat, step = quantize_queries(queries, self.qscale)
        probed, scored, seen = compiled.probe(*plan, qhat, step[:, 0])
        self.last_effort = SearchEffort(scored, seen, int(self.fill[probed].sum()))
        return probed

    def _probe_plan(self, max_tokens: int) -> ProbePlan | None:
        """What ``compiled.probe`` needs of this index: the levels from ``start_depth`` down
        (the first scored whole), and the tokens each level's best nodes must cover (the
        field of view, doubled a level up; the exact quota at the leaves). None, with
        ``last_effort`` cleared, when there is nothing to search."""
        if self.num_leaves == 0 or max_tokens == 0:
            self.last_effort = SearchEffort(0, 0, 0)
            return None
        view, exact = self.effort(max_tokens)
        start = self.start_depth()
        upper = [self.levels[d] for d in range(start, 0, -1)]
        csr = [level._csr() for level in upper]
        return ProbePlan(
            tuple(level.qcent for level in upper) + (self.levels[0].qcent,),
            tuple(level.counts for level in upper) + (self.fill,),
            tuple(ptr for ptr, _ in csr) + (_NO_NODES,),
            tuple(flat for _, flat in csr) + (_NO_NODES,),
            self.levels[start].n,
            np.array([view * 2 ** (d - 1) for d in range(start, 0, -1)] + [exact]),
        )

    def effort(self, max_tokens: int) -> tuple[float, float]:
        """Tokens under the leaves whose centroids a search scores (its field of view), and
        tokens it scores exactly; both at least a share of the sequence."""
        c, top = self.config, self.levels[-1]
        n = int(top.counts[: top.n].sum())
        exact = c.exact_quota(max_tokens, n)
        return max(c.view * exact, c.view_fraction * n), exact

    def start_depth(self) -> int:
        """The lowest level a search scores whole: at most ``scan_nodes`` nodes (pruning by
        centroids high in the tree, few huge nodes, loses the top tokens at long contexts)."""
        start = len(self.levels) - 1
        while start > 0 and self.levels[start - 1].n <= self.config.scan_nodes:
            start -= 1
        return start

    @property
    def softmax_scale(self) -> float:
        return self.config.softmax_scale or self.dim**-0.5

    def leaf_keys(self, leaves: np.ndarray) -> np.ndarray:
        """Keys ``[sum of fills, D]`` float32 of the tokens of ``leaves``, leaf by leaf in
        slot order."""
        rows = token_rows(leaves, self.fill[leaves], self.config.page_size)
        return self._keys_at(rows, None)

    def _keys_at(self, rows: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        """Keys float32 of the leaf slots ``rows`` (``leaf × page_size + slot``), whose
        token ids are ``ids`` if the caller has them."""
        if self.keys is not None:  # float16 (KEY_DTYPE)
            return compiled.half_rows(self.keys.reshape(-1, self.dim).view(np.uint16), rows)
        assert self.key_source is not None
        if ids is None:
            ids = self.tokens.reshape(-1)[rows]
        return np.asarray(self.key_source(ids), dtype=np.float32)

    def check_invariants(self) -> None:
        """Raise AssertionError if the structure is inconsistent (for tests and debugging)."""
        n = self.num_leaves
        seen = self.tokens[:n][self.tokens[:n] >= 0]
        assert len(seen) == len(np.unique(seen)), "a token is in more than one slot"
        assert len(seen) == int((self.token_leaf >= 0).sum()), "token map out of sync"
        for leaf in range(n):
            f = int(self.fill[leaf])
            assert 1 <= f <= self.config.page_size, f"leaf {leaf} has fill {f}"
            assert (self.tokens[leaf, :f] >= 0).all() and (self.tokens[leaf, f:] == -1).all()
            toks = self.tokens[leaf, :f]
            assert (self.token_leaf[toks] == leaf).all()
            assert (self.token_slot[toks] == np.arange(f)).all()
        leaves = self.levels[0]
        assert np.array_equal(leaves.counts[:n], self.fill[:n]), "leaf counts"
        keys = self.leaf_keys(np.arange(n))
        if n:
            sums = np.add.reduceat(self._augment(keys), self._leaf_starts(n), axis=0)
            assert np.allclose(leaves.sums[:n], sums, rtol=1e-4, atol=1e-3), "leaf sums"
        for depth in range(1, len(self.levels)):
            below, level = self.levels[depth - 1], self.levels[depth]
            listed = sorted(c for node in range(level.n) for c in level.children[node])
            assert listed == list(range(below.n)), f"level {depth} does not cover level below"
            for node in range(level.n):
                kids = level.children[node]
                assert kids, f"empty node {node} at level {depth}"
                assert (below.parent[kids] == node).all()
                assert level.counts[node] == below.counts[kids].sum()
                assert np.allclose(level.sums[node], below.sums[kids].sum(0), rtol=1e-4, atol=1e-3)
        assert (self.levels[-1].parent[: self.levels[-1].n] == -1).all()
        for level in self.levels:
            m = level.n
            q = np.clip(np.rint(level.centroids(slice(0, m))[:, :-1] / self.qscale), -127, 127)
            assert np.array_equal(level.qcent[:m], q), "quantized centroids"
        assert (np.abs(keys) <= self.key_bound).all(), "quantization bound"
        counted, self._nbytes = self._nbytes, None
        assert counted is None or counted == self.nbytes(), "nbytes counted before a change"

    # ---------------------------------------------------------------- internals

    def _check(self, keys: np.ndarray, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = np.asarray(keys, dtype=np.float32)
        token_ids = np.asarray(token_ids)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [n, {self.dim}], got shape {tuple(keys.shape)}")
        if token_ids.shape != (len(keys),) or not np.issubdtype(token_ids.dtype, np.integer):
            raise ValueError(
                f"token_ids must be {len(keys)} integers, one per key; got "
                f"{token_ids.dtype} {tuple(token_ids.shape)}"
            )
        token_ids = token_ids.astype(np.int64)
        if len(token_ids) and token_ids.min() < 0:
            raise ValueError("token ids must be non-negative")
        if len(token_ids) and token_ids.max() > np.iinfo(TOKEN_DTYPE).max:
            raise ValueError(f"token ids must be below 2**31, got {token_ids.max()}")
        if len(np.unique(token_ids)) != len(token_ids):
            raise ValueError("token ids repeat within one call")
        known = token_ids[token_ids < len(self.token_leaf)]
        if (self.token_leaf[known] >= 0).any():
            raise ValueError("some token ids are already in the index")
        if not np.isfinite(keys).all():
            raise ValueError("keys contain NaN or infinity")
        if self.keys is None:  # scored from the source, as given
            return keys, token_ids
        if len(keys) and np.abs(keys).max() > KEY_LIMIT:
            raise ValueError(
                f"keys must lie within +-{KEY_LIMIT:g} (the index keeps them as float16), "
                f"got {np.abs(keys).max():g}"
            )
        # The index sees every key as its float16 copy holds it: sums, centroids and scores
        # agree with the copy whatever the input precision.
        return keys.astype(KEY_DTYPE).astype(np.float32), token_ids

    def _check_queries(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim or len(queries) == 0:
            raise ValueError(
                f"queries must be [G >= 1, {self.dim}], got shape {tuple(queries.shape)}"
            )
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be non-negative, got {max_tokens}")
        return queries

    def _raise_bound(self, keys: np.ndarray) -> None:
        """Keep ``M`` above every key norm; when it grows, re-augment all sums. Also keep the
        per-dimension bound of the centroid quantization above every key."""
        self._raise_key_bound(keys)
        top = float(np.sqrt((keys.astype(np.float64) ** 2).sum(1).max()))
        if top <= self.norm_bound:
            return
        self.norm_bound = top * 1.25 + 1e-6
        n = self.num_leaves
        if n == 0:
            return
        extra = self._augment(self.leaf_keys(np.arange(n)))[:, -1]
        self.levels[0].sums[:n, -1] = np.add.reduceat(extra, self._leaf_starts(n))
        self.levels[0].refresh(np.arange(n))
        for depth in range(1, len(self.levels)):
            below, level = self.levels[depth - 1], self.levels[depth]
            level.sums[: level.n, -1] = 0
            np.add.at(level.sums[:, -1], below.parent[: below.n], below.sums[: below.n, -1])
            level.refresh(np.arange(level.n))

    def _raise_key_bound(self, keys: np.ndarray) -> None:
        """Quantization steps: ``1.25 × max |key|`` per dimension over ``CENTROID_LEVELS``;
        when a key exceeds the bound, every centroid is quantized again."""
        top = np.abs(keys.astype(np.float64)).max(axis=0)
        if (top <= self.key_bound).all():
            return
        self.key_bound = np.maximum(self.key_bound, 1.25 * top)
        self.qscale[:] = np.where(self.key_bound > 0, self.key_bound / CENTROID_LEVELS, 1.0)
        for level in self.levels:
            level.quantize(np.arange(level.n))

    def _augment(self, keys: np.ndarray) -> np.ndarray:
        """``[n, D] -> [n, D + 1]``: the key and ``sqrt(M² - ‖k‖²)`` (float64;
        ``compiled.augmented``)."""
        keys = np.ascontiguousarray(keys, dtype=np.float64)
        return compiled.augmented(keys, self.norm_bound**2)

    def _leaf_groups(self, x: np.ndarray, members: np.ndarray, seed: int) -> list[np.ndarray]:
        """Recursive k-means of ``x[members]`` into groups of at most ``build_fill × P``."""
        cap = max(1, int(self.config.build_fill * self.config.page_size))
        done: list[np.ndarray] = []
        todo = [members]
        while todo:
            group = todo.pop()
            if len(group) <= cap:
                done.append(group)
                continue
            if len(group) > self.config.fanout * cap:  # a level of `fanout` groups, cut again
                k = self.config.fanout
                labels = kmeans_labels(x[group], k, seed + len(done), self.config.niter)
            else:  # the last cut: leaves of at most `cap`, as few as fit the group's shape
                labels = self._packed_labels(x[group], cap, seed + len(done))
            parts = [group[labels == j] for j in range(int(labels.max()) + 1)]
            parts = [p for p in parts if len(p)]
            if len(parts) == 1:  # k-means made no progress (identical keys): halve in order
                half = len(group) // 2
                parts = [group[:half], group[half:]]
            todo.extend(reversed(parts))
        return done

    def _packed_labels(self, x: np.ndarray, cap: int, seed: int) -> np.ndarray:
        """Labels ``[m]`` of the last cut of ``x [m, d]`` into leaves of at most ``cap``:
        k-means (2-means for two) into the fewest ``k`` that hold the rows, each row taken
        by the nearest centroid with room (``capped_labels``); with one leaf more if that
        pushes rows too far (by more than ``pack_push``); else (and when ``pack_push`` is
        ``None``) each row's nearest centroid, groups over ``cap`` cut again: separate
        clouds are not filled up with each other."""
        fewest = -(-len(x) // cap)
        push = self.config.pack_push
        x = np.ascontiguousarray(x, dtype=np.float64)
        if push is None and fewest == 2 and x.shape[1] >= 2:  # most last cuts of a build
            return compiled.two_means_labels(x, TWO_MEANS_ITERS)
        for k in range(fewest, min(fewest + (1 if push is None else 2), len(x) + 1)):
            if k == 2:  # cheaper than a FAISS call
                second = two_means(x)
                cent = np.stack([x[~second].mean(0), x[second].mean(0)])
            else:
                cent = kmeans_centroids(x, k, seed, self.config.niter)
            if push is not None:
                labels, pushed = capped_labels(x, cent, cap)
                if pushed <= push:
                    return labels
        return compiled.nearest(x, np.ascontiguousarray(cent))

    def _leaf_starts(self, n: int) -> np.ndarray:
        """Where each of the first ``n`` leaves' tokens start in ``leaf_keys`` of them."""
        return np.cumsum(self.fill[:n]) - self.fill[:n]

    def _grow_leaf_arrays(self) -> None:
        cap = len(self.levels[0].counts)
        if cap > len(self.fill):
            grow = cap - len(self.fill)
            size = self.config.page_size
            if self.keys is not None:
                zeros = np.zeros((grow, size, self.dim), KEY_DTYPE)
                self.keys = np.concatenate([self.keys, zeros])
            self.tokens = np.concatenate([self.tokens, np.full((grow, size), -1, TOKEN_DTYPE)])
            self.fill = np.concatenate([self.fill, np.zeros(grow, np.int64)])

    def _track(self, token_ids: np.ndarray, leaf: int | np.ndarray, slots: np.ndarray) -> None:
        need = int(token_ids.max()) + 1
        if need > len(self.token_leaf):
            grow = max(need, 2 * len(self.token_leaf)) - len(self.token_leaf)
            self.token_leaf = np.concatenate([self.token_leaf, np.full(grow, -1, TOKEN_DTYPE)])
            self.token_slot = np.concatenate([self.token_slot, np.full(grow, -1, TOKEN_DTYPE)])
        self.token_leaf[token_ids] = leaf
        self.token_slot[token_ids] = slots

    def _fill_new_leaves(
        self, groups: list[np.ndarray], keys: np.ndarray, x: np.ndarray, token_ids: np.ndarray
    ) -> None:
        """New leaves, one per group of row indices, holding those tokens in slots 0..n-1."""
        level = self.levels[0]
        leaves = level.add(len(groups))
        self._grow_leaf_arrays()
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        rows = np.concatenate(groups)
        leaf_of = np.repeat(leaves, sizes)
        slots = np.arange(len(rows)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        if self.keys is not None:
            self.keys[leaf_of, slots] = keys[rows]
        self.tokens[leaf_of, slots] = token_ids[rows]
        self.fill[leaves] = sizes
        self._track(token_ids[rows], leaf_of, slots)
        add_rows(level.sums, leaf_of, x[rows])
        level.counts[leaves] = sizes
        level.refresh(leaves)

    def _set_leaf(self, leaf: int, keys: np.ndarray, token_ids: np.ndarray) -> None:
        """Make ``leaf`` hold exactly these tokens in slots ``0..n-1`` (sums of the leaf only)."""
        n = len(keys)
        if self.keys is not None:
            self.keys[leaf, :n] = keys
            self.keys[leaf, n:] = 0
        self.tokens[leaf, :n] = token_ids
        self.tokens[leaf, n:] = -1
        self.fill[leaf] = n
        self._track(token_ids, leaf, np.arange(n))
        level = self.levels[0]
        level.sums[leaf] = self._augment(keys).sum(0)
        level.counts[leaf] = n
        level.refresh([leaf])

    def _append_token(self, leaf: int, key: np.ndarray, x: np.ndarray, token: int) -> None:
        slot = int(self.fill[leaf])
        if self.keys is not None:
            self.keys[leaf, slot] = key
        self.tokens[leaf, slot] = token
        self.fill[leaf] = slot + 1
        self._track(np.array([token]), leaf, np.array([slot]))
        node = leaf
        for level in self.levels:
            level.sums[node] += x
            level.counts[node] += 1
            level.refresh([node])
            node = int(level.parent[node])
            if node < 0:
                break

    def _adopt(self, depth: int, sibling: int, new: int) -> None:
        """Hang node ``new`` of level ``depth`` under ``sibling``'s parent; split that parent
        if it has too many children."""
        level = self.levels[depth]
        parent = int(level.parent[sibling])
        level.parent[new] = parent
        if parent < 0:
            return
        upper = self.levels[depth + 1]
        upper.children[parent].append(new)
        upper.changed()
        if len(upper.children[parent]) > 2 * self.config.fanout:
            self._split_node(depth + 1, parent)

    def _split_node(self, depth: int, node: int) -> None:
        level, below = self.levels[depth], self.levels[depth - 1]
        kids = np.array(level.children[node], dtype=np.int64)
        second = two_means(below.centroids(kids).astype(np.float64))
        new = int(level.add()[0])
        for target, part in ((node, kids[~second]), (new, kids[second])):
            level.children[target] = [int(k) for k in part]
            below.parent[part] = target
            level.sums[target] = below.sums[part].sum(0, dtype=np.float64)
            level.counts[target] = below.counts[part].sum()
        level.changed()
        level.refresh([node, new])
        self._adopt(depth, node, new)

    def _build_upper_levels(self) -> None:
        while self.levels[-1].n > self.config.top_nodes:
            self._add_level()

    def _maybe_add_level(self) -> None:
        if self.levels[-1].n > 4 * self.config.top_nodes:
            self._build_upper_levels()

    def _add_level(self) -> None:
        """Group the current top level's nodes under a new level by weighted k-means."""
        below = self.levels[-1]
        n = below.n
        k = math.ceil(n / self.config.fanout)
        labels = kmeans_labels(
            below.centroids(slice(0, n)),
            k,
            self.config.seed + 7919 * len(self.levels),
            self.config.niter,
            weights=below.counts[:n],
        )
        used, labels = np.unique(labels, return_inverse=True)
        level = self.new_level()
        level.add(len(used))
        below.parent[:n] = labels
        for child, parent in enumerate(labels):
            level.children[int(parent)].append(child)
        level.changed()
        add_rows(level.sums, labels, below.sums[:n])
        np.add.at(level.counts, labels, below.counts[:n])
        level.refresh(np.arange(level.n))
        self.levels.append(level)

    def _placement(self, token_ids: np.ndarray) -> Placement:
        token_ids = np.asarray(token_ids, dtype=np.int64)
        leaves, slots = self.token_leaf[token_ids], self.token_slot[token_ids]
        return Placement(token_ids, leaves.astype(np.int64), slots.astype(np.int64))


def _empty_placement() -> Placement:
    empty = np.empty(0, dtype=np.int64)
    return Placement(empty, empty, empty)
