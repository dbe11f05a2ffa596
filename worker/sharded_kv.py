"""A ``KVClient`` over several cache-service replicas, sequences placed by rendezvous hashing.

Placement: ``create`` puts a sequence on ``placement.owner(seq_id, healthy replicas)`` and
records it; every later call for that sequence goes to the same replica. A replica that fails
its health checks takes no new sequences.

Failures: a replica that stops answering (``ConnectionError``: UNAVAILABLE, DEADLINE_EXCEEDED)
or that no longer knows a sequence it was given (it restarted) is marked unhealthy and
*stale*, and every sequence placed on it is *lost*: ``decode`` answers an empty selection for
a lost sequence (its row of the step is garbage and must be discarded) instead of failing the
whole batch, and ``take_lost`` hands the lost ids to the caller, which rebuilds them
elsewhere (``worker.scheduler``: re-prefill and replay). A stale replica is connected afresh
before it takes a sequence again (a restarted process has a new pool and segment). Calls that
are safe to repeat (create of a fresh id, release, page reads, retrieval) are retried with
backoff and jitter (``worker.retry``) before a replica is given up; appends and decode steps
change the sequence and are never repeated.

Page ids: each replica numbers the pages of its own pool from 0, so replica A's page 5 and
replica B's page 5 are different pages. The worker's device page cache keys pages by id, so
this client gives each replica a disjoint, dense range of *global* ids: replica ``i`` (in the
order given) owns ``[base[i], base[i] + num_pages[i])`` with ``base`` the running sum of the
pools' sizes; a replica connected afresh gets a new range after the last one, so a page of a
dead incarnation can never be mistaken for a page of the new one in the device cache.
Selections leave with global ids; ``read_pages`` maps them back to (replica, local id).

Decode of a batch sends one RPC per replica per layer (in parallel when the batch spans
several replicas) and returns the selections in the batch's order.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from cache_service import security
from cache_service.types import Selection, SequenceExists, SequenceSpec, UnknownSequence
from worker.kv_client import KVClient
from worker.placement import ranked
from worker.replica_health import HealthMonitor, IncarnationProbe, incarnation
from worker.retry import DEFAULT_BACKOFF, Backoff, retry

log = logging.getLogger(__name__)

T = TypeVar("T")

Connect = Callable[[str], KVClient]
"""Opens a client to one replica (``host:port``); raises ``ConnectionError`` when it cannot."""


@dataclass
class Shard:
    """One replica (one incarnation of it) as this client sees it."""

    address: str
    """``host:port``; also the replica's name in rendezvous hashing."""
    client: KVClient
    num_pages: int
    """Size of the replica's pool (its local page ids are ``0 .. num_pages - 1``)."""
    base: int = 0
    """First global page id of this replica (set by ``ShardedKVClient``)."""
    stale: bool = False
    """The replica failed: its sequences are lost; connect afresh before using it again."""
    identity: str = ""
    """Which process of the replica this client talks to (``replica_health.incarnation``)."""


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
    """Sequences per replica: live now and placed since start; replica failures."""

    live: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    """Times each replica was given up (its sequences lost)."""


class NoHealthyReplica(ConnectionError):
    """Every cache-service replica fails its health checks; no sequence can be placed."""


class ShardedKVClient:
    """``KVClient`` over replicas; see the module docstring for placement, faults, page ids."""

    def __init__(
        self,
        shards: list[Shard],
        health: HealthMonitor | None = None,
        connect: Connect | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        identify: Callable[[str], str] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("give at least one cache-service replica")
        names = [s.address for s in shards]
        if len(set(names)) != len(names):
            raise ValueError(f"a cache-service replica is listed twice: {', '.join(names)}")
        self.page_size = shards[0].client.page_size
        if any(s.client.page_size != self.page_size for s in shards):
            raise ValueError("cache-service replicas disagree on page size; start them alike")
        self._page_template = shards[0].client.read_pages(_NO_PAGES)  # [0, 2, page, dim]
        self.shards: dict[str, Shard] = {}
        self._ranges: list[Shard | None] = []  # by global range, in base order
        self._bases = np.empty(0, dtype=np.int64)
        self._next_base = 0
        for shard in shards:
            self._add_range(shard)
        self.health = health or HealthMonitor(names)
        self.connect_fn = connect
        """Reconnects a stale replica; ``None``: a stale replica is never used again."""
        self.backoff = backoff
        self.identify = identify
        """Asks a replica's incarnation before a placement (``None``: never asked)."""
        self.placement: dict[str, str] = {}
        self.traffic: dict[str, SequenceTraffic] = {}
        self.counts = PlacementCounts()
        self.lost: set[str] = set()
        """Sequences whose replica failed, not yet taken by ``take_lost``."""
        self._last_pages = np.empty(0, dtype=np.int64)
        self._last_seqs: list[str] = []
        self._last_rows = np.empty(0, dtype=np.int64)
        self._pool = ThreadPoolExecutor(len(shards), "shard") if len(shards) > 1 else None

    @classmethod
    def connect(
        cls,
        addresses: list[str],
        health_interval: float = 1.0,
        connect_timeout: float = 30.0,
        auth: security.SecurityConfig | None = None,
        rpc_timeout: float = 60.0,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> ShardedKVClient:
        """Connect to every replica (each must answer within ``connect_timeout`` s).

        ``auth``: the token and TLS settings of the replicas (``None``: none);
        ``rpc_timeout``: deadline of each call to a replica, after which it counts as down.
        """
        from worker.remote_kv import RemoteKVClient

        auth = auth or security.SecurityConfig()

        def open_client(address: str, wait: float = connect_timeout) -> RemoteKVClient:
            return RemoteKVClient.connect(
                address, timeout=rpc_timeout, connect_timeout=wait, auth=auth
            )

        shards: list[Shard] = []
        try:
            for address in addresses:
                client = open_client(address)
                pages = int(client.info.pool.num_pages)
                shards.append(Shard(address, client, pages, identity=incarnation(client.info)))
            health = HealthMonitor(addresses, health_interval, auth=auth)
            probe = IncarnationProbe(auth)
            sharded = cls(shards, health, lambda a: open_client(a, 2.0), backoff, probe)
        except BaseException:
            for shard in shards:
                shard.client.close()  # type: ignore[attr-defined]
            raise
        sharded.health.start()
        return sharded

    # ---- KVClient ------------------------------------------------------------------------
    def create(self, seq_id: str, spec: SequenceSpec) -> None:
        """Place ``seq_id`` on the best healthy replica that answers (rendezvous order)."""
        healthy = self.health.healthy()
        if not healthy:
            raise self._none_healthy()
        for address in ranked(seq_id, healthy):
            shard = self._fresh(address)
            if shard is None:
                continue
            try:
                create = functools.partial(_create, shard.client, seq_id, spec)
                self._retry(create, f"create {seq_id}")
            except ConnectionError as err:
                self._fail(shard, err)
                continue
            self.placement[seq_id] = address
            self.traffic[seq_id] = SequenceTraffic(address)
            self.counts.live[address] += 1
            self.counts.total[address] += 1
            log.debug("placed %s on %s", seq_id, address)
            return
        raise self._none_healthy()

    def append(
        self, seq_id: str, layer: int, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> None:
        """Never repeated: an append that fails on a dead replica loses the sequence."""
        shard = self._shard(seq_id)
        try:
            shard.client.append(seq_id, layer, keys, values, positions)
        except (ConnectionError, UnknownSequence) as err:
            self._fail(shard, err)
            raise ConnectionError(
                f"cache service {shard.address} failed while storing {seq_id}: {err}"
            ) from err

    def decode(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray,
    ) -> list[Selection]:
        """One layer's step for a batch; one RPC per replica, selections in batch order.

        A lost sequence (its replica failed, now or earlier in this step) gets an empty
        selection; see ``take_lost``.
        """
        groups: dict[str, list[int]] = {}
        for row, seq_id in enumerate(seq_ids):
            if seq_id not in self.lost:
                groups.setdefault(self._shard(seq_id).address, []).append(row)

        def call(address: str, rows: list[int]) -> list[Selection] | Exception:
            shard = self.shards[address]
            ids = [seq_ids[r] for r in rows]
            try:
                sels = shard.client.decode(
                    layer, ids, keys[rows], values[rows], positions[rows], queries[rows]
                )
            except (ConnectionError, UnknownSequence) as err:
                return err
            return [s._replace(pages=s.pages + shard.base) for s in sels]

        if self._pool is None or len(groups) <= 1:
            answers = [call(a, rows) for a, rows in groups.items()]
        else:
            answers = list(self._pool.map(call, groups.keys(), groups.values()))
        empty = _empty_selection(keys.shape[1])
        out = [empty] * len(seq_ids)
        for (address, rows), sels in zip(groups.items(), answers, strict=True):
            if isinstance(sels, Exception):
                self._fail(self.shards[address], sels)
                continue
            for row, sel in zip(rows, sels, strict=True):
                out[row] = sel
        self._remember(seq_ids, out)
        return out

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        """Global ids ``[n]`` -> page data ``[n, 2, page_size, head_dim]``, from each owner.

        Pages of a failed replica read as zeros: only lost sequences (whose step is discarded)
        can name them.
        """
        pages = np.asarray(pages, dtype=np.int64)
        self._count_reads(pages)
        which = np.searchsorted(self._bases, pages, side="right") - 1
        parts: list[tuple[np.ndarray, np.ndarray | None]] = []
        for index in np.unique(which):
            shard = self._ranges[int(index)]
            rows = np.flatnonzero(which == index)
            data = None
            if shard is not None and not shard.stale:
                wanted = None if versions is None else versions[rows]
                data = self._read(shard, pages[rows] - shard.base, wanted)
            parts.append((rows, data))
        template = self._page_template
        out = np.zeros((pages.size, *template.shape[1:]), dtype=template.dtype)
        for rows, data in parts:
            if data is not None:
                out[rows] = data
        return out

    def release(self, seq_id: str) -> None:
        """Release on the replica; a lost sequence (or a replica that fails) is just dropped."""
        shard = self._shard(seq_id)
        try:
            if seq_id not in self.lost and not shard.stale:
                self._retry(lambda: _release(shard.client, seq_id), f"release {seq_id}")
        except ConnectionError as err:
            log.warning("could not release %s on %s: %s", seq_id, shard.address, err)
        finally:
            self.forget(seq_id)

    # ---- faults --------------------------------------------------------------------------
    def take_lost(self) -> set[str]:
        """The sequences lost since the last call (they stay placed until released)."""
        lost, self.lost = self.lost, set()
        return lost

    def forget(self, seq_id: str) -> None:
        """Drop what this client records about ``seq_id`` (no call to its replica)."""
        address = self.placement.pop(seq_id)
        self.traffic.pop(seq_id, None)
        self.lost.discard(seq_id)
        self.counts.live[address] -= 1

    # ---- extras --------------------------------------------------------------------------
    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        """Retrieval only (nothing stored): queries ``[q_heads, head_dim]`` -> its pages.

        Needs replicas whose client has ``retrieve`` (``RemoteKVClient``); thread-safe."""
        shard = self._shard(seq_id)
        client: Any = shard.client  # a RemoteKVClient

        def call() -> Selection:
            sel: Selection = client.retrieve(seq_id, layer, queries)
            return sel

        sel = self._retry(call, f"retrieve {seq_id}")
        return sel._replace(pages=sel.pages + shard.base)

    def replica_of(self, seq_id: str) -> str:
        """The replica holding ``seq_id``."""
        return self._shard(seq_id).address

    def close(self) -> None:
        """Stop health checks and close every replica's client."""
        self.health.stop()
        if self._pool is not None:
            self._pool.shutdown()
        for shard in self.shards.values():
            _close(shard.client)
        close = getattr(self.identify, "close", None)
        if close is not None:
            close()

    # ---- helpers -------------------------------------------------------------------------
    def _shard(self, seq_id: str) -> Shard:
        address = self.placement.get(seq_id)
        if address is None:
            raise UnknownSequence(seq_id)
        return self.shards[address]

    def _add_range(self, shard: Shard) -> None:
        shard.base, self._next_base = self._next_base, self._next_base + shard.num_pages
        self.shards[shard.address] = shard
        self._ranges.append(shard)
        self._bases = np.append(self._bases, shard.base)

    def _fail(self, shard: Shard, err: BaseException) -> None:
        """Give a replica up: unhealthy, stale, every sequence on it lost."""
        if not shard.stale:
            lost = [s for s, a in self.placement.items() if a == shard.address]
            log.warning(
                "cache service %s failed (%s); %d sequence(s) on it lost",
                shard.address, err, len(lost),
                extra={"replica": shard.address, "lost": len(lost)},
            )  # fmt: skip
            shard.stale = True
            self.counts.failures[shard.address] += 1
            self.lost.update(lost)
        self.health.mark(shard.address, False)

    def _fresh(self, address: str) -> Shard | None:
        """The replica ready for a new sequence: connected afresh if it was stale."""
        shard = self.shards[address]
        if not shard.stale and self.identify is not None:
            try:
                now = self.identify(address)
            except ConnectionError as err:
                self._fail(shard, err)
                return None
            if now != shard.identity:  # it restarted between two health polls
                self._fail(shard, ConnectionError(f"{address} restarted (now {now})"))
        if not shard.stale:
            return shard
        if self.connect_fn is None or any(a == address for a in self.placement.values()):
            return None  # lost sequences not yet rebuilt still name the old incarnation
        try:
            client = self.connect_fn(address)
        except (ConnectionError, OSError) as err:
            log.info("cache service %s is still down: %s", address, err)
            self.health.mark(address, False)
            return None
        if client.page_size != self.page_size:
            _close(client)
            log.error("cache service %s came back with page size %d", address, client.page_size)
            return None
        num_pages = int(client.info.pool.num_pages)  # type: ignore[attr-defined]
        index = self._ranges.index(shard)
        self._ranges[index] = None  # the dead incarnation's pages
        _close(shard.client)
        identity = incarnation(client.info)  # type: ignore[attr-defined]
        fresh = Shard(address, client, num_pages, identity=identity)
        self._add_range(fresh)
        log.info("reconnected to cache service %s (pages from %d)", address, fresh.base)
        return fresh

    def _retry(self, call: Callable[[], T], what: str) -> T:
        return retry(call, self.backoff, (ConnectionError,), what)

    def _read(
        self, shard: Shard, local: np.ndarray, versions: np.ndarray | None
    ) -> np.ndarray | None:
        assert local.max(initial=0) < shard.num_pages, "page id beyond its replica's pool"
        try:
            data = self._retry(lambda: shard.client.read_pages(local, versions), "read pages")
        except ConnectionError as err:
            self._fail(shard, err)
            return None
        return data

    def _none_healthy(self) -> NoHealthyReplica:
        return NoHealthyReplica(
            f"none of the cache-service replicas {', '.join(self.shards)} is healthy; "
            "check them (grpc.health.v1) or the --cache-service list"
        )

    def _remember(self, seq_ids: list[str], selections: list[Selection]) -> None:
        """Count selected pages and keep which sequence owns each, for ``read_pages``."""
        for seq_id, sel in zip(seq_ids, selections, strict=True):
            if seq_id in self.traffic:
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


_NO_PAGES = np.empty(0, dtype=np.int64)


def _empty_selection(kv_heads: int) -> Selection:
    """No pages for any KV head (the row of a lost sequence)."""
    return Selection(np.zeros(kv_heads + 1, np.int64), _NO_PAGES, _NO_PAGES, _NO_PAGES)


def _create(client: KVClient, seq_id: str, spec: SequenceSpec) -> None:
    """Create; a repeat after a lost answer finds the sequence made by the first try."""
    try:
        client.create(seq_id, spec)
    except SequenceExists:
        log.info("%s already exists after a retried create; using it", seq_id)


def _release(client: KVClient, seq_id: str) -> None:
    with contextlib.suppress(UnknownSequence):  # a retried release whose first try went through
        client.release(seq_id)


def _close(client: KVClient) -> None:
    close = getattr(client, "close", None)
    if close is not None:
        close()
