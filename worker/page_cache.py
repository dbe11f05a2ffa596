"""The worker's device page cache: KV pages resident on the device, loaded in bulk.

Layout on the device (as in ``kernels``)::

    kv: [capacity, 2, page_size, head_dim]

A page is known by its id in the cache service's pool and its version there; a resident copy
with an older version is stale and is loaded again. Loading is the bulk path of the design:
missing pages are gathered into one contiguous host staging buffer (pinned on a GPU), moved
in one copy, and scattered into their slots by a kernel. Eviction is least-recently used
among the pages the current request does not need.

Bookkeeping costs O(pages requested) per call, never O(capacity): empty slots are taken in
order, and the LRU order is a queue of ``(tick, slots)`` records, one per touch, where a
slot's entry is stale once the slot has been used at a later tick. A slot may stand in
several records of one tick (a call touches what it keeps before evicting, then everything
it returns), so an eviction claims each slot it takes at once: the next record of the same
tick then sees it as used now and cannot hand it out a second time.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.dispatch import scatter_pages

log = logging.getLogger(__name__)

PageFetch = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Reads pages from the store: ids ``[n]`` and the versions the selection named ``[n]`` ->
data ``[n, 2, page_size, head_dim]``."""


@dataclass
class PageCacheStats:
    """Counters since the cache was made."""

    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    loads: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class DevicePageCache:
    """Owns ``capacity`` page slots on a device and which store page each slot holds."""

    def __init__(
        self,
        capacity: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"device page cache capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.kv = torch.empty(capacity, 2, page_size, head_dim, dtype=dtype, device=self.device)
        self.slot_page = np.full(capacity, -1, dtype=np.int64)  # slot -> store page id
        self.slot_version = np.full(capacity, -1, dtype=np.int64)
        self.slot_used = np.zeros(capacity, dtype=np.int64)  # tick of last use (LRU)
        self.page_slot = np.full(1024, -1, dtype=np.int64)  # store page id -> slot
        self.filled = 0  # slots 0 .. filled - 1 have held a page; slots are never emptied
        self.tick = 0
        self.stats = PageCacheStats()
        self._page_bytes = self.kv[0].numel() * self.kv.element_size()
        self._lru: deque[tuple[int, np.ndarray]] = deque()  # (tick, slots used then), oldest first
        self._lru_size = 0  # slots held by all records

    @property
    def page_bytes(self) -> int:
        return self._page_bytes

    def resolve(self, pages: np.ndarray, versions: np.ndarray, fetch: PageFetch) -> torch.Tensor:
        """Slots holding current copies of ``pages``, loading the missing ones in bulk.

        Args:
            pages: ``[n]`` store page ids (may repeat).
            versions: ``[n]`` their versions in the store.
            fetch: reads missing pages from the store.

        Returns:
            ``[n]`` int32 slot indices on the device, for the page table.
        """
        self.tick += 1
        if pages.size and int(pages.max()) >= self.page_slot.size:
            self._grow_index(int(pages.max()) + 1)
        slots = self.page_slot[pages]
        hit = slots >= 0  # slot -1 reads the last slot: masked by this
        hit &= self.slot_page[slots] == pages
        hit &= self.slot_version[slots] == versions
        hits = int(np.count_nonzero(hit))
        if hits < pages.size:
            miss = ~hit
            need, first = np.unique(pages[miss], return_index=True)
            keep = np.unique(slots[hit])
            if need.size + keep.size > self.capacity:
                raise RuntimeError(
                    f"one step needs {need.size + keep.size} pages, more than the device page "
                    f"cache's {self.capacity}; raise the device cache size (--device-cache-mb) "
                    "or lower the budget"
                )
            self._load(need, versions[miss][first], keep, fetch)
            self.stats.misses += int(need.size)
            slots = self.page_slot[pages]
        self.stats.hits += hits
        self._touch(slots)
        out = torch.from_numpy(slots.astype(np.int32))
        return out if self.device.type == "cpu" else out.to(self.device)

    def _load(
        self, need: np.ndarray, versions: np.ndarray, keep: np.ndarray, fetch: PageFetch
    ) -> None:
        data = np.ascontiguousarray(fetch(need, versions))  # first: a failed read changes nothing
        dest = self.page_slot[need]  # a stale copy is reloaded in its own slot
        fresh = (dest < 0) | (self.slot_page[dest] != need)  # slot -1 reads the last: masked
        count = int(np.count_nonzero(fresh))
        if count > self.capacity - self.filled:  # evicting: what this request holds stays
            self._touch(np.concatenate([keep, dest[~fresh]]))
        dest[fresh] = self._victims(count)
        evicted = self.slot_page[dest[fresh]]
        self.page_slot[evicted[evicted >= 0]] = -1
        self.page_slot[need] = dest
        self.slot_page[dest] = need
        self.slot_version[dest] = versions
        staging = torch.from_numpy(data)
        if self.device.type == "cuda":
            staging = staging.pin_memory().to(self.device, non_blocking=True)
        slots = torch.from_numpy(dest.astype(np.int32)).to(self.device)
        scatter_pages(staging.to(self.kv.dtype), self.kv, slots)
        self.stats.loads += 1
        self.stats.bytes_moved += need.size * self._page_bytes

    def _victims(self, count: int) -> np.ndarray:
        """``count`` slots to overwrite: empty ones first, then the least recently used.

        Slots used at the current tick are never chosen; the caller has checked that enough
        others exist.
        """
        if count == 0:
            return np.empty(0, dtype=np.int64)
        take = min(count, self.capacity - self.filled)
        out = [np.arange(self.filled, self.filled + take, dtype=np.int64)]
        self.filled += take
        count -= take
        while count > 0:
            tick, slots = self._lru.popleft()
            assert tick < self.tick, "the capacity check leaves enough older slots"
            self._lru_size -= slots.size
            live = np.unique(slots[self.slot_used[slots] == tick])  # drops stale and repeats
            if live.size > count:
                self._lru.appendleft((tick, live[count:]))
                self._lru_size += live.size - count
                live = live[:count]
            self.slot_used[live] = self.tick  # claimed: no later record may hand them out
            out.append(live)
            count -= live.size
        return np.concatenate(out)

    def _touch(self, slots: np.ndarray) -> None:
        """Marks ``slots`` (repeats allowed) used now, at the young end of the LRU order."""
        self.slot_used[slots] = self.tick
        self._lru.append((self.tick, slots))
        self._lru_size += slots.size
        if self._lru_size > 4 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        """Rebuilds the LRU records from ``slot_used``: one per occupied slot, oldest first."""
        occupied = np.flatnonzero(self.slot_page >= 0)
        order = occupied[np.argsort(self.slot_used[occupied], kind="stable")]
        ticks = self.slot_used[order]
        bounds = np.flatnonzero(np.diff(ticks)) + 1  # where the tick changes
        starts = np.concatenate([[0], bounds]) if order.size else bounds
        groups = np.split(order, bounds) if order.size else []
        self._lru = deque((int(ticks[i]), g) for i, g in zip(starts, groups, strict=True))
        self._lru_size = order.size

    def _grow_index(self, size: int) -> None:
        if size > self.page_slot.size:
            grow = max(size, 2 * self.page_slot.size)
            self.page_slot = np.pad(
                self.page_slot, (0, grow - self.page_slot.size), constant_values=-1
            )
