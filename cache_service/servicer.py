"""The gRPC face of a ``Store``: translates ``icecache.v1`` messages and delegates.

Every handler decodes its request with ``cache_service.codec``, checks what only the wire can
get wrong (tensor dtypes, finite values, id format, spec sizes), calls the store, and encodes
the answer; domain errors leave as status codes (``codec.error_status``) with their message
and the exception's name in trailing metadata, so a remote client raises the same exception
with the same text as the in-process store.

Deadlines: a call whose deadline has passed by the time it holds the store is refused with
DEADLINE_EXCEEDED before it changes anything.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from cache_service import codec
from cache_service.local_stream import METHOD, LocalContext, LocalStreams
from cache_service.metrics import ServiceMetrics
from cache_service.page_pool import PoolExhausted
from cache_service.store import Store
from cache_service.types import (
    POLICIES,
    Selection,
    SequenceSpec,
    TooManyStreams,
    UnknownSequence,
)
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheService"].full_name
"""``icecache.v1.CacheService``: for health checking and reflection."""

MAX_SEQ_ID = 256
"""Longest sequence id (printable ASCII)."""
SPEC_LIMITS = {
    "num_layers": 1024,
    "num_kv_heads": 256,
    "num_q_heads": 2048,
    "budget": 2**20,
    "sink_tokens": 2**20,
    "recent_pages": 2**16,
    "dense_layers": 1024,
    "reuse_group": 1024,
    "seed": 2**30,
}
"""Largest value of each ``SequenceSpec`` field the service takes."""
MAX_HEADS_TOTAL = 2**15
"""Most (layer, KV head) pairs of one sequence."""
PUSH_MAX_BYTES = 16 * 2**20
"""Most page bytes one ``DecodeStream`` response carries for ``push_pages``."""
MAX_CARRIED = 2**18
"""Most pages a stream remembers having sent (then it forgets them all)."""
MAX_ABS_VALUE = 65504.0
"""Keys, values and queries must be finite and within the float16 range."""

Handler = TypeVar("Handler", bound=Callable[..., Any])


class DeadlinePassed(Exception):
    """The caller's deadline passed before the call was applied."""


def _rpc(handler: Handler) -> Handler:
    """Map exceptions to status codes and record the call in the metrics."""
    method = handler.__name__

    @functools.wraps(handler)
    def wrapped(self: CacheServicer, request: Any, context: grpc.ServicerContext) -> Any:
        return _serve(self, method, handler, request, context)

    return wrapped  # type: ignore[return-value]


def _serve(
    servicer: CacheServicer,
    method: str,
    handler: Callable[[CacheServicer, Any, grpc.ServicerContext], Any],
    request: Any,
    context: grpc.ServicerContext,
) -> Any:
    """``handler``'s answer to one request; an exception ends the call with its status."""
    try:
        return _answer(servicer, method, handler, request, context)
    except Refused as refused:
        _abort(context, method, refused.code, refused.err)


class Refused(Exception):
    """A request that failed: the status ``code`` it ends with and the error ``err``."""

    def __init__(self, code: grpc.StatusCode, err: Exception) -> None:
        super().__init__(code, err)
        self.code, self.err = code, err


def _answer(
    servicer: CacheServicer,
    method: str,
    handler: Callable[[CacheServicer, Any, Any], Any],
    request: Any,
    context: Any,
    observed: list[tuple[str, str, float]] | None = None,
) -> Any:
    """``handler``'s answer, timed in the metrics; ``Refused`` (from the error) if it fails.

    ``context`` is a ``grpc.ServicerContext`` or anything with its ``time_remaining`` and
    ``is_active`` (a local stream's). ``observed``: where to leave the metrics observation
    for the caller to make once it has answered (``None``: made here).
    """
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        _check_deadline(context)
        return handler(servicer, request, context)
    except DeadlinePassed as err:
        code = grpc.StatusCode.DEADLINE_EXCEEDED
        raise Refused(code, err) from err
    except Exception as err:  # noqa: BLE001 - every error becomes a status
        if isinstance(err, PoolExhausted):
            err = PoolExhausted(f"{err} (limit: {servicer.limit})")
        code = codec.error_status(err)
        raise Refused(code, err) from err
    finally:
        observation = (method, code.name, time.perf_counter() - started)
        if observed is None:
            servicer.metrics.observe(*observation)
        else:
            observed.append(observation)


def _abort(
    context: grpc.ServicerContext, method: str, code: grpc.StatusCode, err: Exception
) -> NoReturn:
    """Log ``err`` and end the RPC with ``code`` and its message (``abort`` raises)."""
    details = _log_refusal(method, code, err)
    if code != grpc.StatusCode.INTERNAL:
        trailer = [(codec.ERROR_KEY, codec.error_name(err))]
        if isinstance(err, UnknownSequence) and _valid_id(str(err.args[0])):
            trailer.append((codec.SEQ_ID_KEY, str(err.args[0])))
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
        error=codec.error_name(err),
        seq_id=seq_id if _valid_id(seq_id) else "",
    )


def _log_refusal(method: str, code: grpc.StatusCode, err: Exception) -> str:
    """Log a failed request (with its traceback if unexpected); returns the status details."""
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=err, extra={"method": method})
        return f"internal error in {method}: {type(err).__name__}: {err}"
    log.info("%s refused: %s", method, err, extra={"method": method, "code": code.name})
    return str(err)


def _check_deadline(context: grpc.ServicerContext | LocalContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlinePassed("the call's deadline passed before the service could apply it")
    if not context.is_active():  # a stream has no deadline; its client cancels instead
        raise DeadlinePassed("the call was cancelled before the service could apply it")


def _valid_id(seq_id: str) -> bool:
    return 0 < len(seq_id) <= MAX_SEQ_ID and seq_id.isascii() and seq_id.isprintable()


def _check_id(seq_id: str) -> None:
    if not _valid_id(seq_id):
        raise ValueError(
            f"seq_id must be 1..{MAX_SEQ_ID} printable ASCII characters, got {seq_id[:40]!r}"
        )


def _check_spec(spec: SequenceSpec) -> None:
    for name, limit in SPEC_LIMITS.items():
        value = getattr(spec, name)
        if value is not None and not 0 <= value <= limit:
            raise ValueError(f"spec.{name} must be in 0..{limit}, got {value}")
    if spec.num_layers * spec.num_kv_heads > MAX_HEADS_TOTAL:
        raise ValueError(
            f"spec.num_layers x num_kv_heads must be at most {MAX_HEADS_TOTAL}, got "
            f"{spec.num_layers} x {spec.num_kv_heads}"
        )


def _floats(tensor: pb.Tensor, field: str) -> np.ndarray:
    array = codec.from_tensor(tensor, field)
    if array.dtype.kind != "f":
        raise ValueError(f"{field} must be float32 or float16, got {tensor.dtype}")
    array = array.astype(np.float32, copy=False)
    if array.size and not np.abs(array).max() <= MAX_ABS_VALUE:  # NaN fails too
        raise ValueError(f"{field} must be finite and within +-{MAX_ABS_VALUE:g}")
    return array


def _decode_request(frame: bytes) -> pb.DecodeRequest:
    """A local stream's frame as the ``DecodeRequest`` it must be."""
    try:
        return pb.DecodeRequest.FromString(frame)
    except DecodeError as err:
        raise ValueError(f"a local-stream frame is not a DecodeRequest: {err}") from None


def _ints(tensor: pb.Tensor, field: str) -> np.ndarray:
    array = codec.from_tensor(tensor, field)
    if array.dtype.kind != "i":
        raise ValueError(f"{field} must be int64, got {tensor.dtype}")
    return array


class CacheServicer(pb_grpc.CacheServiceServicer):
    """Serves one store; ``info`` tells clients how to reach its page data."""

    def __init__(
        self,
        store: Store,
        metrics: ServiceMetrics,
        host_id: str,
        max_memory: int = 0,
        max_streams: int = 32,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams) if max_streams else None
        self.local: LocalStreams | None = None
        """Same-host decode streams, when the service offers them (set by the server)."""
        pool = store.pool
        self.limit = (
            f"--max-memory {max_memory or pool.num_pages * pool.page_bytes} bytes = "
            f"{pool.num_pages} pages of {pool.page_bytes} bytes"
        )
        self.info = pb.InfoResponse(
            pool=pb.PoolInfo(
                num_pages=pool.num_pages,
                page_size=pool.page_size,
                head_dim=pool.head_dim,
                dtype=pool.dtype,
                page_bytes=pool.page_bytes,
            ),
            segment=pb.SharedSegment(
                name=pool.shm_name or "", size_bytes=pool.data.nbytes if pool.shm_name else 0
            ),
            host_id=host_id,
            policies=POLICIES,
        )

    @_rpc
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return self.info

    @_rpc
    def Create(self, request: pb.CreateRequest, context: grpc.ServicerContext) -> pb.CreateResponse:
        _check_id(request.seq_id)
        spec = codec.spec_from_proto(request.spec)
        _check_spec(spec)
        with self.store.lock:
            _check_deadline(context)
            self.store.create(request.seq_id, spec)
        log.info(
            "created %s",
            request.seq_id,
            extra={"seq_id": request.seq_id, "policy": spec.policy, "budget": spec.budget},
        )
        return pb.CreateResponse()

    @_rpc
    def Append(self, request: pb.AppendRequest, context: grpc.ServicerContext) -> pb.AppendResponse:
        keys, values = _floats(request.keys, "keys"), _floats(request.values, "values")
        positions = _ints(request.positions, "positions")
        with self.store.lock:
            _check_deadline(context)
            self.store.append(request.seq_id, request.layer, keys, values, positions)
        self.metrics.received.labels("Append").inc(keys.nbytes + values.nbytes)
        return pb.AppendResponse()

    @_rpc
    def Decode(self, request: pb.DecodeRequest, context: grpc.ServicerContext) -> pb.DecodeResponse:
        return self._decode(request, context, pb.DecodeResponse())

    def DecodeStream(
        self, requests: Iterator[pb.DecodeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.DecodeResponse]:
        """``Decode`` of each request in turn; a failed one ends the stream with its status."""
        if not self.acquire_stream("grpc"):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self.metrics.observe("DecodeStream", code.name, 0.0)
            _abort(context, "DecodeStream", code, self.too_many_streams())
        carried: dict[int, int] = {}  # page -> version this stream sent (``push_pages``)

        def decode(servicer: CacheServicer, request: pb.DecodeRequest, context: Any) -> Any:
            return servicer._decode(request, context, pb.DecodeResponse(), carried)

        try:
            for request in requests:
                yield _serve(self, "DecodeStream", decode, request, context)
        finally:
            self.release_stream("grpc")

    @_rpc
    def OpenLocalStream(
        self, request: pb.OpenLocalStreamRequest, context: grpc.ServicerContext
    ) -> pb.OpenLocalStreamResponse:
        if self.local is None:
            return pb.OpenLocalStreamResponse()
        return pb.OpenLocalStreamResponse(socket=self.local.name, ticket=self.local.ticket())

    def decode_local(
        self, frame: bytes, context: LocalContext, observed: list[tuple[str, str, float]]
    ) -> pb.LocalReply:
        """The reply to one frame of a local stream: ``Decode``'s response, or its error.

        The metrics observation is left in ``observed``: the caller makes it once the reply
        is on its way, off the client's wait.
        """
        reply = pb.LocalReply()

        def decode(servicer: CacheServicer, frame: bytes, context: LocalContext) -> Any:
            return servicer._decode(_decode_request(frame), context, reply.response)

        try:
            _answer(self, METHOD, decode, frame, context, observed)
        except Refused as refused:
            return pb.LocalReply(error=local_error(METHOD, refused))
        return reply

    def acquire_stream(self, kind: str) -> bool:
        """Take one of the ``--max-streams`` slots for a stream of ``kind`` (``grpc`` or
        ``local``); ``False`` when none is free."""
        if self._streams is None or not self._streams.acquire(blocking=False):
            return False
        self.metrics.open_streams.labels(kind).inc()
        return True

    def release_stream(self, kind: str) -> None:
        assert self._streams is not None
        self.metrics.open_streams.labels(kind).dec()
        self._streams.release()

    def too_many_streams(self) -> TooManyStreams:
        return TooManyStreams(
            f"the cache service holds {self.max_streams} open decode streams, its "
            "--max-streams; send this request with Decode, or raise --max-streams"
        )

    def _decode(
        self,
        request: pb.DecodeRequest,
        context: grpc.ServicerContext | LocalContext,
        response: pb.DecodeResponse,
        carried: dict[int, int] | None = None,
    ) -> pb.DecodeResponse:
        """Apply a decode step; its selections go into ``response`` (returned).

        ``carried``: on a gRPC stream, page -> version of the page data it has sent (for
        ``push_pages``).
        """
        seq_ids = list(request.seq_ids)
        keys, values = _floats(request.keys, "keys"), _floats(request.values, "values")
        positions = _ints(request.positions, "positions")
        queries = _floats(request.queries, "queries")
        arrays = (keys, values, positions, queries)
        for array in arrays:
            if array.ndim == 0 or len(array) != len(seq_ids):
                raise ValueError(
                    f"Decode needs one key, value, position and query per sequence "
                    f"({len(seq_ids)} ids): shapes {[tuple(a.shape) for a in arrays]}"
                )
        with self.store.lock:
            _check_deadline(context)
            sels = self.store.decode(request.layer, seq_ids, keys, values, positions, queries)
            if carried is not None and request.push_pages:
                self._push(sels, carried, response.pushed)
        for sel in sels:
            codec.selection_to_proto(sel, response.selections.add())
        self.metrics.selected_pages.inc(sum(s.pages.size for s in sels))
        return response

    def _push(self, sels: list[Selection], carried: dict[int, int], out: pb.PageData) -> None:
        """Data of the selected pages not in ``carried`` at their version, into ``out``."""
        pages = np.concatenate([s.pages for s in sels])
        versions = np.concatenate([s.versions for s in sels])
        pages, first = np.unique(pages, return_index=True)
        versions = versions[first]
        new = [carried.get(p) != v for p, v in zip(pages.tolist(), versions.tolist(), strict=True)]
        limit = max(1, min(codec.READ_PAGES_MAX, PUSH_MAX_BYTES // self.store.pool.page_bytes))
        pages, versions = pages[new][:limit], versions[new][:limit]
        if len(carried) + pages.size > MAX_CARRIED:
            carried.clear()  # forgetting only costs sending a page again
        carried.update(zip(pages.tolist(), versions.tolist(), strict=True))
        data = self.store.read_pages(pages)
        codec.to_tensor(pages, out.pages)
        codec.to_tensor(versions, out.versions)
        codec.to_tensor(data, out.data)
        self.metrics.sent.labels("DecodeStream").inc(data.nbytes)

    @_rpc
    def Retrieve(
        self, request: pb.RetrieveRequest, context: grpc.ServicerContext
    ) -> pb.RetrieveResponse:
        queries = _floats(request.queries, "queries")
        with self.store.lock:
            _check_deadline(context)
            sel = self.store.retrieve(request.seq_id, request.layer, queries)
        self.metrics.selected_pages.inc(sel.pages.size)
        return pb.RetrieveResponse(selection=codec.selection_to_proto(sel))

    @_rpc
    def ReadPages(
        self, request: pb.ReadPagesRequest, context: grpc.ServicerContext
    ) -> pb.ReadPagesResponse:
        pages = _ints(request.pages, "pages")
        num_pages = self.store.pool.num_pages
        if pages.ndim != 1:
            raise ValueError(f"pages must be one-dimensional [n], got shape {pages.shape}")
        if pages.size > codec.READ_PAGES_MAX:
            raise ValueError(f"ReadPages takes at most {codec.READ_PAGES_MAX} pages per call")
        if pages.size and (pages.min() < 0 or pages.max() >= num_pages):
            raise ValueError(f"page ids must be in 0..{num_pages - 1}")
        with self.store.lock:
            versions = self.store.pool.version[pages]
            data = self.store.read_pages(pages)
        self.metrics.sent.labels("ReadPages").inc(data.nbytes)
        return pb.ReadPagesResponse(data=codec.to_tensor(data), versions=codec.to_tensor(versions))

    @_rpc
    def Release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        with self.store.lock:
            _check_deadline(context)
            self.store.release(request.seq_id)
        log.info("released %s", request.seq_id, extra={"seq_id": request.seq_id})
        return pb.ReleaseResponse()

    @_rpc
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        stats = self.store.stats()
        return pb.StatsResponse(
            sequences=stats.sequences,
            pages_used=stats.pages_used,
            pages_total=stats.pages_total,
            page_bytes=stats.page_bytes,
            bytes_used=stats.bytes_used,
        )
