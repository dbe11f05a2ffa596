"""How a failed ``Generate`` ends: the worker's own refusals and every failure's status code."""

from __future__ import annotations

import grpc

from cache_service.page_pool import PoolExhausted
from cache_service.types import AdoptionConflict, TooManySequences
from worker.scheduler import DeadlineExceeded, QueueFull, SchedulerStopped


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
    if isinstance(err, AdoptionConflict):
        return grpc.StatusCode.ABORTED
    if isinstance(err, SchedulerStopped | ConnectionError | Draining | PermissionError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(err, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL
