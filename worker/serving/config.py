"""What one worker process needs to start (flags and env generated in ``worker.__main__``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cache_service.logs import LogConfig
from cache_service.security import SecurityConfig
from cache_service.settings import nested, setting
from cache_service.types import check_policy
from worker.engine import EngineConfig
from worker.factory import LoadConfig

OFFLINE_SETTINGS = ("allow_extrapolation",)
"""Engine settings a server does not offer: the worker refuses prompts past the model's
context whatever the engine would accept."""


def parse_addresses(text: str) -> tuple[str, ...]:
    """``"a:1, b:2"`` -> ``("a:1", "b:2")``."""
    out = tuple(part.strip() for part in text.split(",") if part.strip())
    for address in out:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {address!r}")
    return out


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs to start."""

    cache_services: tuple[str, ...] = setting(
        (),
        "host:port of each cache-service replica; sequences are placed over them.",
        flags=("--cache-service", "--cache-services"),
        parse=parse_addresses,
        metavar="HOST:PORT[,HOST:PORT...]",
    )
    host: str = setting("127.0.0.1", "Interface to listen on (0.0.0.0 for all).")
    port: int = setting(50051, "gRPC port; 0 picks a free one (logged).")
    http_port: int = setting(
        0,
        "Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models) beside the gRPC port, with the same token and TLS; 0 turns it off.",
    )
    served_model_name: str = setting(
        "",
        "The model's name in the HTTP API (its `model` field, /v1/models); empty: the model "
        "directory's name, or SmolLM2-135M-Instruct for the embedded model.",
    )
    load: LoadConfig = nested(LoadConfig)
    """The model and its device."""
    engine: EngineConfig = nested(EngineConfig)
    """Policy, budget and the rest of every sequence's engine settings (a request may bring
    its own policy and budget)."""
    max_batch: int = setting(16, "Sequences decoded together at most.")
    max_queue: int = setting(
        256,
        "Requests waiting for admission at most (more are refused with RESOURCE_EXHAUSTED).",
    )
    max_requests: int = setting(
        48, "Generate calls served at once (decoding or waiting); more get RESOURCE_EXHAUSTED."
    )
    max_new_tokens: int = setting(4096, "Largest max_new_tokens a request may ask for.")
    workers: int = setting(
        64,
        "RPC threads; a streaming Generate holds one for its whole duration, so there must be "
        "more than max_requests (health checks and Info use the rest).",
    )
    rpc_timeout_s: float = setting(
        60.0,
        "Deadline of each call to a cache-service replica; past it the replica counts as "
        "down and its sequences are rebuilt elsewhere.",
    )
    metrics_port: int = setting(0, "HTTP port of the Prometheus /metrics endpoint; 0 turns it off.")
    health_interval_s: float = setting(
        1.0, "Seconds between health checks of each cache-service replica."
    )
    lease_renew_s: float = setting(
        2.0,
        "Seconds between heartbeats renewing this worker's lease on each cache-service "
        "replica (at most a third of the replica's --lease-ttl-s; any call renews it too). "
        "If the worker dies, the replicas release its sequences once the lease expires.",
    )
    grace_s: float = setting(
        25.0,
        "On SIGTERM, seconds in-flight requests get to finish (new ones are refused at once); "
        "keep it below the orchestrator's grace period (compose stop_grace_period, k8s "
        "terminationGracePeriodSeconds: 30 s).",
    )
    log: LogConfig = nested(LogConfig)
    security: SecurityConfig = nested(SecurityConfig)
    """Token and TLS of this server (``tls_cert``/``tls_key``, ``auth_token``) and of its
    calls to the replicas (``tls_ca``, the same ``auth_token``)."""

    def __post_init__(self) -> None:
        if not self.cache_services:
            raise ValueError(
                "no cache service given; pass --cache-service HOST:PORT[,HOST:PORT...] "
                "or set ICECACHE_CACHE_SERVICES"
            )
        check_policy(self.engine.policy)
        ports = (self.port, self.metrics_port, self.http_port)
        if not all(0 <= p < 65536 for p in ports):
            raise ValueError(f"ports must be in 0..65535, got {', '.join(map(str, ports))}")
        budget = 1 if self.engine.budget is None else self.engine.budget
        limits = (budget, self.max_batch, self.max_queue, self.max_requests)
        times = (self.rpc_timeout_s, self.lease_renew_s)
        if min(*limits, self.max_new_tokens, self.workers, *times) <= 0:
            raise ValueError(
                "budget, max_batch, max_queue, max_requests, max_new_tokens, workers, "
                "rpc_timeout_s and lease_renew_s must be positive"
            )
        if self.workers <= self.max_requests:
            raise ValueError(
                f"workers ({self.workers}) must exceed max_requests ({self.max_requests}) so "
                "that health checks always get a thread; raise --workers"
            )
