"""Prometheus metrics of the cache service: requests, latencies, pages, bytes, memory.

Request counters are updated by the servicer and the local streams; occupancy gauges are read
from the store when ``/metrics`` is scraped, so the hot path pays only for a counter and a
histogram.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cache_service.store import Store

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 0.1, 0.5, 1.0, 5.0,
)  # fmt: skip
"""Seconds; decode RPCs take tens of microseconds to milliseconds."""


class StoreCollector(Collector):
    """Occupancy gauges of a store, read at scrape time."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        pool_bytes = stats.pages_total * stats.page_bytes
        yield GaugeMetricFamily("icecache_sequences", "Sequences held", value=stats.sequences)
        yield GaugeMetricFamily("icecache_pages_used", "Pages in use", value=stats.pages_used)
        yield GaugeMetricFamily(
            "icecache_pages_total", "Pages in the pool", value=stats.pages_total
        )
        yield GaugeMetricFamily(
            "icecache_memory_used_bytes",
            "K/V bytes in used pages and the indexes' own memory (what --max-memory bounds)",
            value=stats.bytes_used,
        )
        yield GaugeMetricFamily(
            "icecache_index_bytes",
            "Memory outside the pool: the indexes' key copies, sums and centroids, page lists",
            value=stats.index_bytes,
        )
        yield GaugeMetricFamily(
            "icecache_memory_capacity_bytes", "K/V bytes of the whole pool", value=pool_bytes
        )
        prefix = stats.prefix
        yield CounterMetricFamily(
            "icecache_prefix_hits", "Sequences created from kept prompt blocks", value=prefix.hits
        )
        yield CounterMetricFamily(
            "icecache_prefix_tokens_reused",
            "Prompt tokens not prefilled thanks to kept blocks",
            value=prefix.tokens_reused,
        )
        yield CounterMetricFamily(
            "icecache_prefix_index_reuses",
            "(Layer, KV head) indexes started from one kept with prompt blocks, not built",
            value=prefix.index_reuses,
        )
        yield CounterMetricFamily(
            "icecache_prefix_evicted_blocks",
            "Kept prompt blocks dropped to make room",
            value=prefix.evicted_blocks,
        )
        yield GaugeMetricFamily(
            "icecache_prefix_blocks", "Prompt blocks kept for reuse", value=prefix.blocks
        )
        yield GaugeMetricFamily(
            "icecache_prefix_indexes",
            "(Layer, KV head) indexes kept with prompt blocks",
            value=prefix.indexes,
        )
        yield GaugeMetricFamily(
            "icecache_prefix_bytes",
            "K/V bytes of the pages kept prompt blocks and their indexes hold (shared with the "
            "sequences on them)",
            value=prefix.pages * stats.page_bytes,
        )
        yield GaugeMetricFamily(
            "icecache_shared_bytes",
            "K/V bytes of pages with more than one holder",
            value=stats.pages_shared * stats.page_bytes,
        )


class ServiceMetrics:
    """The metrics of one service, in their own registry (so tests can run several)."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "icecache_requests", "RPCs handled", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "icecache_request_seconds",
            "RPC handling time",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.received = Counter(
            "icecache_received_bytes", "Tensor bytes received", ["method"], registry=self.registry
        )
        self.sent = Counter(
            "icecache_sent_bytes", "Tensor bytes sent", ["method"], registry=self.registry
        )
        self.selected_pages = Counter(
            "icecache_selected_pages", "Pages returned by selections", registry=self.registry
        )
        self.open_streams = Gauge(
            "icecache_open_streams",
            "Decode streams open, by kind (grpc: DecodeStream, local: OpenLocalStream)",
            ["kind"],
            registry=self.registry,
        )
        self.leases_expired = Counter(
            "icecache_leases_expired", "Worker leases that expired (not renewed within the TTL)",
            registry=self.registry,
        )  # fmt: skip
        self.lease_sequences_reclaimed = Counter(
            "icecache_lease_sequences_reclaimed",
            "Sequences released because their lease expired and its grace ended",
            registry=self.registry,
        )
        self.lease_bytes_reclaimed = Counter(
            "icecache_lease_bytes_reclaimed", "Page bytes freed with those sequences",
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(StoreCollector(store))
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def track_leases(self, live: Callable[[], int]) -> None:
        """Report ``live()``, the leases not expired, as a gauge."""
        gauge = Gauge("icecache_leases", "Live worker leases", registry=self.registry)
        gauge.set_function(live)

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC."""
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose ``/metrics`` on ``port`` (0: any free one); returns the bound port."""
        self._http, self._thread = start_http_server(port, host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound, extra={"metrics_port": bound})
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint, if any."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
