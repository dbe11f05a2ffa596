"""Bodies laid out by a cluster index: ``icecache``, ``icecache-r`` followers, ``kmeans``
and ``icecache-tokens``.

The index deals in token ids (here: positions), leaves and slots; for the first three this
module gives each leaf one physical page and moves K/V so that page ``leaf_page[leaf]``
slot ``s`` holds the token the index placed at ``(leaf, s)``. ``icecache-tokens`` leaves
its tokens in their positional pages and gathers a step's picks into scratch pages. Every
index reads the keys it scores from these pages (``TokenPlaces.keys_of``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from cache_service.page_pool import PagePool, as_float32
from cache_service.policies.base import (
    Body,
    KeyTable,
    Scratch,
    best_covering,
    fill_within,
    group_scores,
    leaf_mass,
)

if TYPE_CHECKING:
    from cache_service.cluster_index import ClusterIndex, KeySource


class Placement(Protocol):
    @property
    def token_ids(self) -> np.ndarray: ...
    @property
    def leaves(self) -> np.ndarray: ...
    @property
    def slots(self) -> np.ndarray: ...


DICT_ENTRY_BYTES = 16
"""What a leaf -> page entry is counted as (two ints)."""


class LeafFills(Protocol):
    def leaf_fill(self, leaf: int) -> int: ...


class SearchConfig(Protocol):
    """What a follower's search takes of ``IndexConfig``."""

    @property
    def softmax_scale(self) -> float | None: ...
    def exact_quota(self, max_tokens: int, num_tokens: int) -> float: ...


class LeafIndex(LeafFills, Protocol):
    """What this module needs of ``ClusterIndex`` / ``FlatKMeansIndex``."""

    def build(self, keys: np.ndarray, token_ids: np.ndarray) -> Placement: ...
    def insert(self, keys: np.ndarray, token_ids: np.ndarray) -> Placement: ...
    def search(self, queries: np.ndarray, max_tokens: int) -> np.ndarray: ...
    def nbytes(self) -> int: ...
    @property
    def built(self) -> bool: ...


class Step(NamedTuple):
    """A placement and the fill it left in each leaf it touched: what an ``icecache-r``
    follower replays (the leader's index may be past it by then)."""

    placement: Placement
    leaves: np.ndarray  # [n] ascending
    fills: np.ndarray  # [n]

    def leaf_fill(self, leaf: int) -> int:
        return int(self.fills[np.searchsorted(self.leaves, leaf)])


class TokenPlaces(Body):
    """Where each token (by position) lives now: page and slot."""

    def __init__(self, pool: PagePool) -> None:
        super().__init__(pool)
        self.token_page = np.full(0, -1, dtype=np.int32)  # position -> page
        self.token_slot = np.full(0, -1, dtype=np.int32)  # position -> slot

    def keys_of(self, positions: np.ndarray) -> np.ndarray:
        """Keys ``[n, D]`` float32 of the tokens at ``positions`` from the pool pages they
        are in now (an index's key source: it keeps no copy of its own)."""
        return self.pool.keys_at(*self.places(positions))

    def places(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pages and slots ``[n]`` of the tokens at ``positions``."""
        return self.token_page[positions], self.token_slot[positions]

    def stage(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record where the tokens of incoming window pages are now; returns keys, positions."""
        keys, positions = self.pool.keys_of(pages)
        slots = np.tile(np.arange(self.pool.page_size), len(pages))
        self._track(positions, np.repeat(pages, self.pool.page_size), slots)
        return keys, positions

    def _track(self, positions: np.ndarray, pages: np.ndarray, slots: np.ndarray) -> None:
        need = int(positions.max()) + 1
        if need > self.token_page.size:
            grow = max(need, 2 * self.token_page.size)
            self.token_page = np.pad(
                self.token_page, (0, grow - self.token_page.size), constant_values=-1
            )
            self.token_slot = np.pad(
                self.token_slot, (0, grow - self.token_slot.size), constant_values=-1
            )
        self.token_page[positions] = pages
        self.token_slot[positions] = slots


class PoolKeys:
    """An index's key source over a body's pool pages: called with token positions, their
    keys (``TokenPlaces.keys_of``); ``table()`` says where they are, so that the compiled
    search reads them in place (``compiled.search``)."""

    def __init__(self, places: TokenPlaces) -> None:
        self.places = places

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self.places.keys_of(positions)

    def table(self) -> KeyTable:
        pool = self.places.pool
        return KeyTable(
            pool.key_rows(), self.places.token_page, self.places.token_slot, 2 * pool.page_size
        )


class LeafPages(TokenPlaces):
    """Leaf → page map; applies an index's placements by moving K/V."""

    def __init__(self, pool: PagePool) -> None:
        super().__init__(pool)
        self.leaf_page: dict[int, int] = {}

    def all_pages(self) -> np.ndarray:
        return np.fromiter(self.leaf_page.values(), dtype=np.int64, count=len(self.leaf_page))

    def nbytes(self) -> int:
        return super().nbytes() + DICT_ENTRY_BYTES * len(self.leaf_page)

    def pages_of(self, leaves: np.ndarray) -> np.ndarray:
        return np.fromiter((self.leaf_page[int(x)] for x in leaves), np.int64, len(leaves))

    def apply(self, placement: Placement, index: LeafFills) -> None:
        """Move the placed tokens' K/V to their leaves' pages (new leaves get new pages, a
        leaf page shared with a kept index is copied first).

        ``index`` is the index that made the placement, in its state after it; it tells the
        fill of every leaf the placement touched (a split leaf shrinks).
        """
        if len(placement.token_ids) == 0:
            return
        touched = np.unique(placement.leaves)
        new_leaves = [int(x) for x in touched if int(x) not in self.leaf_page]
        for leaf, page in zip(new_leaves, self.pool.alloc(len(new_leaves)), strict=True):
            self.leaf_page[leaf] = int(page)
        positions = placement.token_ids
        kv = self.pool.read_slots(self.token_page[positions], self.token_slot[positions])
        self._own(touched)
        dest = self.pages_of(placement.leaves)
        self.pool.write_slots(dest, placement.slots, kv, positions)
        self._track(positions, dest, placement.slots)
        for leaf in np.unique(placement.leaves):
            page, fill = self.leaf_page[int(leaf)], index.leaf_fill(int(leaf))
            self.pool.fill[page] = fill
            self.pool.positions[page, fill:] = -1

    def _own(self, leaves: np.ndarray) -> None:
        """Copy on write: give ``leaves`` whose page has other holders (a kept index, other
        sequences started from it) pages of this body's own, with the same tokens."""
        pages = self.pages_of(leaves)
        shared = self.pool.refs[pages] > 1
        if not shared.any():
            return
        old = pages[shared]
        new = self.pool.copy(old)
        for leaf, page in zip(leaves[shared].tolist(), new.tolist(), strict=True):
            self.leaf_page[leaf] = page
        fills = self.pool.fill[old]
        held = self.pool.positions[old]  # [n, page_size], the first `fill` valid
        valid = np.arange(self.pool.page_size)[None, :] < fills[:, None]
        self.token_page[held[valid]] = np.repeat(new, fills)
        self.pool.free(old)


class IndexedBody(LeafPages):
    """Tokens clustered by their keys; a query's most relevant leaves are its pages."""

    def __init__(
        self,
        pool: PagePool,
        index_of: Callable[[KeySource], LeafIndex],
        leads: bool = False,
    ) -> None:
        """Args:
        index_of: makes the body's index, given where it reads keys (``PoolKeys``).
        leads: ``icecache-r`` follower layers replay this body's layout: keep every
            placement for them (``placements``)."""
        super().__init__(pool)
        self.index = index_of(PoolKeys(self))
        self.leads = leads
        self.placements: list[Step] = []  # replayed by icecache-r followers
        self.steps_bytes = 0  # their arrays' bytes
        self.last_leaves = np.empty(0, dtype=np.int64)

    @property
    def built(self) -> bool:
        return self.index.built

    def add(self, pages: np.ndarray) -> None:
        placement = self.index.insert(*self.stage(pages))  # the first builds
        self.apply(placement, self.index)
        self.pool.free(pages)
        if not self.leads:
            return
        leaves = np.unique(placement.leaves)
        fills = np.fromiter(map(self.index.leaf_fill, leaves.tolist()), np.int64, len(leaves))
        step = Step(placement, leaves, fills)
        self.placements.append(step)
        arrays = (placement.token_ids, placement.leaves, placement.slots, leaves, fills)
        self.steps_bytes += sum(a.nbytes for a in arrays)

    def nbytes(self) -> int:
        return super().nbytes() + self.index.nbytes() + self.steps_bytes

    def select(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        if not self.built:
            self.last_leaves = np.empty(0, dtype=np.int64)
        else:
            self.last_leaves = self.index.search(queries.astype(np.float32), max_tokens)
        return self.pages_of(self.last_leaves)


class GatheringBody(TokenPlaces):
    """``icecache-tokens``: ``icecache``'s index and search over tokens that stay in their
    positional pages; of the tokens the search scores exactly it takes the ``max_tokens``
    with the most attention mass one by one, copied into scratch pages for the step (as the
    oracle does), instead of whole leaves.

    Leaves are the index's alone (groups of token ids, no pages), so the pool holds what
    ``full`` holds (plus the step's scratch), the index reads keys from those pages
    (``keys_of``), a leaf's weaker tokens do not take the budget and the pages moved are
    full (``bench/results/selection.md``, ``memory.md``). The price: a copy per step, and
    pages new at every step (a device page cache keeps leaf pages between steps, not
    these)."""

    def __init__(self, pool: PagePool, index_of: Callable[[KeySource], ClusterIndex]) -> None:
        """Args:
        index_of: makes the body's index, given where it reads keys (``PoolKeys``)."""
        super().__init__(pool)
        self.index = index_of(PoolKeys(self))
        self.pages = np.empty(0, dtype=np.int64)
        self.scratch: Scratch = Scratch(pool)

    @property
    def built(self) -> bool:
        return self.index.built

    def add(self, pages: np.ndarray) -> None:
        self.index.insert(*self.stage(pages))  # the first builds
        self.pages = np.concatenate([self.pages, pages])

    def all_pages(self) -> np.ndarray:
        return self.pages

    def nbytes(self) -> int:
        return super().nbytes() + self.index.nbytes()

    def select(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        if not self.built or max_tokens < 1:
            self.scratch.free()
            return self.scratch.pages
        return self.take(self.index.search_tokens(queries.astype(np.float32), max_tokens))

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Copy the tokens at ``positions`` into this step's scratch pages (the last step's
        are freed); returns them."""
        return self.scratch.gather(*self.places(positions))


def select_layer(
    bodies: list[Body], queries: np.ndarray, max_tokens: list[int]
) -> list[np.ndarray]:
    """Pages of every KV head of one layer, as each body's ``select`` would choose them.

    The heads laid out by a ``ClusterIndex`` are searched in one call
    (``cache_service.batched_search.search_heads``, or ``search_heads_tokens`` for
    ``icecache-tokens``: exactly the per-head result); the others (``kmeans``,
    ``icecache-r`` followers, positional bodies) one by one.

    Args:
        bodies: ``[H]`` bodies of the layer's KV heads.
        queries: ``[H, G, head_dim]`` float32, each KV head's query group.
        max_tokens: ``[H]`` at most this many valid tokens in each head's pages.
    """
    from cache_service.batched_search import search_heads, search_heads_tokens
    from cache_service.cluster_index import ClusterIndex

    together: list[tuple[int, IndexedBody, ClusterIndex]] = []
    gathering: list[tuple[int, GatheringBody, ClusterIndex]] = []
    for h, body in enumerate(bodies):
        if type(body) is IndexedBody and body.built and type(body.index) is ClusterIndex:
            together.append((h, body, body.index))
        elif type(body) is GatheringBody and body.built and max_tokens[h]:
            gathering.append((h, body, body.index))  # a zero budget: select frees its scratch
    pages: dict[int, np.ndarray] = {}
    if gathering:
        heads = [h for h, _, _ in gathering]
        budgets = [max_tokens[h] for h in heads]
        picked = search_heads_tokens([i for _, _, i in gathering], queries[heads], budgets)
        scratches = [body.scratch for _, body, _ in gathering]
        places = [body.places(p) for (_, body, _), p in zip(gathering, picked, strict=True)]
        taken = Scratch.gather_all(scratches, [pg for pg, _ in places], [sl for _, sl in places])
        pages.update(zip(heads, taken, strict=True))
    if together:
        heads = [h for h, _, _ in together]
        budgets = [max_tokens[h] for h in heads]
        found = search_heads([index for _, _, index in together], queries[heads], budgets)
        for (h, body, _), leaves in zip(together, found, strict=True):
            body.last_leaves = leaves
            pages[h] = body.pages_of(leaves)
    return [
        pages[h] if h in pages else body.select(queries[h], max_tokens[h])
        for h, body in enumerate(bodies)
    ]


class MirroredBody(LeafPages):
    """An ``icecache-r`` follower layer: the leader layer's leaf layout, its own K/V and its
    own selection over that layout.

    It takes the same pages as its leader (same handover timing), maybe later and several
    adds at once: an ``add`` replays the leader's placements in order as far as it holds
    their tokens. It keeps no index: per leaf, the centroid of its own keys there (refreshed
    from the pages for the leaves a replayed placement touched). A selection is
    ``ClusterIndex.search``'s last two stages over these leaves (``search_layout``): every
    centroid scored with the follower's own queries, the best leaves' tokens scored exactly
    from the pages (twice the tokens the leader scores), leaves taken by attention mass.
    Reusing the leader's *selection* instead held 0.97x of icecache's recall at 8k and 0.6x
    at 16k on the model's keys (neighbouring layers attend to different tokens); its layout
    is what carries over."""

    def __init__(self, pool: PagePool, leader: IndexedBody, config: SearchConfig) -> None:
        super().__init__(pool)
        self.leader = leader
        self.config = config
        self.replayed = 0
        self.centroids = np.zeros((0, pool.head_dim), dtype=np.float32)  # leaf -> centroid
        self.fills = np.zeros(0, dtype=np.int64)  # leaf -> tokens, 0: no such leaf here

    def add(self, pages: np.ndarray) -> None:
        self.stage(pages)
        assert len(self.leader.placements) > self.replayed, "leader layer must add first"
        steps = self.leader.placements
        before = self.replayed
        while self.replayed < len(steps) and self._holds(steps[self.replayed].placement):
            step = steps[self.replayed]
            self.apply(step.placement, step)
            self._summarize(step.leaves)
            self.replayed += 1
        assert self.replayed > before, "leader layer must add these pages first"
        self.pool.free(pages)

    def clone(self, links: dict[int, object] | None = None) -> MirroredBody:
        """A copy without a leader (set its ``leader`` before an ``add``): a kept copy must
        not hold on to the layer it was copied from."""
        return super().clone({id(self.leader): None, **(links or {})})

    def _holds(self, placement: Placement) -> bool:
        """Whether every token ``placement`` places is staged or laid out here already."""
        ids = placement.token_ids
        return bool(ids.max() < self.token_page.size and (self.token_page[ids] >= 0).all())

    def _summarize(self, leaves: np.ndarray) -> None:
        """Centroids and fills of ``leaves`` (ascending) from their pages."""
        if len(leaves) == 0:
            return
        if leaves[-1] >= self.fills.size:
            grow = max(int(leaves[-1]) + 1, 2 * self.fills.size)
            self.fills = np.pad(self.fills, (0, grow - self.fills.size))
            self.centroids = np.pad(self.centroids, ((0, grow - len(self.centroids)), (0, 0)))
        keys, fills = self._leaf_keys(leaves)
        sums = np.add.reduceat(keys, np.cumsum(fills) - fills, axis=0)
        self.centroids[leaves] = sums / fills[:, None]
        self.fills[leaves] = fills

    def _leaf_keys(self, leaves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``[sum(fills), D]`` float32 of ``leaves``' tokens leaf by leaf, and fills."""
        pages = self.pages_of(leaves)
        fills = self.pool.fill[pages]
        valid = np.arange(self.pool.page_size)[None, :] < fills[:, None]
        return as_float32(self.pool.data[pages, 0][valid]), fills

    def select(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        leaves = np.flatnonzero(self.fills)
        chosen = search_layout(
            queries.astype(np.float32),
            leaves,
            self.centroids[leaves],
            self.fills[leaves],
            lambda picked: self._leaf_keys(picked)[0],
            max_tokens,
            self.config,
            self.pool.head_dim,
        )
        return self.pages_of(chosen)


FOLLOWER_PROBE = 2.0
"""A follower scores this many times the tokens its leader would score exactly: its leaves
were clustered on the leader's keys, so its centroids say less about where its best tokens
are (on the model's keys at 16k: 0.926x the oracle's recall with 1, 0.942x with 2, against
the leader's 0.950x)."""


def search_layout(
    queries: np.ndarray,
    leaves: np.ndarray,
    centroids: np.ndarray,
    fills: np.ndarray,
    leaf_keys: Callable[[np.ndarray], np.ndarray],
    max_tokens: int,
    config: SearchConfig,
    head_dim: int,
) -> np.ndarray:
    """``leaves`` (ascending) for a query group ``[G, D]``, most attention mass first,
    holding at most ``max_tokens``: the leaves with the best centroid score (group max of
    ``q·c``) until they hold ``FOLLOWER_PROBE`` times the tokens the config scores exactly,
    ranked by the attention mass of their tokens (``leaf_keys(picked)``: keys
    ``[sum(fills), D]`` leaf by leaf)."""
    if len(leaves) == 0 or max_tokens == 0:
        return np.empty(0, dtype=np.int64)
    scores = group_scores(queries, centroids).max(axis=0)
    quota = FOLLOWER_PROBE * config.exact_quota(max_tokens, int(fills.sum()))
    picked = np.sort(best_covering(np.arange(len(leaves)), scores, fills, quota))
    scale = config.softmax_scale or head_dim**-0.5
    mass = leaf_mass(queries, leaf_keys(leaves[picked]), fills[picked], scale)
    ranked = picked[np.lexsort((picked, -mass))]
    return leaves[fill_within(ranked, fills[ranked], max_tokens)]
