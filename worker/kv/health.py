"""Health of the cache-service replicas, as the worker sees it: ``grpc.health.v1`` polls.

A replica is healthy after a ``SERVING`` answer and unhealthy after any other answer or an
error; all start healthy (they answered ``Info`` on connect). The worker also marks a replica
unhealthy at once when a call to it fails for good (``mark``), without waiting for a poll.
Before a placement the worker also asks a replica directly: which incarnation answers
(``IncarnationProbe``) and how many sequences it holds (``LoadProbe``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache_service import security

log = logging.getLogger(__name__)


class HealthMonitor:
    """Polls ``grpc.health.v1`` on each replica every ``interval`` s on a daemon thread.

    ``auth`` gives the channels TLS when the replicas use it (health needs no token).
    """

    def __init__(
        self,
        addresses: Iterable[str],
        interval: float = 1.0,
        timeout: float = 1.0,
        on_change: Callable[[set[str]], None] | None = None,
        auth: security.SecurityConfig | None = None,
    ) -> None:
        self.addresses = list(addresses)
        self.interval = interval
        self.timeout = timeout
        self.on_change = on_change
        self.auth = auth or security.SecurityConfig()
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
        channels = {a: security.make_channel(a, self.auth) for a in self.addresses}
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


class _ReplicaQuestion:
    """One unary call to any replica, over a channel per replica kept open between calls."""

    method = ""

    def __init__(self, auth: security.SecurityConfig | None = None, timeout: float = 5.0) -> None:
        self.auth = auth or security.SecurityConfig()
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}

    def _ask(self, address: str, request: object) -> Any:
        from proto.icecache.v1 import cache_service_pb2_grpc as cs_grpc

        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = security.make_channel(address, self.auth)
        call = getattr(cs_grpc.CacheServiceStub(channel), self.method)
        try:
            return call(request, timeout=self.timeout)
        except grpc.RpcError as err:
            code = err.code().name
            raise ConnectionError(
                f"cache service {address} did not answer {self.method} ({code})"
            ) from None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


class IncarnationProbe(_ReplicaQuestion):
    """Asks a replica which incarnation of its process answers (``Info``: its shared-memory
    segment, pool size and host), so that a replica that restarted between two health polls
    is still noticed before a new sequence is placed on it."""

    method = "Info"

    def __call__(self, address: str) -> str:
        from proto.icecache.v1 import cache_service_pb2 as cs_pb

        return incarnation(self._ask(address, cs_pb.InfoRequest()))


class LoadProbe(_ReplicaQuestion):
    """Asks a replica how many sequences it holds (``Stats``, lock-free there): every
    worker's, where a worker's own count knows only its own placements."""

    method = "Stats"

    def __call__(self, address: str) -> int:
        from proto.icecache.v1 import cache_service_pb2 as cs_pb

        return int(self._ask(address, cs_pb.StatsRequest()).sequences)


def incarnation(info: object) -> str:
    """The identity of one replica process from its ``InfoResponse``."""
    segment = getattr(info, "segment", None)
    pool = getattr(info, "pool", None)
    name = getattr(segment, "name", "")
    return f"{name}|{getattr(pool, 'num_pages', 0)}|{getattr(info, 'host_id', '')}"
