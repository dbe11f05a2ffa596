"""The engine's KV store behind gRPC: a client of one ``python -m cache_service``.

Decode is one request per layer and step for the whole batch, sent on a long-lived stream:
on the service's host a local stream (``worker.kv.socket_stream``: the same messages on a
Unix socket, a fraction of a gRPC message's cost), else a ``DecodeStream``
(``worker.kv.grpc_stream``: a message costs less than a unary call's set-up); ``Decode`` is
used when the service refuses a stream. Page data comes one of two ways, chosen on connect
(``transport="auto"``):

- ``shm``: the service runs on this host (same host identity) and its pool is a shared-memory
  segment this process can map (``worker.kv.shm_view``): ``read_pages`` gathers the pages
  straight from it into one contiguous staging array, with no RPC.
- ``rpc``: otherwise (another host, another container, or no segment), the decode stream's
  responses carry the selected pages this client was not sent yet (``push_pages``), and
  ``ReadPages`` the rest (pages the device cache dropped since, or after a ``Decode`` call).

Errors come back as the store's own exceptions with its message (see ``cache_service.wire_errors``).
Retries: the channel's gRPC retry policy (``channel_options.CLIENT_OPTIONS``) repeats the calls that
change nothing (``Info``, ``Stats``, ``ReadPages``, ``Retrieve``) on UNAVAILABLE; this client
repeats nothing itself. There is no failover to another replica here (``take_lost`` is always
empty): a failure is the caller's error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import grpc
import numpy as np

from cache_service import channel_options, codec, host, limits, security, wire_errors
from cache_service.leases import LEASE_KEY
from cache_service.page_pool import DTYPES
from cache_service.prefix_cache import PrefixStats
from cache_service.security import HeaderClientInterceptor
from cache_service.store import StoreStats
from cache_service.types import (
    AdoptionRefused,
    PrefixKeys,
    Selection,
    SequenceSpec,
    TooManyStreams,
    UnknownSequence,
)
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc
from worker.kv.grpc_stream import DecodeStream
from worker.kv.lease import DEFAULT_RENEW_S, LeaseKeeper
from worker.kv.shm_view import SegmentView
from worker.kv.socket_stream import LocalDecodeStream
from worker.kv_client import KVClient

log = logging.getLogger(__name__)

Transport = Literal["auto", "shm", "rpc"]
DecodePath = Literal["auto", "stream", "unary"]
"""How decode steps travel: ``auto`` (a local stream where pages come through shared
memory and the service offers one, else a gRPC stream), ``stream`` (a gRPC stream) or
``unary`` (a ``Decode`` call each); refused streams fall back to ``Decode`` calls."""


class _Pushed(threading.local):
    """Page data the last decode on this thread brought (``push_pages``), for its reads."""

    pages: np.ndarray | None = None  # sorted ids
    versions: np.ndarray | None = None
    data: np.ndarray | None = None


class RemoteKVClient(KVClient):
    """``KVClient`` over gRPC; ``transport`` is ``shm`` or ``rpc`` once connected.

    ``decode``: how decode steps travel (``DecodePath``).
    """

    STREAM_RETRY_S = 60.0
    """After the service refused a stream, seconds of unary ``Decode`` before asking again."""

    def __init__(
        self,
        channel: grpc.Channel,
        address: str,
        transport: Transport = "auto",
        timeout: float | None = 300.0,
        decode: DecodePath = "auto",
        holder: str | None = None,
        lease_renew_s: float = DEFAULT_RENEW_S,
    ) -> None:
        if decode not in ("auto", "stream", "unary"):
            raise ValueError(f"decode must be auto, stream or unary, got {decode!r}")
        self.address = address
        self.timeout = timeout
        self._pushed = _Pushed()
        self._stream: DecodeStream | LocalDecodeStream | None = None
        self._stream_lock = threading.Lock()  # one caller at a time on the stream
        self._stream_after = float("inf") if decode == "unary" else 0.0
        self.lease: LeaseKeeper | None = None
        """This process's lease on the service (``None``: sequences are nobody's)."""
        self._channel = grpc.intercept_channel(
            channel, HeaderClientInterceptor(LEASE_KEY, self._lease_id)
        )
        self._stub = pb_grpc.CacheServiceStub(self._channel)
        self.info = self._call(self._stub.Info, pb.InfoRequest())
        if holder is not None:
            self.lease = LeaseKeeper(self._stub, address, holder, lease_renew_s)
        pool = self.info.pool
        self.page_size = int(pool.page_size)
        self.dtype = str(pool.dtype)
        self.head_dim = int(pool.head_dim)
        self.page_shape = (2, self.page_size, self.head_dim)
        self.segment = self._map_segment() if transport in ("auto", "shm") else None
        if transport == "shm" and self.segment is None:
            raise ConnectionError(
                f"cannot map the page pool of the cache service at {address}: it is on another "
                "host or has no shared-memory segment; use transport='auto' or 'rpc'"
            )
        self.transport: Transport = "shm" if self.segment is not None else "rpc"
        self._local = decode == "auto" and self.transport == "shm"
        """Whether to try a local stream when opening one."""
        log.info("connected to %s (pages via %s)", address, self.transport)

    @classmethod
    def connect(
        cls,
        address: str,
        transport: Transport = "auto",
        timeout: float | None = 300.0,
        connect_timeout: float = 10.0,
        auth: security.SecurityConfig | None = None,
        decode: DecodePath = "auto",
        holder: str | None = None,
        lease_renew_s: float = DEFAULT_RENEW_S,
    ) -> RemoteKVClient:
        """Open a channel to ``host:port`` and wait up to ``connect_timeout`` s for it.

        ``auth``: token and TLS settings; ``None`` reads ``ICECACHE_AUTH_TOKEN``,
        ``ICECACHE_TLS_CA`` ... from the environment (``cache_service.security``).
        ``holder``: open a lease in this name (a worker's instance id), renewed every
        ``lease_renew_s``, so that the service releases this client's sequences if it dies;
        ``None``: no lease (the sequences live until released).
        """
        auth = security.security_from_env() if auth is None else auth
        channel = security.make_channel(address, auth, options=channel_options.CLIENT_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
            return cls(channel, address, transport, timeout, decode, holder, lease_renew_s)
        except grpc.FutureTimeoutError:
            channel.close()
            tls = "with TLS " if auth.client_tls else "without TLS "
            raise ConnectionError(
                f"no cache service answered at {address} {tls}within {connect_timeout:g} s; "
                "start one with `python -m cache_service --port PORT` or fix --cache-service "
                "(a TLS service needs ICECACHE_TLS_CA on the client, and a plain one none)"
            ) from None
        except BaseException:
            channel.close()
            raise

    # ---- KVClient ------------------------------------------------------------------------
    def create(self, seq_id: str, spec: SequenceSpec, prefix: PrefixKeys | None = None) -> int:
        request = pb.CreateRequest(seq_id=seq_id, spec=codec.spec_to_proto(spec))
        if prefix is not None:
            codec.prefix_to_proto(prefix, request.prefix)
        return int(self._call(self._stub.Create, request).reused_tokens)

    def share_prefix(self, seq_id: str, prefix: PrefixKeys) -> int:
        request = pb.SharePrefixRequest(seq_id=seq_id)
        codec.prefix_to_proto(prefix, request.prefix)
        return int(self._call(self._stub.SharePrefix, request).published)

    def positional_pages(self, seq_id: str, layer: int) -> np.ndarray:
        request = pb.PositionalPagesRequest(seq_id=seq_id, layer=layer)
        return codec.from_tensor(self._call(self._stub.PositionalPages, request).pages, "pages")

    def append(
        self, seq_id: str, layer: int, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> None:
        """keys, values ``[T, kv_heads, head_dim]``; positions ``[T]``; sent in chunks."""
        for rows in _chunks(len(positions), 2 * keys[:1].nbytes, limits.APPEND_CHUNK_BYTES):
            request = pb.AppendRequest(
                seq_id=seq_id,
                layer=layer,
                keys=codec.to_tensor(keys[rows]),
                values=codec.to_tensor(values[rows]),
                positions=codec.to_tensor(np.asarray(positions[rows], dtype=np.int64)),
            )
            self._call(self._stub.Append, request)

    def decode(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray,
    ) -> list[Selection]:
        """One layer's step for a batch: store each new token, then select its pages.

        Args:
            keys, values: ``[B, kv_heads, head_dim]``.
            positions: ``[B]``.
            queries: ``[B, q_heads, head_dim]``.
        """
        # pages by RPC: a stream sends the pages this client does not hold along with the
        # selections, which spares a ReadPages round trip per layer
        request = pb.DecodeRequest(layer=layer, seq_ids=seq_ids, push_pages=self.segment is None)
        codec.to_tensor(keys, request.keys)  # (filled in place: no copies of messages)
        codec.to_tensor(values, request.values)
        codec.to_tensor(np.asarray(positions, dtype=np.int64), request.positions)
        codec.to_tensor(queries, request.queries)
        self._pushed.pages = None  # what an earlier step pushed is not for this one's pages
        response = self._decode(request)
        if response.pushed.pages.shape:
            pushed = response.pushed
            self._pushed.pages = codec.from_tensor(pushed.pages, "pushed.pages")
            self._pushed.versions = codec.from_tensor(pushed.versions, "pushed.versions")
            self._pushed.data = codec.from_tensor(pushed.data, "pushed.data")
        return [codec.selection_from_proto(s) for s in response.selections]

    def append_step(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        """One layer's step for a batch that stores each new token and selects nothing
        (``append_only``, for a layer the worker attends to from its own copy): the same
        stream as ``decode``, without the queries out or a selection back."""
        request = pb.DecodeRequest(layer=layer, seq_ids=seq_ids, append_only=True)
        codec.to_tensor(keys, request.keys)
        codec.to_tensor(values, request.values)
        codec.to_tensor(np.asarray(positions, dtype=np.int64), request.positions)
        self._decode(request)

    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        """queries ``[q_heads, head_dim]`` -> the pages they attend, nothing stored."""
        request = pb.RetrieveRequest(seq_id=seq_id, layer=layer, queries=codec.to_tensor(queries))
        return codec.selection_from_proto(self._call(self._stub.Retrieve, request).selection)

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        """ids ``[n]`` -> page data ``[n, 2, page_size, head_dim]`` in one contiguous array.

        By RPC, pages the last decode on this thread brought along (``push_pages``) at the
        ``versions`` asked for are not read again.
        """
        pages = np.asarray(pages, dtype=np.int64)
        if self.segment is not None:
            return self.segment.gather(pages)
        out = np.empty((pages.size, *self.page_shape), dtype=DTYPES[self.info.pool.dtype])
        missing = np.arange(pages.size)
        pushed = self._pushed
        if versions is not None and pushed.pages is not None and pushed.pages.size:
            assert pushed.versions is not None and pushed.data is not None
            at = np.minimum(np.searchsorted(pushed.pages, pages), pushed.pages.size - 1)
            have = (pushed.pages[at] == pages) & (pushed.versions[at] == versions)
            out[have] = pushed.data[at[have]]
            missing = np.flatnonzero(~have)
        for start in range(0, missing.size, limits.READ_PAGES_MAX):
            rows = missing[start : start + limits.READ_PAGES_MAX]
            request = pb.ReadPagesRequest(pages=codec.to_tensor(pages[rows]))
            response = self._call(self._stub.ReadPages, request)
            out[rows] = codec.from_tensor(response.data, "data")
        return out

    def release(self, seq_id: str) -> None:
        self._call(self._stub.Release, pb.ReleaseRequest(seq_id=seq_id))

    def replica_of(self, seq_id: str) -> str:
        return self.address

    def holder_epoch(self, seq_id: str) -> int:
        return self.lease.epoch if self.lease is not None else 0

    def adopt(self, seq_id: str, replica: str, epoch: int, length: int, spec: SequenceSpec) -> int:
        if replica != self.address:
            raise AdoptionRefused(f"{replica} is not this client's cache service")
        request = pb.AdoptRequest(
            seq_id=seq_id, epoch=epoch, length=length, spec=codec.spec_to_proto(spec)
        )
        try:
            return int(self._call(self._stub.Adopt, request).ahead)
        except UnknownSequence as err:
            raise AdoptionRefused(f"sequence {seq_id!r} is not held by {replica}") from err

    # ---- extras --------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        s = self._call(self._stub.Stats, pb.StatsRequest())
        prefix = PrefixStats(
            s.prefix_blocks, s.prefix_pages, s.prefix_hits, s.prefix_tokens_reused,
            indexes=s.prefix_indexes, index_reuses=s.prefix_index_reuses,
        )  # fmt: skip
        return StoreStats(
            s.sequences, s.pages_used, s.pages_total, s.page_bytes, prefix, s.pages_shared,
            s.index_bytes,
        )  # fmt: skip

    def close(self) -> None:
        """End the decode stream and the lease (releasing what it holds), unmap the segment
        and close the channel."""
        with self._stream_lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        if self.lease is not None:
            self.lease.close()
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        self._channel.close()

    def __enter__(self) -> RemoteKVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers -------------------------------------------------------------------------
    def _lease_id(self) -> str:
        return self.lease.lease_id if self.lease is not None else ""

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        if self.lease is not None:
            self.lease.check()
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise wire_errors.error_from_status(err, self.address) from None

    def _decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        """On the stream when there is one to use (opening it if need be), else unary."""
        if self.lease is not None:
            self.lease.check()
        if time.monotonic() >= self._stream_after and self._stream_lock.acquire(blocking=False):
            try:
                response = self._decode_on_stream(request)
            finally:
                self._stream_lock.release()
            if response is not None:
                return response
        return self._call(self._stub.Decode, request)

    def _decode_on_stream(self, request: pb.DecodeRequest) -> pb.DecodeResponse | None:
        """The response, or ``None`` when the service refused the stream before reading
        the request (too many streams, or a service without ``DecodeStream``)."""
        if self._stream is None:
            try:
                self._stream = self._open_local() or DecodeStream(self._stub, self.timeout)
            except TooManyStreams as err:
                self._refused(str(err))
                return None
        stream = self._stream
        try:
            return stream.send(request)
        except BaseException as err:
            self._stream = None  # any failure ends the stream; the next step opens another
            stream.close()
            if not isinstance(err, grpc.RpcError):
                raise
            assert isinstance(stream, DecodeStream)
            refused = err.code() == grpc.StatusCode.UNIMPLEMENTED or (
                wire_errors.trailer(err).get(wire_errors.ERROR_KEY) == TooManyStreams.__name__
            )
            if stream.answered == 0 and refused:
                self._refused(err.details())
                return None
            if stream.timed_out:
                raise ConnectionError(
                    f"cache service at {self.address} did not answer a decode step within "
                    f"{self.timeout:g} s; check that it is running"
                ) from None
            raise wire_errors.error_from_status(err, self.address) from None

    def _open_local(self) -> LocalDecodeStream | None:
        """A local stream where one is to be had (else ``None``, and no more tries)."""
        if not self._local:
            return None
        try:
            stream = LocalDecodeStream.open(self._stub, self.address, self.timeout)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:  # else: a service before them
                raise wire_errors.error_from_status(err, self.address) from None
            stream = None
        if stream is None:
            self._local = False
            log.info("decode steps to %s go on a gRPC stream", self.address)
        return stream

    def _refused(self, details: str | None) -> None:
        """Use ``Decode`` calls for a while: the service refused a stream."""
        self._stream_after = time.monotonic() + self.STREAM_RETRY_S
        log.warning(
            "cache service at %s refused a decode stream (%s); using Decode calls",
            self.address,
            details,
        )

    def _map_segment(self) -> SegmentView | None:
        """The pool's segment mapped read-only, or ``None`` when it cannot be shared."""
        name, pool = self.info.segment.name, self.info.pool
        if not name or self.info.host_id != host.host_identity():
            return None
        try:
            return SegmentView(name, (pool.num_pages, *self.page_shape), pool.dtype)
        except (OSError, ImportError) as err:
            log.info("cannot map segment %s (%s); pages will come by RPC", name, err)
            return None


def _chunks(rows: int, row_bytes: int, limit: int) -> Iterator[slice]:
    """Slices of ``rows`` rows, each at most ``limit`` bytes (at least one row)."""
    step = max(1, limit // max(1, row_bytes))
    for start in range(0, max(rows, 1), step):
        yield slice(start, min(start + step, rows))
