"""Starting and stopping a cache service: pool, store, gRPC server, health, reflection, metrics."""

from __future__ import annotations

import logging
import os
import secrets
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cache_service import codec
from cache_service.config import CacheServiceConfig
from cache_service.metrics import ServiceMetrics
from cache_service.page_pool import PagePool
from cache_service.servicer import SERVICE_NAME, CacheServicer
from cache_service.store import Store
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass
class CacheServer:
    """A running cache service and what it owns: the gRPC server, the pool, the metrics."""

    server: grpc.Server
    port: int
    """The bound gRPC port."""
    store: Store
    metrics: ServiceMetrics
    health: health.HealthServicer

    def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish for ``grace`` s, free the segment."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.metrics.close()
        self.store.pool.close()
        log.info("stopped", extra={"port": self.port})

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()


def segment_name() -> str:
    """A fresh, recognisable shared-memory name (``ls /dev/shm`` shows whose it is)."""
    return f"icecache_{os.getpid()}_{secrets.token_hex(4)}"


def make_store(config: CacheServiceConfig) -> Store:
    """An empty store whose pool holds ``config.max_memory`` bytes of pages."""
    pool = PagePool(
        config.num_pages,
        config.page_size,
        config.head_dim,
        config.dtype,
        shared=config.shared_memory,
        shm_name=segment_name() if config.shared_memory else None,
    )
    return Store(pool)


def serve(config: CacheServiceConfig) -> CacheServer:
    """Start a cache service as ``config`` says; it runs until ``stop``."""
    store = make_store(config)
    try:
        return _start(config, store)
    except BaseException:
        store.pool.close()
        raise


def _start(config: CacheServiceConfig, store: Store) -> CacheServer:
    metrics = ServiceMetrics(store)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
        options=codec.CHANNEL_OPTIONS,
    )
    pb_grpc.add_CacheServiceServicer_to_server(
        CacheServicer(store, metrics, codec.host_identity()), server
    )
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}; is the port taken?")
    server.start()
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
        },
    )
    return CacheServer(server, port, store, metrics, checker)
