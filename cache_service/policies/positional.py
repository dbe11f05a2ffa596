"""Bodies kept in position order: ``full``, ``streaming``, ``quest`` and ``oracle``."""

from __future__ import annotations

import numpy as np

from cache_service.page_pool import PagePool, as_float32
from cache_service.policies.base import Body, Scratch, group_scores, take_within


class PositionalBody(Body):
    """Pages in position order, as they left the recent window. Selects them all."""

    def __init__(self, pool: PagePool) -> None:
        super().__init__(pool)
        self.pages = np.empty(0, dtype=np.int64)

    def add(self, pages: np.ndarray) -> None:
        self.pages = np.concatenate([self.pages, pages])

    def select(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        return self.pages

    def all_pages(self) -> np.ndarray:
        return self.pages


class StreamingBody(PositionalBody):
    """StreamingLLM: the most recent body pages extend the recent window up to the budget."""

    def select(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        newest_first = self.pages[::-1]
        return take_within(newest_first, self.pool.fill[newest_first], max_tokens)[::-1]


class QuestBody(PositionalBody):
    """Quest: rank pages by an upper bound of q·k from per-page min and max keys."""

    def __init__(self, pool: PagePool) -> None:
        super().__init__(pool)
        dim = pool.head_dim
        self.mins = np.empty((0, dim), dtype=np.float32)
        self.maxs = np.empty((0, dim), dtype=np.float32)

    def add(self, pages: np.ndarray) -> None:
        super().add(pages)
        keys = as_float32(self.pool.data[pages, 0])  # [n, P, D]; pages are full
        self.mins = np.concatenate([self.mins, keys.min(axis=1)])
        self.maxs = np.concatenate([self.maxs, keys.max(axis=1)])

    def select(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        if self.pages.size == 0:
            return self.pages
        # bound[g, n] = sum_d max(q_d * min_d, q_d * max_d); a GQA group takes its max.
        bound = np.maximum(
            queries[:, None, :] * self.mins[None], queries[:, None, :] * self.maxs[None]
        ).sum(-1)
        order = np.argsort(-bound.max(axis=0), kind="stable")
        ranked = self.pages[order]
        return take_within(ranked, self.pool.fill[ranked], max_tokens)


class OracleBody(PositionalBody):
    """Exact top-k tokens by q·k (group max), copied into scratch pages each step.

    The oracle is the upper bound of token selection at a budget; its per-token gather is
    what a real system cannot afford, and it is counted as moved pages like any other.
    """

    def __init__(self, pool: PagePool) -> None:
        super().__init__(pool)
        self.scratch: Scratch = Scratch(pool)

    def select(self, queries: np.ndarray, max_tokens: int) -> np.ndarray:
        self.scratch.free()
        if self.pages.size == 0 or max_tokens < 1:
            return self.scratch.pages
        keys = self.pool.data[self.pages, 0].reshape(-1, self.pool.head_dim)  # [T, D]
        scores = group_scores(queries.astype(np.float32), as_float32(keys)).max(axis=0)  # [T]
        take = min(max_tokens, scores.size)
        top = np.sort(np.argpartition(-scores, take - 1)[:take])
        page_of, slot = np.divmod(top, self.pool.page_size)
        return self.scratch.gather(self.pages[page_of], slot)
