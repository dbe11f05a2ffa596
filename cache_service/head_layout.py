"""Sink pages and the recent window of one (sequence, layer, KV head)."""

from __future__ import annotations

from collections import deque

import numpy as np

from cache_service.page_pool import PagePool


class HeadLayout:
    """Positional pages at both ends of one head's sequence: sinks and the recent window.

    Tokens arrive in position order. The first ``sink_tokens`` fill the sink pages, which are
    always attended. Later tokens fill the recent window, a ring of ``window_pages`` positional
    pages; when a token needs a new page and the ring is full, its oldest (full) page leaves
    the window. It is handed to the caller, who gives it to the policy's body,
    ``handover_delay`` tokens later (meanwhile it is a ``leaving`` page, still attended):
    heads with different delays hand their pages over, and insert them into their index, on
    different decode steps.
    """

    def __init__(
        self, pool: PagePool, sink_tokens: int, window_pages: int, handover_delay: int = 0
    ) -> None:
        if not 0 <= handover_delay < pool.page_size:
            raise ValueError(
                f"handover_delay must be in [0, {pool.page_size}), got {handover_delay}"
            )
        self.pool = pool
        self.sink_tokens = sink_tokens
        self.window_pages = window_pages
        self.handover_delay = handover_delay
        self.sink: list[int] = []
        self.window: deque[int] = deque()
        self.leaving: deque[tuple[int, int]] = deque()  # (page, length that hands it over)
        self.length = 0

    def append(self, keys: np.ndarray, values: np.ndarray, positions: np.ndarray) -> list[int]:
        """Store tokens; returns the full pages handed over (left the recent window at least
        ``handover_delay`` tokens ago), oldest first.

        Args:
            keys, values: ``[T, head_dim]``.
            positions: ``[T]``, continuing ``self.length``.
        """
        start, size = 0, self.pool.page_size
        while start < len(positions):
            whole = (len(positions) - start) // size
            if whole and self.length >= self.sink_tokens and not self._room_in_window():
                start = self._append_whole_pages(keys, values, positions, start, whole)
                continue
            page, room = self._open_page()
            end = min(len(positions), start + room)
            self.pool.append(page, keys[start:end], values[start:end], positions[start:end])
            self.length += end - start
            start = end
        handed: list[int] = []
        while self.leaving and self.leaving[0][1] <= self.length:
            handed.append(self.leaving.popleft()[0])
        return handed

    def _append_whole_pages(
        self, keys: np.ndarray, values: np.ndarray, positions: np.ndarray, start: int, whole: int
    ) -> int:
        """Tokens ``start ..`` into ``whole`` new window pages, allocated and written at once
        (a prefill block's pages: one call each instead of one per page); the pages, the
        ring and the hand-over lengths are what ``_open_page`` page by page would give.
        Returns where the tokens not written start."""
        size = self.pool.page_size
        pages = self.pool.alloc(whole)  # the ids alloc(1) would give one by one, in order
        for page in pages.tolist():
            if len(self.window) == self.window_pages:
                due = self.length + 1 + self.handover_delay  # as in _open_page
                self.leaving.append((self.window.popleft(), due))
            self.window.append(page)
            self.length += size
        end = start + whole * size
        self.pool.fill_pages(pages, keys[start:end], values[start:end], positions[start:end])
        return end

    def restore(self, pages: np.ndarray, length: int) -> list[int]:
        """Take over the positional pages of a prefix another head stored: the state that
        appending those ``length`` tokens would leave, on an empty layout.

        Args:
            pages: ``[length / page_size]`` full pages holding positions ``0 .. length - 1``
                in order (read-only: shared with other holders).
            length: tokens, a multiple of the page size.

        Returns:
            the pages handed over by then, oldest first (``append``'s return).
        """
        size = self.pool.page_size
        assert self.length == 0, "restore into an empty layout"
        assert length % size == 0 and len(pages) * size == length, "whole pages only"
        ids = [int(p) for p in pages]
        sinks = min(len(ids), self.sink_tokens // size)
        rest = ids[sinks:]
        kept = len(rest) - min(self.window_pages, len(rest))
        handed = rest[: min(kept, self.handed_by(length))]
        for j in range(len(handed), kept):
            self.leaving.append((rest[j], self._due(j)))
        self.sink = ids[:sinks]
        self.window = deque(rest[kept:])
        self.length = length
        return handed

    def handed_by(self, length: int) -> int:
        """Pages after the sinks handed over once the head holds ``length`` tokens."""
        first = self._due(0)
        return 0 if length < first else (length - first) // self.pool.page_size + 1

    def _due(self, j: int) -> int:
        """The length at which page ``j`` after the sinks is handed over: it left the window
        when page ``j + window_pages`` opened (see ``_open_page``), then waits its delay."""
        size = self.pool.page_size
        return self.sink_tokens + (j + self.window_pages) * size + 1 + self.handover_delay

    def _room_in_window(self) -> bool:
        """Whether the window's newest page has free slots."""
        return bool(self.window) and self.pool.fill[self.window[-1]] < self.pool.page_size

    def _open_page(self) -> tuple[int, int]:
        """The page the next token goes to and how many tokens fit there."""
        size = self.pool.page_size
        if self.length < self.sink_tokens:
            if not self.sink or self.pool.fill[self.sink[-1]] == size:
                self.sink.append(int(self.pool.alloc(1)[0]))
            room = size - int(self.pool.fill[self.sink[-1]])
            return self.sink[-1], min(room, self.sink_tokens - self.length)
        if not self.window or self.pool.fill[self.window[-1]] == size:
            if len(self.window) == self.window_pages:
                due = self.length + 1 + self.handover_delay  # counted from the token that evicts
                self.leaving.append((self.window.popleft(), due))
            self.window.append(int(self.pool.alloc(1)[0]))
        return self.window[-1], size - int(self.pool.fill[self.window[-1]])

    def sink_pages(self) -> np.ndarray:
        return np.asarray(self.sink, dtype=np.int64)

    def window_pages_now(self) -> np.ndarray:
        return np.asarray(self.window, dtype=np.int64)

    def leaving_pages(self) -> np.ndarray:
        """Pages that left the window but are not handed over yet (at most one), oldest first."""
        return np.asarray([page for page, _ in self.leaving], dtype=np.int64)

    def release(self) -> None:
        """Free the sink, window and leaving pages."""
        pages = self.sink + [page for page, _ in self.leaving] + list(self.window)
        self.pool.free(np.asarray(pages, dtype=np.int64))
        self.sink.clear()
        self.window.clear()
        self.leaving.clear()
