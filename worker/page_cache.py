"""The worker's device page cache: KV pages resident on the device, loaded in bulk.

Layout on the device (as in ``kernels``)::

    kv: [capacity, 2, page_size, head_dim]

A page is known by its id in the cache service's pool and its version there; a resident copy
with an older version is stale and is loaded again. Loading is the bulk path of the design:
missing pages are gathered into one contiguous host staging buffer (pinned on a GPU), moved
in one copy, and scattered into their slots by a kernel. Eviction is least-recently used
among the pages the current request does not need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.cupy_ops import scatter_pages

log = logging.getLogger(__name__)

PageFetch = Callable[[np.ndarray], np.ndarray]
"""Reads pages from the store: ids ``[n]`` -> data ``[n, 2, page_size, head_dim]``."""


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
        self.free_slots = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # stack, top = end
        self.tick = 0
        self.stats = PageCacheStats()

    @property
    def page_bytes(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

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
        self._grow_index(int(pages.max(initial=-1)) + 1)
        slots = self.page_slot[pages]
        hit = (slots >= 0) & (self.slot_version[np.maximum(slots, 0)] == versions)
        need, first = np.unique(pages[~hit], return_index=True)
        self.stats.hits += int(hit.sum())
        self.stats.misses += int(need.size)
        if need.size:
            self._load(need, versions[~hit][first], slots[hit], fetch)
            slots = self.page_slot[pages]
        self.slot_used[slots] = self.tick
        return torch.from_numpy(slots.astype(np.int32)).to(self.device)

    def _load(
        self, need: np.ndarray, versions: np.ndarray, keep: np.ndarray, fetch: PageFetch
    ) -> None:
        old = self.page_slot[need]
        dest = np.where(old >= 0, old, -1)
        fresh = dest < 0
        dest[fresh] = self._victims(int(fresh.sum()), np.concatenate([keep, old[old >= 0]]))
        evicted = self.slot_page[dest[fresh]]
        self.page_slot[evicted[evicted >= 0]] = -1
        self.page_slot[need] = dest
        self.slot_page[dest] = need
        self.slot_version[dest] = versions
        staging = torch.from_numpy(np.ascontiguousarray(fetch(need)))
        if self.device.type == "cuda":
            staging = staging.pin_memory().to(self.device, non_blocking=True)
        slots = torch.from_numpy(dest.astype(np.int32)).to(self.device)
        scatter_pages(staging.to(self.kv.dtype), self.kv, slots)
        self.stats.loads += 1
        self.stats.bytes_moved += need.size * self.page_bytes

    def _victims(self, count: int, protected: np.ndarray) -> np.ndarray:
        """``count`` slots to overwrite: empty ones first, then the least recently used."""
        if count == 0:
            return np.empty(0, dtype=np.int64)
        age = self.slot_used.copy()
        age[self.slot_page < 0] = -1  # empty slots first
        age[protected] = np.iinfo(np.int64).max
        age[self.slot_used == self.tick] = np.iinfo(np.int64).max  # used by this step
        if count > self.capacity - int((age == np.iinfo(np.int64).max).sum()):
            raise RuntimeError(
                f"one step needs more than the device page cache's {self.capacity} pages; "
                "raise the device cache size (--device-cache-mb) or lower the budget"
            )
        return (
            np.argpartition(age, count - 1)[:count] if count < self.capacity else np.arange(count)
        )

    def _grow_index(self, size: int) -> None:
        if size > self.page_slot.size:
            grow = max(size, 2 * self.page_slot.size)
            self.page_slot = np.pad(
                self.page_slot, (0, grow - self.page_slot.size), constant_values=-1
            )
