"""Domain exceptions <-> gRPC status codes, both ways.

A service sends a domain error as its status code with the exception's name in the trailing
metadata (``ERROR_KEY``); a client raises the same exception with the same message, so an
error means the same in process and over the wire.
"""

from __future__ import annotations

import grpc

from cache_service.page_pool import PoolExhausted
from cache_service.types import (
    AdoptionConflict,
    AdoptionRefused,
    LeaseLost,
    OutOfOrder,
    SequenceExists,
    SequenceFailed,
    TooManySequences,
    TooManyStreams,
    UnknownSequence,
)
from proto.icecache.v1 import cache_service_pb2 as pb

SEQ_ID_KEY = "icecache-seq-id"
"""Trailing metadata naming the sequence of a NOT_FOUND error."""
ERROR_KEY = "icecache-error"
"""Trailing metadata naming the domain exception of a failed call (e.g. ``OutOfOrder``)."""

_ERRORS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (UnknownSequence, grpc.StatusCode.NOT_FOUND),
    (SequenceExists, grpc.StatusCode.ALREADY_EXISTS),
    (OutOfOrder, grpc.StatusCode.FAILED_PRECONDITION),
    (SequenceFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (LeaseLost, grpc.StatusCode.FAILED_PRECONDITION),
    (AdoptionRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (AdoptionConflict, grpc.StatusCode.ABORTED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (PoolExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManySequences, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManyStreams, grpc.StatusCode.RESOURCE_EXHAUSTED),
)
"""Domain exception -> status code, most specific first."""
_BY_NAME = {kind.__name__: kind for kind, _ in _ERRORS}


def error_status(err: Exception) -> grpc.StatusCode:
    """The status code a domain error goes out as (``INTERNAL`` for anything unexpected)."""
    for kind, code in _ERRORS:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_name(err: Exception) -> str:
    """The name of the domain exception class ``err`` travels as (for ``ERROR_KEY``)."""
    for kind, _ in _ERRORS:
        if isinstance(err, kind):
            return kind.__name__
    return ""


def trailer(err: grpc.RpcError) -> dict[str, str]:
    """The trailing metadata of a failed call (empty when it has none)."""
    return dict(getattr(err, "trailing_metadata", lambda: ())() or ())


def error_from_status(err: grpc.RpcError, address: str) -> Exception:
    """The domain exception a failed call stands for, with the service's message."""
    return error_from_parts(err.code(), err.details() or "", trailer(err), address)


def error_from_local(err: pb.LocalError, address: str) -> Exception:
    """The domain exception an error on a local stream stands for (as ``error_from_status``)."""
    code = grpc.StatusCode.__members__.get(err.code, grpc.StatusCode.UNKNOWN)
    meta = {ERROR_KEY: err.error, SEQ_ID_KEY: err.seq_id}
    return error_from_parts(code, err.message, {k: v for k, v in meta.items() if v}, address)


def error_from_parts(
    code: grpc.StatusCode, details: str, meta: dict[str, str], address: str
) -> Exception:
    """The domain exception of a status ``code`` with ``details`` and trailing ``meta``."""
    if code == grpc.StatusCode.NOT_FOUND:
        return UnknownSequence(meta.get(SEQ_ID_KEY, details))
    kind = _BY_NAME.get(meta.get(ERROR_KEY, ""))
    if kind is not None:
        return kind(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return PermissionError(
            f"cache service at {address} refused the call ({details}); give the client the "
            "service's token (ICECACHE_AUTH_TOKEN) and, for TLS, its CA (ICECACHE_TLS_CA)"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PoolExhausted(details)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,  # e.g. a stream the service cut off when it stopped
    ):
        return ConnectionError(
            f"cache service at {address} did not answer ({code.name}: {details}); "
            "check that it is running (python -m cache_service --port ...)"
        )
    return RuntimeError(f"cache service at {address} failed ({code.name}): {details}")
