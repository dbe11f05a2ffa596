"""The ``--max-streams`` slots: how many decode streams, gRPC and local alike, are open at once.

An open stream holds a thread of the service for as long as it lasts, so their number is
capped; a stream refused a slot leaves its client decoding with ``Decode`` calls.
"""

from __future__ import annotations

import threading

from prometheus_client import Gauge

from cache_service.types import TooManyStreams


class StreamSlots:
    """Owns the ``limit`` stream slots and counts the open ones by kind in ``gauge``."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        """The most streams open at once (0: no streams)."""
        self._free = threading.BoundedSemaphore(limit) if limit else None
        self._gauge = gauge

    def acquire(self, kind: str) -> bool:
        """Take a slot for a stream of ``kind`` (``grpc`` or ``local``); ``False`` when none is
        free."""
        if self._free is None or not self._free.acquire(blocking=False):
            return False
        self._gauge.labels(kind).inc()
        return True

    def release(self, kind: str) -> None:
        """Give back the slot of a stream of ``kind`` that ended."""
        assert self._free is not None
        self._gauge.labels(kind).dec()
        self._free.release()

    def refusal(self) -> TooManyStreams:
        """What a stream refused a slot is told."""
        return TooManyStreams(
            f"the cache service holds {self.limit} open decode streams, its "
            "--max-streams; send this request with Decode, or raise --max-streams"
        )
