"""Prometheus metrics of one worker, in their own registry."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from worker.kv_client import KVClient, ReplicaState
from worker.scheduler import RequestStats, Scheduler

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
"""Seconds; a request takes from tens of milliseconds to minutes."""


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

    def track_inflight(self, count: Callable[[], int]) -> None:
        """Report ``count()``, the ``Generate`` calls being served, as a gauge."""
        inflight = Gauge(
            "icecache_worker_inflight_requests", "Generate calls being served",
            registry=self.registry,
        )  # fmt: skip
        inflight.set_function(count)

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
