"""The worker's gRPC service (``icecache.v1.Worker``): config, servicer, metrics, ``serve()``.

The servicer only translates between protobuf and the scheduler's requests and events; the
scheduler (``worker.scheduler``) owns the engine and batches the decode steps of all
requests; the engine's KV store is a ``ShardedKVClient`` over the cache-service replicas,
seen here only through the ``KVClient`` contract (``replicas``, ``watch_readiness``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cache_service import security
from cache_service.page_pool import PoolExhausted
from cache_service.security import SecurityConfig
from cache_service.types import SequenceSpec, TooManySequences, check_policy, kv_bytes
from proto.icecache.v1 import worker_pb2 as pb
from proto.icecache.v1 import worker_pb2_grpc as pb_grpc
from worker.engine import Engine, EngineConfig
from worker.factory import pick_device
from worker.kv.sharded import ShardedKVClient
from worker.kv_client import KVClient, ReplicaState
from worker.model import LlamaModel
from worker.scheduler import (
    DeadlineExceeded,
    DoneEvent,
    Event,
    QueueFull,
    Request,
    RequestStats,
    Scheduler,
    SchedulerConfig,
    SchedulerStopped,
    TokenEvent,
)
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
"""Seconds; a request takes from tens of milliseconds to minutes."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs to start (flags and env in ``worker.__main__``)."""

    cache_services: tuple[str, ...] = ()
    """``host:port`` of each cache-service replica; sequences are placed over them."""
    host: str = "127.0.0.1"
    """Interface to listen on (``0.0.0.0`` for all)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (logged)."""
    model: str | None = None
    """Local HF checkpoint directory; ``None``: the embedded SmolLM2-135M-Instruct."""
    policy: str = "icecache"
    """Attention policy of every sequence, one of ``cache_service.types.POLICIES``."""
    budget: int = 256
    """KV tokens per layer and KV head at a decode step (ignored by ``full``)."""
    dense_layers: int = 2
    """The first layers attend fully."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto`` (CUDA when present)."""
    device_cache_mb: int = 1024
    """Device memory for resident KV pages."""
    seed: int = 0
    """Seed of the clustering."""
    max_batch: int = 16
    """Sequences decoded together at most."""
    max_queue: int = 256
    """Requests waiting for admission at most (more are refused with RESOURCE_EXHAUSTED)."""
    max_requests: int = 48
    """``Generate`` calls served at once (decoding or waiting); more get RESOURCE_EXHAUSTED."""
    max_new_tokens: int = 4096
    """Largest ``max_new_tokens`` a request may ask for."""
    workers: int = 64
    """RPC threads; a streaming ``Generate`` holds one for its whole duration, so there must
    be more than ``max_requests`` (health checks and ``Info`` use the rest)."""
    rpc_timeout_s: float = 60.0
    """Deadline of each call to a cache-service replica; past it the replica counts as down
    and its sequences are rebuilt elsewhere."""
    metrics_port: int = 0
    """HTTP port of the Prometheus ``/metrics`` endpoint; 0 turns it off."""
    health_interval_s: float = 1.0
    """Seconds between health checks of each cache-service replica."""
    grace_s: float = 25.0
    """On SIGTERM, seconds in-flight requests get to finish (new ones are refused at once);
    keep it below the orchestrator's grace period (compose ``stop_grace_period``, k8s
    ``terminationGracePeriodSeconds``: 30 s)."""
    log_level: str = "INFO"
    """Python logging level name."""
    log_format: str = "json"
    """``json`` (one object per line) or ``text``."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """Token and TLS of this server (``tls_cert``/``tls_key``, ``auth_token``) and of its
    calls to the replicas (``tls_ca``, the same ``auth_token``)."""

    def __post_init__(self) -> None:
        if not self.cache_services:
            raise ValueError(
                "no cache service given; pass --cache-service HOST:PORT[,HOST:PORT...] "
                "or set ICECACHE_CACHE_SERVICES"
            )
        check_policy(self.policy)
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError(f"ports must be in 0..65535, got {self.port}, {self.metrics_port}")
        limits = (self.budget, self.max_batch, self.max_queue, self.max_requests)
        if min(*limits, self.max_new_tokens, self.workers, self.rpc_timeout_s) <= 0:
            raise ValueError(
                "budget, max_batch, max_queue, max_requests, max_new_tokens, workers and "
                "rpc_timeout_s must be positive"
            )
        if self.workers <= self.max_requests:
            raise ValueError(
                f"workers ({self.workers}) must exceed max_requests ({self.max_requests}) so "
                "that health checks always get a thread; raise --workers"
            )
        if self.log_format not in ("json", "text"):
            raise ValueError(f"log_format must be json or text, got {self.log_format!r}")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            policy=self.policy,
            budget=self.budget,
            dense_layers=self.dense_layers,
            device_cache_mb=self.device_cache_mb,
            seed=self.seed,
        )


class WorkerMetrics:
    """Prometheus metrics of one worker, in their own registry."""

    def __init__(self, scheduler: Scheduler, kv: KVClient) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("icecache_worker_requests", "Generate calls", ["code"], registry=r)
        self.prompt_tokens = Counter("icecache_worker_prompt_tokens", "Prompt tokens", registry=r)
        self.output_tokens = Counter(
            "icecache_worker_generated_tokens", "Generated tokens", registry=r
        )
        self.latency = Histogram(
            "icecache_worker_request_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "icecache_worker_first_token_seconds", "Arrival to first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.step = Histogram(
            "icecache_worker_decode_step_seconds", "One batched decode step",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch = Histogram(
            "icecache_worker_batch_size", "Sequences per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )  # fmt: skip
        active = Gauge("icecache_worker_active_sequences", "Sequences being decoded", registry=r)
        active.set_function(lambda: scheduler.active)
        waiting = Gauge("icecache_worker_waiting_requests", "Requests not admitted", registry=r)
        waiting.set_function(lambda: scheduler.waiting.qsize())
        recovered = Gauge(
            "icecache_worker_recovered_sequences",
            "Sequences rebuilt on another replica after theirs failed (since start)",
            registry=r,
        )
        recovered.set_function(lambda: scheduler.recovered)
        self._replicas(kv)
        scheduler.on_step.append(self.observe_step)
        self._http: Any = None

    def track_servicer(self, servicer: WorkerServicer) -> None:
        inflight = Gauge(
            "icecache_worker_inflight_requests", "Generate calls being served",
            registry=self.registry,
        )  # fmt: skip
        inflight.set_function(lambda: servicer.inflight)

    def _replicas(self, kv: KVClient) -> None:
        addresses = [r.address for r in kv.replicas()]
        if not addresses:
            return
        placed = Gauge(
            "icecache_worker_replica_sequences", "Live sequences per cache-service replica",
            ["replica"], registry=self.registry,
        )  # fmt: skip
        healthy = Gauge(
            "icecache_worker_replica_healthy", "1 while a replica passes its health checks",
            ["replica"], registry=self.registry,
        )  # fmt: skip
        for address in addresses:
            placed.labels(address).set_function(functools.partial(_live, kv, address))
            healthy.labels(address).set_function(functools.partial(_is_healthy, kv, address))

    def observe_step(self, batch: int, seconds: float) -> None:
        self.step.observe(seconds)
        self.batch.observe(batch)

    def observe_done(self, prompt_tokens: int, output_tokens: int, stats: RequestStats) -> None:
        self.requests.labels("OK").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.output_tokens.inc(output_tokens)
        self.latency.observe(stats.total_s)
        if output_tokens:
            self.first_token.observe(stats.first_token_s)

    def serve_http(self, port: int, host: str) -> int:
        """Expose ``/metrics`` on ``port``; returns the bound port."""
        self._http, _ = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def _replica(kv: KVClient, address: str) -> ReplicaState:
    return next(r for r in kv.replicas() if r.address == address)


def _live(kv: KVClient, address: str) -> float:
    return float(_replica(kv, address).sequences)


def _is_healthy(kv: KVClient, address: str) -> float:
    return float(_replica(kv, address).healthy)


class TextStream:
    """Incremental detokenization: the new text each token completes (O(1) per token)."""

    def __init__(self, tokenizer: Tokenizer, hidden: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.hidden = hidden
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already sent
        self.read = 0

    def push(self, token_id: int) -> str:
        if token_id in self.hidden:
            return ""
        self.ids.append(token_id)
        sent = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(sent) or text.endswith("\ufffd"):
            return ""  # mid-character: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(sent) :]


class WorkerServicer(pb_grpc.WorkerServicer):
    """Translates ``icecache.v1.Worker`` calls into scheduler requests and back."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        metrics: WorkerMetrics,
        info: pb.WorkerInfoResponse,
        config: WorkerConfig | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.info = info
        self.config = config
        engine = scheduler.engine
        c = engine.model.config
        self.max_context = c.max_position_embeddings
        self.vocab = c.vocab_size
        stored = engine.kv.read_pages(np.empty(0, np.int64))  # [0, 2, page, dim], as stored
        self.kv_token_bytes = kv_bytes(
            1, c.head_dim, stored.dtype.itemsize, heads=c.num_layers * c.num_kv_heads
        )
        self.page_bytes = engine.cache.page_bytes
        self.max_requests = config.max_requests if config else 1 << 30
        self.max_new_tokens = config.max_new_tokens if config else self.max_context
        self.inflight = 0
        """``Generate`` calls being served now."""
        self.draining = threading.Event()
        """Set on shutdown: in-flight calls finish, new ones are refused with UNAVAILABLE."""
        self._lock = threading.Lock()

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        if self.draining.is_set():
            self._abort(context, Draining())
        with self._lock:
            full = self.inflight >= self.max_requests
            if not full:
                self.inflight += 1
        if full:
            self._abort(context, TooBusy(self.max_requests))
        try:
            yield from self._generate(request, context)
        finally:
            with self._lock:
                self.inflight -= 1

    def _generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        try:
            job = self._request(request, context)
            self.scheduler.submit(job)
        except Exception as err:
            self._abort(context, err)
        context.add_callback(job.cancel)
        text = TextStream(self.tokenizer, self.tokenizer.eos_token_ids)
        prompt_tokens = len(job.prompt_ids)
        while True:
            event = self._next_event(job, context)
            if isinstance(event, TokenEvent):
                token = pb.Token(
                    id=event.token_id, text=text.push(event.token_id), index=event.index
                )
                yield pb.GenerateResponse(token=token)
            elif isinstance(event, DoneEvent):
                self.metrics.observe_done(prompt_tokens, len(event.token_ids), event.stats)
                yield pb.GenerateResponse(done=self._done(job, event))
                return
            else:
                self._abort(context, event.error)

    def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.ServicerContext
    ) -> pb.CountTokensResponse:
        ids = self._encode(request.prompt, request.chat)
        return pb.CountTokensResponse(tokens=len(ids), ids=ids, max_context=self.max_context)

    def Info(
        self, request: pb.WorkerInfoRequest, context: grpc.ServicerContext
    ) -> pb.WorkerInfoResponse:
        info = pb.WorkerInfoResponse()
        info.CopyFrom(self.info)
        info.recovered_sequences = self.scheduler.recovered
        info.draining = self.draining.is_set()
        for replica in self.scheduler.engine.kv.replicas():
            info.replicas.add(
                address=replica.address,
                healthy=replica.healthy,
                sequences=replica.sequences,
                placed_total=replica.placed_total,
            )
        return info

    # ---- helpers -------------------------------------------------------------------------
    def _encode(self, prompt: str, chat: bool) -> list[int]:
        return self.tokenizer.chat_prompt_ids(prompt) if chat else self.tokenizer.encode(prompt)

    def _request(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Request:
        """The scheduler's request for a call; ``ValueError`` says what to fix."""
        ids = self._prompt_ids(request)
        wanted = request.max_new_tokens
        if wanted < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {wanted}")
        if wanted > self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens is {wanted} but this worker allows at most "
                f"{self.max_new_tokens} (--max-new-tokens); ask for fewer"
            )
        if len(ids) + wanted > self.max_context:
            raise ValueError(
                f"the prompt ({len(ids)} tokens) plus max_new_tokens ({wanted}) exceeds the "
                f"model's context of {self.max_context} tokens; lower max_new_tokens to at "
                f"most {self.max_context - len(ids)} or shorten the prompt"
            )
        stop = frozenset() if request.ignore_eos else self.tokenizer.eos_token_ids
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.perf_counter() + remaining
        spec = self._spec(request)
        return Request(ids, wanted, stop, request.request_id, spec=spec, deadline=deadline)

    def _spec(self, request: pb.GenerateRequest) -> SequenceSpec | None:
        """The request's own policy and budget, checked; ``None``: the worker's."""
        if not request.HasField("policy") and not request.HasField("budget"):
            return None
        engine = self.scheduler.engine
        policy = request.policy if request.HasField("policy") else engine.config.policy
        check_policy(policy)
        budget = request.budget if request.HasField("budget") else engine.config.budget
        if budget is not None and budget <= 0:
            raise ValueError(f"budget must be a positive number of tokens, got {budget}")
        config = dataclasses.replace(engine.config, policy=policy, budget=budget)
        spec = config.spec(engine.model)
        spec.validate(engine.kv.page_size)
        return spec

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        """Validated prompt ids; ``ValueError`` says what to fix."""
        which = request.WhichOneof("input")
        if which is None:
            raise ValueError("give a prompt: set `prompt` (text) or `prompt_ids`")
        if which == "prompt":
            ids = self._encode(request.prompt, request.chat)
        else:
            ids = list(request.prompt_ids.ids)
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the model supports {self.max_context}; "
                "shorten it"
            )
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise ValueError(f"prompt ids must be in 0..{self.vocab - 1}")
        return ids

    def _next_event(self, job: Request, context: grpc.ServicerContext) -> Event:
        while True:
            try:
                return job.events.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    job.cancel()

    def _done(self, job: Request, event: DoneEvent) -> pb.GenerateDone:
        s, out = event.stats, event.token_ids
        prompt_tokens = len(job.prompt_ids)
        config = self.scheduler.engine.config
        policy = job.spec.policy if job.spec else config.policy
        budget = job.spec.budget if job.spec else config.budget
        stats = pb.GenerateStats(
            finish_reason=s.finish_reason,
            policy=policy,
            dense_layers=config.dense_layers,
            replica=s.replica,
            seq_id=s.seq_id,
            pages_selected=s.pages_selected,
            pages_moved=s.pages_read,
            bytes_moved=s.pages_read * self.page_bytes,
            kv_bytes_stored=(prompt_tokens + s.decode_steps) * self.kv_token_bytes,
            queue_s=s.queue_s,
            prefill_s=s.prefill_s,
            first_token_s=s.first_token_s,
            decode_s=s.decode_s,
            total_s=s.total_s,
            decode_steps=s.decode_steps,
            mean_batch=s.mean_batch,
            recoveries=s.recoveries,
            replayed_tokens=s.replayed_tokens,
        )
        if policy != "full" and budget is not None:
            stats.budget = budget
        text = self.tokenizer.decode([t for t in out if t not in self.tokenizer.eos_token_ids])
        usage = pb.Usage(prompt_tokens=prompt_tokens, output_tokens=len(out))
        return pb.GenerateDone(usage=usage, stats=stats, text=text, token_ids=out)

    def _abort(self, context: grpc.ServicerContext, err: BaseException) -> None:
        code = status_of(err)
        self.metrics.requests.labels(code.name).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.error("request failed: %r", err)
        context.abort(code, str(err))


class Draining(RuntimeError):
    """The worker is shutting down."""

    def __init__(self) -> None:
        super().__init__(
            "the worker is shutting down (draining its in-flight requests); send the request "
            "to another worker or retry once it is back"
        )


class TooBusy(RuntimeError):
    """The worker already serves its limit of requests."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the worker is already serving {limit} requests (its --max-requests); retry later "
            "with backoff, or add workers"
        )


def status_of(err: BaseException) -> grpc.StatusCode:
    """The status code a failure goes out as."""
    if isinstance(err, QueueFull | PoolExhausted | TooManySequences | TooBusy):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(err, SchedulerStopped | ConnectionError | Draining | PermissionError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(err, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


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

    def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new calls (UNAVAILABLE) and report NOT_SERVING at once, give the
        in-flight ones (decoding or waiting) up to ``grace`` s to finish, then stop the loop
        (what is left fails with UNAVAILABLE) and close the clients."""
        self.servicer.draining.set()
        self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + (grace or 0.0)
        inflight = self.servicer.inflight
        if inflight:
            log.info("draining %d in-flight request(s), up to %g s", inflight, grace or 0.0)
        while self.servicer.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.servicer.inflight:
            log.warning("%d request(s) still running after the grace period; stopping them",
                        self.servicer.inflight)  # fmt: skip
        self.scheduler.stop()
        self.server.stop(max(0.5, deadline - time.monotonic())).wait()
        self.metrics.close()
        for thing in self.owned:
            thing.close()
        log.info("stopped", extra={"port": self.port})


def build_engine(
    config: WorkerConfig,
    loaded: tuple[LlamaModel, Tokenizer] | None = None,
    kv: KVClient | None = None,
) -> tuple[Engine, Tokenizer]:
    """Model (loaded here unless given) over the cache-service replicas (unless ``kv``)."""
    if loaded is None:
        from worker.loader import load_model

        device = pick_device(config.device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        loaded = load_model(config.model, dtype=dtype, device=device)
    model, tokenizer = loaded
    if kv is None:
        kv = ShardedKVClient.connect(
            list(config.cache_services),
            config.health_interval_s,
            auth=config.security,
            rpc_timeout=config.rpc_timeout_s,
            head_dim=model.config.head_dim,
        )
    return Engine(model, kv, config.engine_config()), tokenizer


def serve(
    config: WorkerConfig,
    loaded: tuple[LlamaModel, Tokenizer] | None = None,
    kv: KVClient | None = None,
) -> WorkerServer:
    """Load the model, connect the replicas, start the batching loop and the gRPC server."""
    engine, tokenizer = build_engine(config, loaded, kv)
    owned: list[KVClient] = [engine.kv] if kv is None else []
    limits = SchedulerConfig(config.max_batch, config.max_queue)
    scheduler = Scheduler(engine, limits, instance_id()).start()
    metrics = WorkerMetrics(scheduler, engine.kv)
    server = grpc.server(
        futures.ThreadPoolExecutor(config.workers, thread_name_prefix="rpc"),
        interceptors=security.server_interceptors(config.security),
    )
    servicer = WorkerServicer(scheduler, tokenizer, metrics, _info(config, engine), config)
    metrics.track_servicer(servicer)
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = security.add_port(server, f"{config.host}:{config.port}", config.security)
    except OSError:
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
    return WorkerServer(server, port, scheduler, metrics, checker, servicer, owned)


def instance_id() -> str:
    """``<hostname>-<6 hex>``: prefixes this worker's sequence ids, which must not collide
    with another worker's on a shared replica."""
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
    info = pb.WorkerInfoResponse(
        model=Path(config.model).name if config.model else "SmolLM2-135M-Instruct (embedded)",
        device=engine.device.type,
        policy=config.policy,
        dense_layers=config.dense_layers,
        max_context=engine.model.config.max_position_embeddings,
        max_batch=config.max_batch,
        max_requests=config.max_requests,
    )
    if config.policy != "full":
        info.budget = config.budget
    return info
