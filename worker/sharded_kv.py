"""A ``KVClient`` over several cache-service replicas, sequences placed by rendezvous hashing.

Placement: ``create`` puts a sequence on ``placement.owner(seq_id, healthy replicas)`` and
records it; every later call for that sequence goes to the same replica. A replica that fails
its health checks takes no new sequences; the ones it holds stay recorded there (re-placing
them after a failure, with a re-prefill, is left to a later layer: ``ranked`` gives the order).

Page ids: each replica numbers the pages of its own pool from 0, so replica A's page 5 and
replica B's page 5 are different pages. The worker's device page cache keys pages by id, so
this client gives each replica a disjoint, dense range of *global* ids: replica ``i`` (in the
order given) owns ``[base[i], base[i] + num_pages[i])`` with ``base`` the running sum of the
pools' sizes. Selections leave with global ids; ``read_pages`` maps them back to
(replica, local id). Dense ranges keep the page cache's id -> slot table small (a fixed
``i << 40`` offset would not).

Decode of a batch sends one RPC per replica per layer (in parallel when the batch spans
several replicas) and returns the selections in the batch's order.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache_service.types import Selection, SequenceSpec, UnknownSequence
from worker.kv_client import KVClient
from worker.placement import owner

log = logging.getLogger(__name__)


@dataclass
class Shard:
    """One replica as this client sees it."""

    address: str
    """``host:port``; also the replica's name in rendezvous hashing."""
    client: KVClient
    num_pages: int
    """Size of the replica's pool (its local page ids are ``0 .. num_pages - 1``)."""
    base: int = 0
    """First global page id of this replica (set by ``ShardedKVClient``)."""


@dataclass
class SequenceTraffic:
    """What one sequence moved between the cache service and the device."""

    replica: str
    pages_selected: int = 0
    """Pages its selections named, summed over steps, layers and KV heads."""
    pages_read: int = 0
    """Pages read from the replica into the device page cache (cache misses)."""


@dataclass
class PlacementCounts:
    """Sequences per replica: live now and placed since start."""

    live: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)


class NoHealthyReplica(ConnectionError):
    """Every cache-service replica fails its health checks; no sequence can be placed."""


class HealthMonitor:
    """Polls ``grpc.health.v1`` on each replica every ``interval`` s on a daemon thread.

    A replica is healthy after a ``SERVING`` answer and unhealthy after any other answer or
    an error; all start healthy (they answered ``Info`` on connect).
    """

    def __init__(
        self,
        addresses: Iterable[str],
        interval: float = 1.0,
        timeout: float = 1.0,
        on_change: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.addresses = list(addresses)
        self.interval = interval
        self.timeout = timeout
        self.on_change = on_change
        self._healthy = set(self.addresses)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def healthy(self) -> set[str]:
        with self._lock:
            return set(self._healthy)

    def mark(self, address: str, healthy: bool) -> None:
        """Record one replica's state (``on_change`` is called when the healthy set changes)."""
        with self._lock:
            before = set(self._healthy)
            (self._healthy.add if healthy else self._healthy.discard)(address)
            after = set(self._healthy)
        if before != after:
            log.warning("replica %s is %s", address, "healthy" if healthy else "UNHEALTHY")
            if self.on_change is not None:
                self.on_change(after)

    def start(self) -> HealthMonitor:
        self._thread = threading.Thread(target=self._run, name="replica-health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + self.timeout + 1)

    def _run(self) -> None:
        channels = {a: grpc.insecure_channel(a) for a in self.addresses}
        stubs = {a: health_pb2_grpc.HealthStub(c) for a, c in channels.items()}
        try:
            while not self._stop.wait(self.interval):
                for address, stub in stubs.items():
                    self.mark(address, self._check(stub))
        finally:
            for channel in channels.values():
                channel.close()

    def _check(self, stub: health_pb2_grpc.HealthStub) -> bool:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class ShardedKVClient:
    """``KVClient`` over replicas; see the module docstring for placement and page ids."""

    def __init__(self, shards: list[Shard], health: HealthMonitor | None = None) -> None:
        if not shards:
            raise ValueError("give at least one cache-service replica")
        names = [s.address for s in shards]
        if len(set(names)) != len(names):
            raise ValueError(f"a cache-service replica is listed twice: {', '.join(names)}")
        self.page_size = shards[0].client.page_size
        if any(s.client.page_size != self.page_size for s in shards):
            raise ValueError("cache-service replicas disagree on page size; start them alike")
        base = 0
        for shard in shards:
            shard.base, base = base, base + shard.num_pages
        self.shards = {s.address: s for s in shards}
        self._bases = np.array([s.base for s in shards], dtype=np.int64)
        self._order = shards
        self.health = health or HealthMonitor(names)
        self.placement: dict[str, str] = {}
        self.traffic: dict[str, SequenceTraffic] = {}
        self.counts = PlacementCounts()
        self._last_pages = np.empty(0, dtype=np.int64)
        self._last_seqs: list[str] = []
        self._last_rows = np.empty(0, dtype=np.int64)
        self._pool = ThreadPoolExecutor(len(shards), "shard") if len(shards) > 1 else None

    @classmethod
    def connect(
        cls, addresses: list[str], health_interval: float = 1.0, connect_timeout: float = 30.0
    ) -> ShardedKVClient:
        """Connect to every replica (each must answer within ``connect_timeout`` s)."""
        from worker.remote_kv import RemoteKVClient

        shards: list[Shard] = []
        try:
            for address in addresses:
                client = RemoteKVClient.connect(address, connect_timeout=connect_timeout)
                shards.append(Shard(address, client, int(client.info.pool.num_pages)))
            sharded = cls(shards, HealthMonitor(addresses, health_interval))
        except BaseException:
            for shard in shards:
                shard.client.close()  # type: ignore[attr-defined]
            raise
        sharded.health.start()
        return sharded

    # ---- KVClient ------------------------------------------------------------------------
    def create(self, seq_id: str, spec: SequenceSpec) -> None:
        healthy = self.health.healthy()
        if not healthy:
            raise NoHealthyReplica(
                f"none of the cache-service replicas {', '.join(self.shards)} is healthy; "
                "check them (grpc.health.v1) or the --cache-service list"
            )
        address = owner(seq_id, healthy)
        self.shards[address].client.create(seq_id, spec)
        self.placement[seq_id] = address
        self.traffic[seq_id] = SequenceTraffic(address)
        self.counts.live[address] += 1
        self.counts.total[address] += 1
        log.debug("placed %s on %s", seq_id, address)

    def append(
        self, seq_id: str, layer: int, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> None:
        self._shard(seq_id).client.append(seq_id, layer, keys, values, positions)

    def decode(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray,
    ) -> list[Selection]:
        """One layer's step for a batch; one RPC per replica, selections in batch order."""
        groups: dict[str, list[int]] = {}
        for row, seq_id in enumerate(seq_ids):
            groups.setdefault(self._shard(seq_id).address, []).append(row)

        def call(address: str, rows: list[int]) -> list[Selection]:
            shard = self.shards[address]
            ids = [seq_ids[r] for r in rows]
            sels = shard.client.decode(
                layer, ids, keys[rows], values[rows], positions[rows], queries[rows]
            )
            return [s._replace(pages=s.pages + shard.base) for s in sels]

        if self._pool is None or len(groups) == 1:
            answers = [call(a, rows) for a, rows in groups.items()]
        else:
            answers = list(self._pool.map(call, groups.keys(), groups.values()))
        out: list[Selection | None] = [None] * len(seq_ids)
        for rows, sels in zip(groups.values(), answers, strict=True):
            for row, sel in zip(rows, sels, strict=True):
                out[row] = sel
        selections = [s for s in out if s is not None]
        self._remember(seq_ids, selections)
        return selections

    def read_pages(self, pages: np.ndarray) -> np.ndarray:
        """Global ids ``[n]`` -> page data ``[n, 2, page_size, head_dim]``, from each owner."""
        pages = np.asarray(pages, dtype=np.int64)
        self._count_reads(pages)
        which = np.searchsorted(self._bases, pages, side="right") - 1
        out: np.ndarray | None = None
        for index in np.unique(which):
            shard = self._order[int(index)]
            rows = np.flatnonzero(which == index)
            local = pages[rows] - shard.base
            assert local.max(initial=0) < shard.num_pages, "page id beyond its replica's pool"
            data = shard.client.read_pages(local)
            if out is None:
                out = np.empty((pages.size, *data.shape[1:]), dtype=data.dtype)
            out[rows] = data
        if out is None:  # no pages asked for
            out = self._order[0].client.read_pages(pages)
        return out

    def release(self, seq_id: str) -> None:
        shard = self._shard(seq_id)
        try:
            shard.client.release(seq_id)
        finally:
            del self.placement[seq_id]
            self.traffic.pop(seq_id, None)
            self.counts.live[shard.address] -= 1

    # ---- extras --------------------------------------------------------------------------
    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        """Retrieval only (nothing stored): queries ``[q_heads, head_dim]`` -> its pages.

        Needs replicas whose client has ``retrieve`` (``RemoteKVClient``); thread-safe."""
        shard = self._shard(seq_id)
        sel: Selection = shard.client.retrieve(seq_id, layer, queries)  # type: ignore[attr-defined]
        return sel._replace(pages=sel.pages + shard.base)

    def replica_of(self, seq_id: str) -> str:
        """The replica holding ``seq_id``."""
        return self._shard(seq_id).address

    def close(self) -> None:
        """Stop health checks and close every replica's client."""
        self.health.stop()
        if self._pool is not None:
            self._pool.shutdown()
        for shard in self._order:
            close = getattr(shard.client, "close", None)
            if close is not None:
                close()

    # ---- helpers -------------------------------------------------------------------------
    def _shard(self, seq_id: str) -> Shard:
        address = self.placement.get(seq_id)
        if address is None:
            raise UnknownSequence(seq_id)
        return self.shards[address]

    def _remember(self, seq_ids: list[str], selections: list[Selection]) -> None:
        """Count selected pages and keep which sequence owns each, for ``read_pages``."""
        for seq_id, sel in zip(seq_ids, selections, strict=True):
            self.traffic[seq_id].pages_selected += int(sel.pages.size)
        self._last_seqs = seq_ids
        self._last_pages = np.concatenate([s.pages for s in selections])
        sizes = [s.pages.size for s in selections]
        self._last_rows = np.repeat(np.arange(len(selections)), sizes)

    def _count_reads(self, pages: np.ndarray) -> None:
        """Attribute pages read to the sequences whose last selections named them."""
        if not self._last_pages.size or not pages.size:
            return
        order = np.argsort(self._last_pages, kind="stable")
        found = np.searchsorted(self._last_pages, pages, sorter=order)
        found = order[np.minimum(found, order.size - 1)]
        hit = self._last_pages[found] == pages
        counts = np.bincount(self._last_rows[found[hit]], minlength=len(self._last_seqs))
        for seq_id, count in zip(self._last_seqs, counts, strict=True):
            if count and seq_id in self.traffic:
                self.traffic[seq_id].pages_read += int(count)
