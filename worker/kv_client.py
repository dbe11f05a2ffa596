"""The KV contract every client of the KV store keeps, and its in-process implementation.

Two sides of one contract (``KVClient``):

- the **data path** the engine uses: ``create``, ``append``, ``decode``, ``read_pages``,
  ``release``, and for prefix reuse ``share_prefix`` and ``positional_pages``;
- the **serving path** the scheduler and the worker's servicer use: where a sequence lives
  (``replica_of``), which sequences a failed replica took with it (``take_lost``), what a
  sequence moved (``take_traffic``), the replicas' state (``replicas``, ``watch_readiness``)
  and ``close``. These have defaults for a client with nothing to fail over to; a client
  that subclasses ``KVClient`` inherits them.

Implementations: ``LocalKVClient`` (here: a ``Store`` in this process), ``RemoteKVClient``
(``worker.kv.remote``: one cache service over gRPC; its failures are errors) and
``ShardedKVClient`` (``worker.kv.sharded``: several replicas, with failover). Everything
crossing this contract is plain Python and NumPy, never protobuf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cache_service.page_pool import PagePool
from cache_service.store import Store
from cache_service.types import AdoptionRefused, PrefixKeys, Selection, SequenceSpec, kv_bytes

IN_PROCESS = "in-process"
"""``replica_of`` a sequence kept in this process."""


@dataclass(frozen=True)
class Traffic:
    """What one sequence moved between the KV store and the device."""

    pages_selected: int = 0
    """Pages its selections named, summed over steps, layers and KV heads."""
    pages_read: int = 0
    """Pages read from the store into the device page cache (cache misses)."""


@dataclass(frozen=True)
class ReplicaState:
    """One cache-service replica as a client sees it now."""

    address: str
    """``host:port``."""
    healthy: bool
    """Whether it passes its health checks (and takes new sequences)."""
    sequences: int
    """Sequences placed on it and not released."""
    placed_total: int
    """Sequences placed on it since the client started."""


class KVClient(Protocol):
    """Sequence lifecycle, KV appends, per-layer retrieval and page reads; failover state."""

    page_size: int
    dtype: str
    """Element type the store keeps K/V in (``float32`` or ``float16``)."""

    # ---- data path (the engine) ------------------------------------------------------------
    def create(self, seq_id: str, spec: SequenceSpec, prefix: PrefixKeys | None = None) -> int:
        """Start a sequence: empty, or from the longest run of ``prefix``'s blocks the store
        keeps (``cache_service.prefix_cache``). Returns the tokens it holds already (0 when
        nothing was reused): append from that position on."""
        ...

    def share_prefix(self, seq_id: str, prefix: PrefixKeys) -> int:
        """Keep a just-prefilled sequence's leading blocks for later prompts that begin with
        them; returns the blocks kept now (0 from a store that keeps none)."""
        ...

    def positional_pages(self, seq_id: str, layer: int) -> np.ndarray:
        """Pages of one layer's tokens in position order ``[kv_heads, n]``, before the first
        decode step: how the engine reads the K/V of a prefix it started from."""
        ...

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
        queries ``[B, q_heads, head_dim]``. A client with failover answers an empty
        selection for a sequence it lost (see ``take_lost``).
        """

    def append_step(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        """``decode`` without the selection, for a layer that attends to every token
        (below each sequence's ``full_layers``) whose K/V the caller keeps itself.

        keys, values ``[B, kv_heads, head_dim]``; positions ``[B]``. A client with
        failover skips a sequence it lost (see ``take_lost``).
        """

    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        """The pages one layer's query ``[q_heads, head_dim]`` attends, nothing stored (what
        ``decode`` selects once the token is stored)."""
        ...

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        """ids ``[n]`` -> page data ``[n, 2, page_size, head_dim]``.

        ``versions``: the versions a selection named for them (a client may serve those
        from data it already got with that selection); the data read is current either way.
        """

    def release(self, seq_id: str) -> None: ...

    def pages_in_place(self) -> np.ndarray | None:
        """The store's own page array ``[num_pages, 2, page_size, head_dim]`` when it lives in
        this process, so attention can read a selection's pages where they are; ``None``
        (the default) when pages must be read (``read_pages``). A page a selection names
        holds what it held when selected until the next call into the store."""
        return None

    # ---- serving path (the scheduler and the servicer); defaults: nothing to fail over ----
    def replica_of(self, seq_id: str) -> str:
        """Where ``seq_id``'s KV lives: a replica's ``host:port``, or ``IN_PROCESS``."""
        return IN_PROCESS

    def take_lost(self) -> set[str]:
        """Sequences lost with a failed replica since the last call; the caller rebuilds
        them elsewhere and releases the lost ids (their decode rows were garbage)."""
        return set()

    def take_traffic(self, seq_id: str) -> Traffic:
        """What ``seq_id`` moved so far (zeros where the client does not count), and forget it."""
        return Traffic()

    def replicas(self) -> list[ReplicaState]:
        """The cache-service replicas behind this client (none for an in-process store)."""
        return []

    def watch_readiness(self, on_change: Callable[[bool], None]) -> None:
        """Call ``on_change(ready)`` now and whenever it changes (one watcher: a later call
        replaces it); ready: a new sequence can be placed (some replica is healthy). By
        default always ready."""
        on_change(True)

    def holder_epoch(self, seq_id: str) -> int:
        """The epoch of the lease this client holds ``seq_id`` under on its replica (what
        another worker needs to take it over; 0: no lease, e.g. in process)."""
        return 0

    def adopt(self, seq_id: str, replica: str, epoch: int, length: int, spec: SequenceSpec) -> int:
        """Take over ``seq_id`` on ``replica`` from the lease of ``epoch``, if it has ``spec``
        and its layers hold ``length`` tokens (its first layers may hold one more: returns how
        many do; ``cache_service.proto``'s ``AdoptRequest``). Raises ``AdoptionRefused`` when
        it cannot (then rebuild it), ``AdoptionConflict`` when another worker took it first.
        By default there is nothing to take over."""
        raise AdoptionRefused(f"{replica} is not a cache service of this worker")

    def close(self) -> None:
        """Let go of connections and threads (nothing by default)."""
        return None


class LocalKVClient(KVClient):
    """A ``Store`` in this process; page reads are plain array gathers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.page_size = store.pool.page_size
        self.dtype = store.pool.dtype

    @classmethod
    def with_capacity(
        cls, max_bytes: int, page_size: int, head_dim: int, dtype: str = "float32"
    ) -> LocalKVClient:
        """A store whose pool holds at most ``max_bytes`` of K/V (allocated lazily by the OS)."""
        page_bytes = kv_bytes(page_size, head_dim, np.dtype(dtype).itemsize)
        return cls(Store(PagePool(max(1, max_bytes // page_bytes), page_size, head_dim, dtype)))

    def create(self, seq_id: str, spec: SequenceSpec, prefix: PrefixKeys | None = None) -> int:
        return self.store.create(seq_id, spec, prefix)

    def share_prefix(self, seq_id: str, prefix: PrefixKeys) -> int:
        return self.store.share_prefix(seq_id, prefix)

    def positional_pages(self, seq_id: str, layer: int) -> np.ndarray:
        return self.store.positional_pages(seq_id, layer)

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

    def append_step(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        self.store.append_step(layer, seq_ids, keys, values, positions)

    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        return self.store.retrieve(seq_id, layer, queries)

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        return self.store.read_pages(pages)

    def release(self, seq_id: str) -> None:
        self.store.release(seq_id)

    def pages_in_place(self) -> np.ndarray:
        return self.store.pool.data
