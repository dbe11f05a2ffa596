"""The engine's view of the KV store, and its in-process implementation.

The engine runs unchanged against any ``KVClient``: ``LocalKVClient`` holds a ``Store`` in
this process; the gRPC client (``worker.remote_kv``) talks to a cache service.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cache_service.page_pool import PagePool
from cache_service.store import Store
from cache_service.types import Selection, SequenceSpec


class KVClient(Protocol):
    """Sequence lifecycle, KV appends, per-layer retrieval and page reads."""

    page_size: int

    def create(self, seq_id: str, spec: SequenceSpec) -> None: ...

    def append(
        self, seq_id: str, layer: int, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> None:
        """keys, values ``[T, kv_heads, head_dim]``; positions ``[T]``."""

    def decode(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray,
    ) -> list[Selection]:
        """One decode step of one layer for a batch.

        keys, values ``[B, kv_heads, head_dim]``; positions ``[B]``;
        queries ``[B, q_heads, head_dim]``.
        """

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        """ids ``[n]`` -> page data ``[n, 2, page_size, head_dim]``.

        ``versions``: the versions a selection named for them (a client may serve those
        from data it already got with that selection); the data read is current either way.
        """

    def release(self, seq_id: str) -> None: ...


class LocalKVClient:
    """A ``Store`` in this process; page reads are plain array gathers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.page_size = store.pool.page_size

    @classmethod
    def with_capacity(
        cls, max_bytes: int, page_size: int, head_dim: int, dtype: str = "float32"
    ) -> LocalKVClient:
        """A store whose pool holds at most ``max_bytes`` of K/V (allocated lazily by the OS)."""
        page_bytes = 2 * page_size * head_dim * (4 if dtype == "float32" else 2)
        return cls(Store(PagePool(max(1, max_bytes // page_bytes), page_size, head_dim, dtype)))

    def create(self, seq_id: str, spec: SequenceSpec) -> None:
        self.store.create(seq_id, spec)

    def append(
        self, seq_id: str, layer: int, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> None:
        self.store.append(seq_id, layer, keys, values, positions)

    def decode(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray,
    ) -> list[Selection]:
        return self.store.decode(layer, seq_ids, keys, values, positions, queries)

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        return self.store.read_pages(pages)

    def release(self, seq_id: str) -> None:
        self.store.release(seq_id)
