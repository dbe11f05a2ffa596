"""The global page-id space over several replicas: a disjoint, dense range of ids per owner.

Each replica numbers the pages of its own pool from 0, so replica A's page 5 and replica B's
page 5 are different pages. The worker's device page cache keys pages by id, so each owner
(one incarnation of a replica) gets a range of *global* ids: owners in the order added hold
``[base, base + num_pages)`` with ``base`` the running sum of the pools' sizes. A retired
owner's range is never given out again, so a page of a dead incarnation can never be
mistaken for a page of its successor, which gets a new range after the last one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

import numpy as np

Owner = TypeVar("Owner")


class PageRanges(Generic[Owner]):
    """Global page ids <-> (owner, local id); pure bookkeeping over ids."""

    def __init__(self) -> None:
        self._owners: list[Owner | None] = []  # by range, in base order; None: retired
        self._bases = np.empty(0, dtype=np.int64)
        self._sizes: list[int] = []
        self._next = 0

    def add(self, owner: Owner, num_pages: int) -> int:
        """Give ``owner`` (a pool of ``num_pages``) the next range; returns its base."""
        base, self._next = self._next, self._next + num_pages
        self._owners.append(owner)
        self._sizes.append(num_pages)
        self._bases = np.append(self._bases, base)
        return base

    def retire(self, owner: Owner) -> None:
        """Take ``owner``'s range out of use for good: its ids read as nobody's."""
        index = next(i for i, o in enumerate(self._owners) if o is owner)
        self._owners[index] = None

    def split(self, pages: np.ndarray) -> Iterator[tuple[Owner | None, np.ndarray, np.ndarray]]:
        """Global ids ``[n]`` -> ``(owner, rows, local ids)`` per range they fall in, where
        ``pages[rows]`` are that owner's (``None`` for a retired range)."""
        which = np.searchsorted(self._bases, pages, side="right") - 1
        for index in np.unique(which):
            rows = np.flatnonzero(which == index)
            local = pages[rows] - self._bases[index]
            assert local.max(initial=0) < self._sizes[index], "page id beyond its owner's pool"
            yield self._owners[int(index)], rows, local
