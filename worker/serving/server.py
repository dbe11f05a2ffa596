"""``serve()``: a worker's engine, scheduler, servicer, health and metrics, wired and
started; ``WorkerServer.stop`` drains them.

The engine's KV store is a ``ShardedKVClient`` over the cache-service replicas, seen here only
through the ``KVClient`` contract (``watch_readiness``).
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cache_service import security
from proto.icecache.v1 import worker_pb2 as pb
from proto.icecache.v1 import worker_pb2_grpc as pb_grpc
from worker.engine import Engine
from worker.factory import build_engine, load
from worker.kv.sharded import ShardedKVClient
from worker.kv_client import KVClient
from worker.model import LlamaModel
from worker.scheduler import Scheduler, SchedulerConfig
from worker.serving.config import WorkerConfig
from worker.serving.generation import Generations
from worker.serving.metrics import WorkerMetrics
from worker.serving.servicer import WorkerServicer
from worker.tokenizer import Tokenizer

if TYPE_CHECKING:
    from worker.serving.http_server import HttpServer

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name


@dataclass
class WorkerServer:
    """A running worker and what it owns."""

    server: grpc.Server
    port: int
    scheduler: Scheduler
    metrics: WorkerMetrics
    health: health.HealthServicer
    servicer: WorkerServicer
    owned: list[KVClient] = field(default_factory=list)
    """Closed on stop (the KV client when ``serve`` opened it)."""
    http: HttpServer | None = None
    """The OpenAI-compatible HTTP API (``--http-port``), if on."""

    def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new calls (UNAVAILABLE) and report NOT_SERVING at once, give the
        in-flight ones (decoding or waiting) up to ``grace`` s to finish, then stop the loop
        (what is left fails with UNAVAILABLE) and close the clients."""
        calls = self.servicer.generations
        calls.draining.set()
        self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + (grace or 0.0)
        if calls.inflight:
            log.info("draining %d in-flight request(s), up to %g s", calls.inflight, grace or 0.0)
        while calls.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        if calls.inflight:
            log.warning("%d request(s) still running after the grace period; stopping them",
                        calls.inflight)  # fmt: skip
        self.scheduler.stop()
        self.server.stop(max(0.5, deadline - time.monotonic())).wait()
        if self.http is not None:
            self.http.stop()
        self.metrics.close()
        for thing in self.owned:
            thing.close()
        log.info("stopped", extra={"port": self.port})


def open_replicas(config: WorkerConfig, model: LlamaModel, holder: str | None = None) -> KVClient:
    """The cache-service replicas of ``config`` as one client, with a lease on each in the
    name ``holder`` (``None``: a fresh ``instance_id``)."""
    return ShardedKVClient.connect(
        list(config.cache_services),
        config.health_interval_s,
        auth=config.security,
        rpc_timeout=config.rpc_timeout_s,
        head_dim=model.config.head_dim,
        holder=holder or instance_id(),
        lease_renew_s=config.lease_renew_s,
    )


def serve(
    config: WorkerConfig,
    loaded: tuple[LlamaModel, Tokenizer] | None = None,
    kv: KVClient | None = None,
) -> WorkerServer:
    """Load the model, connect the replicas, start the batching loop and the gRPC server."""
    name = instance_id()  # names its sequences and its leases
    model, tokenizer = loaded or load(config.load)
    replicas = kv or open_replicas(config, model, name)
    engine, _ = build_engine(config.engine, loaded=(model, tokenizer), kv=replicas)
    owned: list[KVClient] = [replicas] if kv is None else []
    limits = SchedulerConfig(config.max_batch, config.max_queue)
    scheduler = Scheduler(engine, limits, name).start()
    metrics = WorkerMetrics(scheduler, engine.kv)
    server = grpc.server(
        futures.ThreadPoolExecutor(config.workers, thread_name_prefix="rpc"),
        interceptors=security.server_interceptors(config.security),
    )
    generations = Generations(scheduler, tokenizer, metrics, config)
    servicer = WorkerServicer(generations, _info(config, engine))
    metrics.track_inflight(lambda: generations.inflight)
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = security.add_port(server, f"{config.host}:{config.port}", config.security)
        http = _http(config, generations) if config.http_port else None
    except (OSError, RuntimeError):
        server.stop(0)
        scheduler.stop()
        for thing in owned:
            thing.close()
        raise
    server.start()
    _track_replica_health(engine.kv, checker)
    if config.metrics_port:
        metrics.serve_http(config.metrics_port, config.host.strip("[]"))
    auth, tls = bool(config.security.token), config.security.server_tls
    log.info("serving on %s:%d (token auth %s, TLS %s)", config.host, port,
             "on" if auth else "off", "on" if tls else "off",
             extra={"port": port, "auth": auth, "tls": tls})  # fmt: skip
    return WorkerServer(server, port, scheduler, metrics, checker, servicer, owned, http)


def served_model_name(config: WorkerConfig) -> str:
    """The model's name in the HTTP API: ``--served-model-name``, else its directory's."""
    if config.served_model_name:
        return config.served_model_name
    return Path(config.load.model).name if config.load.model else EMBEDDED_MODEL_NAME


def _http(config: WorkerConfig, generations: Generations) -> HttpServer:
    from worker.serving.http_api import create_app  # FastAPI loads only when it is asked for
    from worker.serving.http_server import HttpServer

    app = create_app(generations, served_model_name(config), config.security.token)
    return HttpServer(app, config.host, config.http_port, config.security).start()


def instance_id() -> str:
    """``<hostname>-<6 hex>``: prefixes this worker's sequence ids, which must not collide
    with another worker's on a shared replica, and names its leases."""
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


def _track_replica_health(kv: KVClient, checker: health.HealthServicer) -> None:
    """``""`` is SERVING while the process serves (liveness); ``icecache.v1.Worker`` only
    while at least one cache-service replica is healthy (readiness)."""
    checker.set("", health_pb2.HealthCheckResponse.SERVING)

    def publish(ready: bool) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        checker.set(SERVICE_NAME, serving if ready else health_pb2.HealthCheckResponse.NOT_SERVING)

    kv.watch_readiness(publish)


def _info(config: WorkerConfig, engine: Engine) -> pb.WorkerInfoResponse:
    path = config.load.model
    info = pb.WorkerInfoResponse(
        model=Path(path).name if path else f"{EMBEDDED_MODEL_NAME} (embedded)",
        device=engine.device.type,
        policy=config.engine.policy,
        dense_layers=config.engine.dense_layers,
        max_context=engine.model.config.max_position_embeddings,
        max_batch=config.max_batch,
        max_requests=config.max_requests,
    )
    if config.engine.policy != "full" and config.engine.budget is not None:
        info.budget = config.engine.budget
    return info
