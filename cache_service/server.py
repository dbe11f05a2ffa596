"""Starting and stopping a cache service: pool, store, gRPC server, local streams, health,
reflection, metrics.

Shared-memory segments are named ``icecache_<port>_<pid>_<random>``. A replica that starts on
a port first unlinks the segments of that port whose owner process is dead: what a SIGKILLed
predecessor (and its resource tracker) could not clean up is reclaimed on restart.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cache_service import channel_options, compiled, host, security
from cache_service.config import CacheServiceConfig
from cache_service.decode_steps import DecodeSteps
from cache_service.leases import LeaseTable
from cache_service.local_stream import LocalStreams
from cache_service.metrics import ServiceMetrics
from cache_service.page_pool import PagePool
from cache_service.reaper import LeaseReaper
from cache_service.refusals import pool_limit
from cache_service.servicer import SERVICE_NAME, CacheServicer
from cache_service.store import Store
from cache_service.stream_slots import StreamSlots
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "icecache"
SHM_DIR = Path("/dev/shm")


@dataclass
class CacheServer:
    """A running cache service and what it owns: the gRPC server, the pool, the metrics."""

    server: grpc.Server
    port: int
    """The bound gRPC port."""
    store: Store
    metrics: ServiceMetrics
    health: health.HealthServicer
    local: LocalStreams | None = None
    """Same-host decode streams (``None``: not offered)."""
    reaper: LeaseReaper | None = None
    """Releases what dead workers held."""

    def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs and streams, let in-flight ones finish for ``grace`` s (open
        streams until they close or the grace ends), free the segment."""
        self.health.enter_graceful_shutdown()
        if self.reaper is not None:
            self.reaper.stop()
        stopped = self.server.stop(grace)
        if self.local is not None:
            self.local.stop(grace)
        stopped.wait()
        self.metrics.close()
        self.store.pool.close()
        log.info("stopped", extra={"port": self.port})


def segment_name(port: int) -> str:
    """A fresh, recognisable shared-memory name: ``icecache_<port>_<pid>_<random>``."""
    return f"{SEGMENT_PREFIX}_{port}_{os.getpid()}_{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def reclaim_stale_segments(port: int, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the segments of ``port`` whose owner is dead (or is this process, which has
    created none yet); returns their names. Others' live segments are never touched."""
    pattern = re.compile(rf"{SEGMENT_PREFIX}_{port}_(\d+)_[0-9a-f]+")
    reclaimed = []
    for path in sorted(shm_dir.glob(f"{SEGMENT_PREFIX}_{port}_*")):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        path.unlink(missing_ok=True)
        reclaimed.append(path.name)
        log.warning(
            "reclaimed shared memory %s of dead process %d",
            path.name,
            pid,
            extra={"segment": path.name, "owner_pid": pid},
        )
    return reclaimed


def make_store(config: CacheServiceConfig, port: int) -> Store:
    """An empty store whose pool holds ``config.max_memory`` bytes of pages."""
    name = None
    if config.shared_memory:
        reclaim_stale_segments(port)
        name = segment_name(port)
    pool = PagePool(
        config.num_pages,
        config.page_size,
        config.head_dim,
        config.dtype,
        shared=config.shared_memory,
        shm_name=name,
    )
    return Store(pool, max_sequences=config.max_sequences or None, prefix_cache=config.prefix_cache)


def serve(config: CacheServiceConfig) -> CacheServer:
    """Start a cache service as ``config`` says; it runs until ``stop``. The index's compiled
    loops are loaded (compiled, if no cache holds them) before it listens, so that no
    request waits for them."""
    compiled.warm_up()
    server = grpc.server(
        # an open DecodeStream holds its thread: room for every stream besides the workers
        futures.ThreadPoolExecutor(
            max_workers=config.workers + config.max_streams, thread_name_prefix="rpc"
        ),
        interceptors=security.server_interceptors(config.security),
        options=channel_options.CHANNEL_OPTIONS,
    )
    try:
        port = security.add_port(server, f"{config.host}:{config.port}", config.security)
    except BaseException:
        server.stop(None)
        raise
    store = make_store(config, port)
    try:
        return _start(config, server, port, store)
    except BaseException:
        server.stop(None)
        store.pool.close()
        raise


def _start(config: CacheServiceConfig, server: grpc.Server, port: int, store: Store) -> CacheServer:
    metrics = ServiceMetrics(store)
    leases = LeaseTable(config.lease_ttl_s, config.lease_grace_s)
    metrics.track_leases(leases.live)
    slots = StreamSlots(config.max_streams, metrics.open_streams)
    local = _local_streams(config, store, slots, metrics, leases)
    try:
        host_id = host.host_identity()
        servicer = CacheServicer(store, metrics, host_id, config.max_memory, slots, local, leases)
        pb_grpc.add_CacheServiceServicer_to_server(servicer, server)
        checker = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        server.start()
    except BaseException:
        if local is not None:
            local.stop(0)
        raise
    reaper = LeaseReaper(leases, store, metrics).start()
    for name in ("", SERVICE_NAME):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.metrics_port:
        metrics.serve_http(config.metrics_port, config.host.strip("[]"))
    pool = store.pool
    log.info(
        "serving on %s:%d",
        config.host,
        port,
        extra={
            "port": port,
            "segment": pool.shm_name,
            "pages": pool.num_pages,
            "page_size": pool.page_size,
            "head_dim": pool.head_dim,
            "dtype": pool.dtype,
            "auth": bool(config.security.token),
            "tls": config.security.server_tls,
            "max_sequences": config.max_sequences,
            "local_streams": local.name if local else None,
            "lease_ttl_s": config.lease_ttl_s,
            "lease_grace_s": config.lease_grace_s,
        },
    )
    return CacheServer(server, port, store, metrics, checker, local, reaper)


def _local_streams(
    config: CacheServiceConfig,
    store: Store,
    slots: StreamSlots,
    metrics: ServiceMetrics,
    leases: LeaseTable,
) -> LocalStreams | None:
    """Local streams on the abstract socket ``<segment>.decode``, answered like ``Decode``;
    ``None`` when not configured or without a shared segment, and (logged) where it cannot
    bind."""
    if not (config.local_streams and store.pool.shm_name):
        return None
    steps = DecodeSteps(store, metrics, pool_limit(store.pool, config.max_memory), leases)
    name = store.pool.shm_name + ".decode"
    try:
        return LocalStreams(name, slots, steps.answer_frame, metrics.observe)
    except OSError as err:  # e.g. no abstract Unix sockets on this OS
        log.warning("cannot offer local decode streams (%s); clients use DecodeStream", err)
        return None
