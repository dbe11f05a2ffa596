"""The body of one (sequence, layer, KV head): the tokens a policy selects from."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import NamedTuple, Self

import numpy as np

from cache_service.page_pool import PagePool


class Body(ABC):
    """Owns the pages of one head's tokens between the sinks and the recent window.

    Full pages arrive from the recent window in position order (``add``); the body may
    re-lay their tokens out (the cluster index does) and frees what it no longer needs.
    """

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.scratch: Scratch | None = None  # bodies that gather single tokens set one

    @abstractmethod
    def add(self, pages: np.ndarray) -> None:
        """Take ownership of full positional pages ``[n]`` that left the recent window."""

    @abstractmethod
    def select(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        """Pages to attend for this step.

        Args:
            queries: ``[G, head_dim]`` float32, the query heads served by this KV head.
            max_tokens: at most this many valid tokens in the returned pages.

        Returns:
            page ids ``[n]`` int64.
        """

    @abstractmethod
    def all_pages(self) -> np.ndarray:
        """Every page holding this body's tokens ``[n]`` (dense layers, ``full``)."""

    def scratch_pages(self) -> np.ndarray:
        """Pages holding copies of the last selection's tokens ``[n]``, freed at the next
        selection (``oracle``, ``icecache-tokens``); not among ``all_pages``."""
        return np.empty(0, dtype=np.int64) if self.scratch is None else self.scratch.pages

    def release(self) -> None:
        """Free every page this body owns."""
        if self.scratch is not None:
            self.scratch.free()
        self.pool.free(self.all_pages())

    def nbytes(self) -> int:
        """Bytes of the body's own state outside the pool (page lists, summaries, an index):
        counted with the pages against the memory ceiling."""
        return array_bytes(self)

    def clone(self, links: dict[int, object] | None = None) -> Self:
        """A copy of this body's state holding the same pages (one more holder of each):
        the index a prefix keeps, and what a sequence starting from it gets. The copy writes
        only pages of its own (``LeafPages`` copies a shared page before writing it).

        Args:
            links: objects the copy refers to instead of copies (by ``id`` of the original:
                a follower's leader); the pool is always the same.
        """
        twin = copy.deepcopy(self, {id(self.pool): self.pool, **(links or {})})
        self.pool.share(twin.all_pages())
        return twin


class KeyTable(NamedTuple):
    """Where a key source keeps its keys, for compiled code to read them in place: token
    ``t``'s key is row ``token_page[t] × rows_per_page + token_slot[t]`` of ``rows`` (with
    ``rows_per_page`` 0, the row of its leaf slot: an index's own copy)."""

    rows: np.ndarray  # [R, D] float16 bits (uint16) or float32
    token_page: np.ndarray  # [positions] int32
    token_slot: np.ndarray  # [positions] int32
    rows_per_page: int


def array_bytes(obj: object) -> int:
    """Bytes of the numpy arrays among ``obj``'s attributes."""
    return sum(v.nbytes for v in vars(obj).values() if isinstance(v, np.ndarray))


def take_within(pages: np.ndarray, fills: np.ndarray, max_tokens: int) -> np.ndarray:
    """The longest prefix of ``pages`` (ranked) whose fills sum to at most ``max_tokens``."""
    count = int(np.searchsorted(np.cumsum(fills), max_tokens, side="right"))
    return pages[:count]


def fill_within(pages: np.ndarray, fills: np.ndarray, max_tokens: int) -> np.ndarray:
    """``pages`` (ranked) taken in order, each one that still fits in ``max_tokens``: the
    longest fitting prefix, then any later page small enough for what is left."""
    total = np.cumsum(fills)
    count = int(np.searchsorted(total, max_tokens, side="right"))
    left = max_tokens - (int(total[count - 1]) if count else 0)
    taken = [pages[:count]]
    for page, fill in zip(pages[count:].tolist(), fills[count:].tolist(), strict=True):
        if left <= 0:
            break
        if fill <= left:
            taken.append(np.array([page], dtype=pages.dtype))
            left -= fill
    return np.concatenate(taken)


def group_scores(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``queries [G, D] · keys [T, D]`` as ``[G, T]`` (C order), computed as ``keys @
    queries.T``: OpenBLAS's kernel for a few query rows against transposed keys is ~2.3x
    slower on this project's CPU than the transposed product (4 x 128 against 770 keys: 72
    against 31 us). Every selection scores through it, so a batched and a per-head search
    multiply the same operands the same way."""
    return np.ascontiguousarray((keys @ queries.T).T)


def leaf_mass(queries: np.ndarray, keys: np.ndarray, fills: np.ndarray, scale: float) -> np.ndarray:
    """Attention mass ``[L]`` of leaves whose tokens' keys are ``keys [sum(fills), D]``, leaf
    by leaf (``fills [L]``, each at least 1): ``exp(scale × q·k - max)`` summed over the
    leaf, each query head of ``queries [G, D]`` normalised over these leaves, mean over the
    group."""
    scores = group_scores(queries, keys) * scale  # [G, T]
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    per_leaf = np.add.reduceat(weights, np.cumsum(fills) - fills, axis=1)  # [G, L]
    total = np.add.reduceat(per_leaf, [0], axis=1)  # [G, 1]
    return (per_leaf / total).mean(axis=0)


def best_covering(
    nodes: np.ndarray, scores: np.ndarray, counts: np.ndarray, need: float
) -> np.ndarray:
    """The best-scoring ``nodes`` (best first, ties by node id) until their ``counts``
    reach ``need``."""
    order = np.lexsort((nodes, -scores))
    covered = np.cumsum(counts[order])
    return nodes[order[: int(np.searchsorted(covered, need, side="left")) + 1]]


class Scratch:
    """Pages a body copies single tokens into for one step, freed at its next selection
    (the oracle's and ``icecache-tokens``' gathers). A copy of a body starts without any."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.pages = np.empty(0, dtype=np.int64)

    def gather(self, pages: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Copy the tokens at ``(pages[i], slots[i])`` in that order into new pages."""
        return Scratch.gather_all([self], [pages], [slots])[0]

    @staticmethod
    def gather_all(
        scratches: list[Scratch], pages: list[np.ndarray], slots: list[np.ndarray]
    ) -> list[np.ndarray]:
        """``gather`` of every scratch (all of one pool, e.g. a layer's KV heads) in one
        read, one allocation and one scatter: its tokens at ``(pages[i], slots[i])``."""
        pool = scratches[0].pool
        pool.free(np.concatenate([s.pages for s in scratches]))
        counts = np.array([len(s) for s in slots])
        size = pool.page_size
        needs = -(-counts // size)
        new = pool.alloc(int(needs.sum()))
        firsts = np.cumsum(needs) - needs
        for scratch, first, need in zip(scratches, firsts, needs, strict=True):
            scratch.pages = new[first : first + need]
        if counts.sum():  # token i of a scratch to slot i % size of its page i // size
            order = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            dest = new[np.repeat(firsts, counts) + order // size]
            pool.copy_slots(np.concatenate(pages), np.concatenate(slots), dest, order % size)
        return [scratch.pages for scratch in scratches]

    def free(self) -> None:
        self.pool.free(self.pages)
        self.pages = np.empty(0, dtype=np.int64)

    def __deepcopy__(self, memo: dict[int, object]) -> Scratch:
        pool = memo.get(id(self.pool), self.pool)
        assert isinstance(pool, PagePool)
        return Scratch(pool)
