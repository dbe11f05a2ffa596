"""What each sequence moved: pages its selections named, and pages read for it.

A page read is attributed to the sequence whose last selections named it (the engine reads
the pages of one decode step right after it), so the counts cost no extra bookkeeping in the
engine. Pure bookkeeping over ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache_service.types import Selection
from worker.kv_client import Traffic


@dataclass
class _Counts:
    selected: int = 0
    read: int = 0


class TrafficCounter:
    """Per-sequence counts of pages selected and read, for the sequences it tracks."""

    def __init__(self) -> None:
        self._counts: dict[str, _Counts] = {}
        self._last_seqs: list[str] = []
        self._last_pages = np.empty(0, dtype=np.int64)
        self._last_rows = np.empty(0, dtype=np.int64)

    def track(self, seq_id: str) -> None:
        """Start counting for ``seq_id`` from zero."""
        self._counts[seq_id] = _Counts()

    def take(self, seq_id: str) -> Traffic:
        """``seq_id``'s counts (zeros if untracked); it is no longer tracked."""
        counts = self._counts.pop(seq_id, _Counts())
        return Traffic(counts.selected, counts.read)

    def selected(self, seq_ids: list[str], selections: list[Selection]) -> None:
        """Count one decode step's selections, and remember which sequence named each page."""
        for seq_id, sel in zip(seq_ids, selections, strict=True):
            counts = self._counts.get(seq_id)
            if counts is not None:
                counts.selected += int(sel.pages.size)
        self._last_seqs = seq_ids
        self._last_pages = np.concatenate([s.pages for s in selections])
        sizes = [s.pages.size for s in selections]
        self._last_rows = np.repeat(np.arange(len(selections)), sizes)

    def read(self, pages: np.ndarray) -> None:
        """Attribute pages read ``[n]`` to the sequences whose last selections named them."""
        if not self._last_pages.size or not pages.size:
            return
        order = np.argsort(self._last_pages, kind="stable")
        found = np.searchsorted(self._last_pages, pages, sorter=order)
        found = order[np.minimum(found, order.size - 1)]
        hit = self._last_pages[found] == pages
        per_row = np.bincount(self._last_rows[found[hit]], minlength=len(self._last_seqs))
        for seq_id, count in zip(self._last_seqs, per_row, strict=True):
            counts = self._counts.get(seq_id)
            if count and counts is not None:
                counts.read += int(count)
