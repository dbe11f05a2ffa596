"""How a request that fails ends: the error's status code, its log line, and what the client
gets (a gRPC status with trailing metadata, or a ``LocalError`` on a local stream).

Domain errors leave as status codes (``wire_errors.error_status``) with their message and the
exception's name, so a remote client raises the same exception with the same text as the
in-process store. A call whose deadline passed, or whose client went away, before it held
the store is refused with DEADLINE_EXCEEDED before it changes anything.
"""

from __future__ import annotations

import logging
from typing import NoReturn, Protocol

import grpc

from cache_service import wire_errors
from cache_service.page_pool import PagePool, PoolExhausted
from cache_service.types import UnknownSequence
from cache_service.wire_checks import valid_id
from proto.icecache.v1 import cache_service_pb2 as pb

log = logging.getLogger(__name__)


class CallContext(Protocol):
    """What a handler asks of its call: a ``grpc.ServicerContext`` or a local stream's."""

    def time_remaining(self) -> float | None: ...

    def is_active(self) -> bool: ...


class DeadlinePassed(Exception):
    """The caller's deadline passed before the call was applied."""


class Refused(Exception):
    """A request that failed: the status ``code`` it ends with and the error ``err``."""

    def __init__(self, code: grpc.StatusCode, err: Exception) -> None:
        super().__init__(code, err)
        self.code, self.err = code, err


def check_deadline(context: CallContext) -> None:
    """``DeadlinePassed`` when the call's deadline passed or its client cancelled it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlinePassed("the call's deadline passed before the service could apply it")
    if not context.is_active():  # a stream has no deadline; its client cancels instead
        raise DeadlinePassed("the call was cancelled before the service could apply it")


def pool_limit(pool: PagePool, max_memory: int) -> str:
    """The pool's size as ``PoolExhausted`` errors name it (``--max-memory`` and pages)."""
    return (
        f"--max-memory {max_memory or pool.num_pages * pool.page_bytes} bytes = "
        f"{pool.num_pages} pages of {pool.page_bytes} bytes"
    )


def refusal(err: Exception, limit: str) -> Refused:
    """The status ``err`` ends its call with; ``limit``: the pool's, for ``PoolExhausted``."""
    if isinstance(err, DeadlinePassed):
        return Refused(grpc.StatusCode.DEADLINE_EXCEEDED, err)
    if isinstance(err, PoolExhausted):
        err = PoolExhausted(f"{err} (limit: {limit})")
    return Refused(wire_errors.error_status(err), err)


def abort(context: grpc.ServicerContext, method: str, refused: Refused) -> NoReturn:
    """Log the refusal and end the RPC with its code and message (``abort`` raises)."""
    code, err = refused.code, refused.err
    details = _log_refusal(method, code, err)
    if code != grpc.StatusCode.INTERNAL:
        trailer = [(wire_errors.ERROR_KEY, wire_errors.error_name(err))]
        if isinstance(err, UnknownSequence) and valid_id(str(err.args[0])):
            trailer.append((wire_errors.SEQ_ID_KEY, str(err.args[0])))
        context.set_trailing_metadata(tuple(trailer))
    context.abort(code, details)
    raise AssertionError("grpc's abort returned")  # unreachable: abort raises


def local_error(method: str, refused: Refused) -> pb.LocalError:
    """Log a failed request of a local stream; what its client gets instead of a status."""
    code, err = refused.code, refused.err
    details = _log_refusal(method, code, err)
    if code == grpc.StatusCode.INTERNAL:
        return pb.LocalError(code=code.name, message=details)
    seq_id = str(err.args[0]) if isinstance(err, UnknownSequence) else ""
    return pb.LocalError(
        code=code.name,
        message=details,
        error=wire_errors.error_name(err),
        seq_id=seq_id if valid_id(seq_id) else "",
    )


def _log_refusal(method: str, code: grpc.StatusCode, err: Exception) -> str:
    """Log a failed request (with its traceback if unexpected); returns the status details."""
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=err, extra={"method": method})
        return f"internal error in {method}: {type(err).__name__}: {err}"
    log.info("%s refused: %s", method, err, extra={"method": method, "code": code.name})
    return str(err)
