"""What one worker process needs to start (flags and env in ``worker.__main__``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cache_service.security import SecurityConfig
from cache_service.types import check_policy
from worker.engine import EngineConfig


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
