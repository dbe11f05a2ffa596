"""A ``KVClient`` over several cache-service replicas, with failover.

Placement (``worker.kv.routing``): ``create`` puts a sequence on the first replica of its
rendezvous order among the healthy ones that answers (``worker.placement.bounded``: by its
prompt blocks' key, so that equal prompts meet where their blocks are kept, with bounded
load), and every later call for that sequence goes to the same replica. A replica that fails
its health checks (``worker.kv.health``) takes no new sequences.

Failures: a replica that stops answering (``ConnectionError``: UNAVAILABLE, DEADLINE_EXCEEDED)
or that no longer knows a sequence it was given (it restarted) is given up at once: marked
unhealthy and *stale*, and every sequence placed on it is *lost*. ``decode`` answers an empty
selection for a lost sequence (its row of the step is garbage and must be discarded) instead
of failing the whole batch, and ``take_lost`` hands the lost ids to the caller, which rebuilds
them elsewhere (``worker.scheduler``: re-prefill and replay). A stale replica is connected
afresh (``Connect``) before it takes a sequence again: a restarted process has a new pool and
segment, whose pages get a new range of global ids (``worker.kv.page_ranges``).

Retries: this client repeats no call. Each replica's channel repeats the calls that change
nothing (gRPC's retry policy, ``cache_service.channel_options``); any call that still fails with
``ConnectionError`` gives its replica up, and ``create`` goes on to the next replica of the
sequence's rendezvous order (failover, not a repeat). ``Create``, ``Append``, ``Decode`` and
``Release`` are never repeated; a failed release is logged (its KV dies with the replica).

Decode of a batch sends one RPC per replica per layer (in parallel when the batch spans
several replicas) and returns the selections in the batch's order, with global page ids;
``read_pages`` maps them back to (replica, local id). Pages selected and read are counted per
sequence (``worker.kv.traffic``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from cache_service import security
from cache_service.types import (
    AdoptionRefused,
    PrefixKeys,
    Selection,
    SequenceSpec,
    UnknownSequence,
)
from worker.kv.health import HealthMonitor
from worker.kv.page_ranges import PageRanges
from worker.kv.routing import Routes
from worker.kv.traffic import TrafficCounter
from worker.kv_client import KVClient, ReplicaState, Traffic
from worker.placement import bounded, placement_key

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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
    """Which process of the replica this client talks to (``health.incarnation``)."""


Connect = Callable[[str], Shard]
"""Opens one replica (``host:port``) afresh as a shard; raises ``ConnectionError`` (or
``OSError``) when it cannot, ``ValueError`` when it answers but does not fit."""


class NoHealthyReplica(ConnectionError):
    """Every cache-service replica fails its health checks; no sequence can be placed."""


class ShardedKVClient(KVClient):
    """``KVClient`` over replicas; see the module docstring for placement, faults, page ids."""

    def __init__(
        self,
        shards: list[Shard],
        health: HealthMonitor | None = None,
        connect: Connect | None = None,
        identify: Callable[[str], str] | None = None,
        load: Callable[[str], int] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("give at least one cache-service replica")
        names = [s.address for s in shards]
        if len(set(names)) != len(names):
            raise ValueError(f"a cache-service replica is listed twice: {', '.join(names)}")
        self.page_size = shards[0].client.page_size
        if any(s.client.page_size != self.page_size for s in shards):
            raise ValueError("cache-service replicas disagree on page size; start them alike")
        self.dtype = shards[0].client.dtype
        if any(s.client.dtype != self.dtype for s in shards):
            raise ValueError("cache-service replicas disagree on --dtype; start them alike")
        self._page_template = shards[0].client.read_pages(_NO_PAGES)  # [0, 2, page, dim]
        self.shards: dict[str, Shard] = {}
        self.pages: PageRanges[Shard] = PageRanges()
        for shard in shards:
            self._add(shard)
        self.health = health or HealthMonitor(names)
        self.connect_fn = connect
        """Reconnects a stale replica; ``None``: a stale replica is never used again."""
        self.identify = identify
        """Asks a replica's incarnation before a placement (``None``: never asked)."""
        self.load = load
        """Asks a replica how many sequences it holds, every worker's (``None``: the bounded
        load counts only this client's placements)."""
        self.routes = Routes()
        self.traffic = TrafficCounter()
        self.lost: set[str] = set()
        """Sequences whose replica failed, not yet taken by ``take_lost``."""
        self._pool = ThreadPoolExecutor(len(shards), "shard") if len(shards) > 1 else None

    @classmethod
    def connect(
        cls,
        addresses: list[str],
        health_interval: float = 1.0,
        connect_timeout: float = 30.0,
        auth: security.SecurityConfig | None = None,
        rpc_timeout: float = 60.0,
        head_dim: int | None = None,
        holder: str | None = None,
        lease_renew_s: float = 2.0,
    ) -> ShardedKVClient:
        """Connect to every replica over gRPC (``worker.kv.replicas.connect_replicas``)."""
        from worker.kv.replicas import connect_replicas

        return connect_replicas(
            addresses, health_interval, connect_timeout, auth, rpc_timeout, head_dim,
            holder, lease_renew_s,
        )  # fmt: skip

    # ---- data path -----------------------------------------------------------------------
    def create(self, seq_id: str, spec: SequenceSpec, prefix: PrefixKeys | None = None) -> int:
        """Place ``seq_id`` on the best healthy replica that answers: rendezvous order of its
        placement key (its prompt blocks', so that equal prompts meet where their blocks are
        kept), with bounded load (``worker.placement``)."""
        healthy = self.health.healthy()
        if not healthy:
            raise self._none_healthy()
        key = placement_key(seq_id, prefix)
        for address in bounded(key, healthy, self._loads(healthy)):
            shard = self._fresh(address)
            if shard is None:
                continue
            try:
                reused = shard.client.create(seq_id, spec, prefix)
            except ConnectionError as err:
                self._fail(shard, err)
                continue
            self.routes.place(seq_id, address)
            self.traffic.track(seq_id)
            log.debug("placed %s on %s (%d tokens reused)", seq_id, address, reused)
            return reused
        raise self._none_healthy()

    def _loads(self, healthy: set[str]) -> dict[str, int]:
        """Sequences on each healthy replica: as it counts them (other workers' too), at
        least this client's own; a replica that does not answer counts only this client's
        (the placement that follows finds out whether it is alive)."""
        own = self.routes.counts.live
        loads = {address: own[address] for address in healthy}
        if self.load is not None and len(healthy) > 1:  # one replica: nothing to weigh
            for address in healthy:
                try:
                    loads[address] = max(loads[address], self.load(address))
                except ConnectionError as err:
                    log.debug("no load from %s: %s", address, err)
        return loads

    def share_prefix(self, seq_id: str, prefix: PrefixKeys) -> int:
        shard = self._shard(seq_id)
        try:
            return shard.client.share_prefix(seq_id, prefix)
        except (ConnectionError, UnknownSequence) as err:
            self._fail(shard, err)
            raise ConnectionError(
                f"cache service {shard.address} failed while sharing {seq_id}'s prefix: {err}"
            ) from err

    def positional_pages(self, seq_id: str, layer: int) -> np.ndarray:
        """Global ids ``[kv_heads, n]`` of one layer's pages in position order."""
        shard = self._shard(seq_id)
        try:
            return shard.client.positional_pages(seq_id, layer) + shard.base
        except (ConnectionError, UnknownSequence) as err:
            self._fail(shard, err)
            raise ConnectionError(
                f"cache service {shard.address} failed while reading {seq_id}'s prefix: {err}"
            ) from err

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

        def step(shard: Shard, ids: list[str], rows: list[int]) -> list[Selection]:
            sels = shard.client.decode(
                layer, ids, keys[rows], values[rows], positions[rows], queries[rows]
            )
            return [s._replace(pages=s.pages + shard.base) for s in sels]

        empty = _empty_selection(keys.shape[1])
        out = [empty] * len(seq_ids)
        for rows, sels in self._per_replica(seq_ids, step):
            for row, sel in zip(rows, sels, strict=True):
                out[row] = sel
        self.traffic.selected(seq_ids, out)
        return out

    def append_step(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        """``decode`` that stores and selects nothing; a lost sequence is skipped."""

        def step(shard: Shard, ids: list[str], rows: list[int]) -> None:
            shard.client.append_step(layer, ids, keys[rows], values[rows], positions[rows])

        self._per_replica(seq_ids, step)

    def _per_replica(
        self, seq_ids: list[str], step: Callable[[Shard, list[str], list[int]], _T]
    ) -> list[tuple[list[int], _T]]:
        """``step(shard, ids, rows)`` once per replica holding some of ``seq_ids`` (lost ones
        left out; in parallel where there are several): (rows, answer) of each that answered.
        A replica that fails is marked failed, its sequences lost (see ``take_lost``)."""
        groups: dict[str, list[int]] = {}
        for row, seq_id in enumerate(seq_ids):
            if seq_id not in self.lost:
                groups.setdefault(self._shard(seq_id).address, []).append(row)

        def call(address: str, rows: list[int]) -> _T | Exception:
            try:
                return step(self.shards[address], [seq_ids[r] for r in rows], rows)
            except (ConnectionError, UnknownSequence) as err:
                return err

        if self._pool is None or len(groups) <= 1:
            answers = [call(a, rows) for a, rows in groups.items()]
        else:
            answers = list(self._pool.map(call, groups.keys(), groups.values()))
        out = []
        for (address, rows), answer in zip(groups.items(), answers, strict=True):
            if isinstance(answer, Exception):
                self._fail(self.shards[address], answer)
            else:
                out.append((rows, answer))
        return out

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        """Global ids ``[n]`` -> page data ``[n, 2, page_size, head_dim]``, from each owner.

        Pages of a failed replica read as zeros: only lost sequences (whose step is discarded)
        can name them.
        """
        pages = np.asarray(pages, dtype=np.int64)
        self.traffic.read(pages)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for shard, rows, local in self.pages.split(pages):
            if shard is None or shard.stale:
                continue
            wanted = None if versions is None else versions[rows]
            try:
                parts.append((rows, shard.client.read_pages(local, wanted)))
            except ConnectionError as err:
                self._fail(shard, err)
        template = self._page_template
        out = np.zeros((pages.size, *template.shape[1:]), dtype=template.dtype)
        for rows, data in parts:
            out[rows] = data
        return out

    def release(self, seq_id: str) -> None:
        """Release on the replica; a lost sequence (or a replica that fails) is just dropped."""
        shard = self._shard(seq_id)
        try:
            if seq_id not in self.lost and not shard.stale:
                shard.client.release(seq_id)
        except UnknownSequence:
            log.info(
                "%s is unknown to %s (it restarted): nothing to release", seq_id, shard.address
            )
        except ConnectionError as err:
            log.warning("could not release %s on %s: %s", seq_id, shard.address, err)
        finally:
            self.forget(seq_id)

    # ---- serving path --------------------------------------------------------------------
    def replica_of(self, seq_id: str) -> str:
        """The replica holding ``seq_id``."""
        return self.routes.replica(seq_id)

    def holder_epoch(self, seq_id: str) -> int:
        return self._shard(seq_id).client.holder_epoch(seq_id)

    def adopt(self, seq_id: str, replica: str, epoch: int, length: int, spec: SequenceSpec) -> int:
        """Take ``seq_id`` over on ``replica`` (one of this client's, healthy) and route it
        there; ``AdoptionRefused`` when it cannot be, ``AdoptionConflict`` (from the replica)
        when another worker took it first."""
        if replica not in self.shards or replica not in self.health.healthy():
            raise AdoptionRefused(f"{replica} is not a healthy cache service of this worker")
        shard = self._fresh(replica)
        if shard is None:
            raise AdoptionRefused(f"cache service {replica} is not reachable now")
        try:
            ahead = shard.client.adopt(seq_id, replica, epoch, length, spec)
        except ConnectionError as err:
            self._fail(shard, err)
            raise AdoptionRefused(f"cache service {replica} failed: {err}") from err
        self.routes.place(seq_id, replica)
        self.traffic.track(seq_id)
        return ahead

    def take_lost(self) -> set[str]:
        """The sequences lost since the last call (they stay placed until released)."""
        lost, self.lost = self.lost, set()
        return lost

    def take_traffic(self, seq_id: str) -> Traffic:
        return self.traffic.take(seq_id)

    def replicas(self) -> list[ReplicaState]:
        healthy = self.health.healthy()
        counts = self.routes.counts
        return [ReplicaState(a, a in healthy, counts.live[a], counts.total[a]) for a in self.shards]

    def watch_readiness(self, on_change: Callable[[bool], None]) -> None:
        """``on_change(ready)`` now and from the health monitor whenever a replica's health
        changes; ready: some replica is healthy."""
        self.health.on_change = lambda healthy: on_change(bool(healthy))
        on_change(bool(self.health.healthy()))

    def close(self) -> None:
        """Stop health checks and close every replica's client."""
        self.health.stop()
        if self._pool is not None:
            self._pool.shutdown()
        for shard in self.shards.values():
            shard.client.close()
        for probe in (self.identify, self.load):
            close = getattr(probe, "close", None)
            if close is not None:
                close()

    # ---- extras --------------------------------------------------------------------------
    def forget(self, seq_id: str) -> None:
        """Drop what this client records about ``seq_id`` (no call to its replica)."""
        self.routes.forget(seq_id)
        self.traffic.take(seq_id)
        self.lost.discard(seq_id)

    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        """Retrieval only (nothing stored): queries ``[q_heads, head_dim]`` -> its pages.

        Needs replicas whose client has ``retrieve`` (``RemoteKVClient``); thread-safe."""
        shard = self._shard(seq_id)
        client: Any = shard.client  # a RemoteKVClient
        sel: Selection = client.retrieve(seq_id, layer, queries)
        return sel._replace(pages=sel.pages + shard.base)

    # ---- failover ------------------------------------------------------------------------
    def _shard(self, seq_id: str) -> Shard:
        return self.shards[self.routes.replica(seq_id)]

    def _add(self, shard: Shard) -> None:
        shard.base = self.pages.add(shard, shard.num_pages)
        self.shards[shard.address] = shard

    def _fail(self, shard: Shard, err: BaseException) -> None:
        """Give a replica up: unhealthy, stale, every sequence on it lost."""
        if not shard.stale:
            lost = self.routes.on(shard.address)
            log.warning(
                "cache service %s failed (%s); %d sequence(s) on it lost",
                shard.address, err, len(lost),
                extra={"replica": shard.address, "lost": len(lost)},
            )  # fmt: skip
            shard.stale = True
            self.routes.counts.failures[shard.address] += 1
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
        if self.connect_fn is None or self.routes.on(address):
            return None  # lost sequences not yet rebuilt still name the old incarnation
        try:
            fresh = self.connect_fn(address)
        except (ConnectionError, OSError) as err:
            log.info("cache service %s is still down: %s", address, err)
            self.health.mark(address, False)
            return None
        except ValueError as err:
            log.error("cache service %s came back unfit: %s", address, err)
            return None
        if fresh.client.page_size != self.page_size:
            fresh.client.close()
            log.error(
                "cache service %s came back with page size %d", address, fresh.client.page_size
            )
            return None
        self.pages.retire(shard)  # the dead incarnation's pages
        shard.client.close()
        self._add(fresh)
        log.info("reconnected to cache service %s (pages from %d)", address, fresh.base)
        return fresh

    def _none_healthy(self) -> NoHealthyReplica:
        return NoHealthyReplica(
            f"none of the cache-service replicas {', '.join(self.shards)} is healthy; "
            "check them (grpc.health.v1) or the --cache-service list"
        )


_NO_PAGES = np.empty(0, dtype=np.int64)


def _empty_selection(kv_heads: int) -> Selection:
    """No pages for any KV head (the row of a lost sequence)."""
    return Selection(np.zeros(kv_heads + 1, np.int64), _NO_PAGES, _NO_PAGES, _NO_PAGES)
