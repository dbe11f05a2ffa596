"""The engine's KV store behind gRPC: a client of ``python -m cache_service``.

Decode is one RPC per layer and step for the whole batch. Page data comes one of two ways,
chosen on connect (``transport="auto"``):

- ``shm``: the service runs on this host (same host identity) and its pool is a shared-memory
  segment this process can map: the segment is mapped read-only and ``read_pages`` gathers
  the pages straight from it into one contiguous staging array, with no RPC.
- ``rpc``: otherwise (another host, another container, or no segment), ``ReadPages`` carries
  the pages inside its responses.

Errors come back as the store's own exceptions with its message (see ``cache_service.codec``).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import grpc
import numpy as np

from cache_service import codec, security
from cache_service.page_pool import DTYPES
from cache_service.store import StoreStats
from cache_service.types import Selection, SequenceSpec
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Transport = Literal["auto", "shm", "rpc"]


class SegmentView:
    """A read-only mapping of the service's page data ``[num_pages, 2, page_size, head_dim]``.

    The mapping is not registered with ``multiprocessing``'s resource tracker, which would
    unlink a segment it merely saw attached when this process exits; the service owns it.
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        from _posixshmem import shm_open  # the primitive behind multiprocessing.shared_memory

        fd = shm_open("/" + name, os.O_RDONLY, 0)
        try:
            size = os.fstat(fd).st_size
            expected = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
            if size != expected:
                raise OSError(f"segment {name} has {size} bytes, the pool needs {expected}")
            self._mmap = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.name = name
        self.data: np.ndarray | None = np.ndarray(shape, DTYPES[dtype], buffer=self._mmap)

    def gather(self, pages: np.ndarray) -> np.ndarray:
        """Copy of ``pages`` ``[n]`` into one contiguous array ``[n, 2, page_size, head_dim]``."""
        assert self.data is not None, "segment view is closed"
        return np.take(self.data, pages, axis=0)

    def close(self) -> None:
        """Unmap (the segment itself stays; the service unlinks it)."""
        self.data = None
        self._mmap.close()


class RemoteKVClient:
    """``KVClient`` over gRPC; ``transport`` is ``shm`` or ``rpc`` once connected."""

    def __init__(
        self,
        channel: grpc.Channel,
        address: str,
        transport: Transport = "auto",
        timeout: float | None = 300.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = channel
        self._stub = pb_grpc.CacheServiceStub(channel)
        self.info = self._call(self._stub.Info, pb.InfoRequest())
        pool = self.info.pool
        self.page_size = int(pool.page_size)
        self.head_dim = int(pool.head_dim)
        self.page_shape = (2, self.page_size, self.head_dim)
        self.segment = self._map_segment() if transport in ("auto", "shm") else None
        if transport == "shm" and self.segment is None:
            raise ConnectionError(
                f"cannot map the page pool of the cache service at {address}: it is on another "
                "host or has no shared-memory segment; use transport='auto' or 'rpc'"
            )
        self.transport: Transport = "shm" if self.segment is not None else "rpc"
        log.info("connected to %s (pages via %s)", address, self.transport)

    @classmethod
    def connect(
        cls,
        address: str,
        transport: Transport = "auto",
        timeout: float | None = 300.0,
        connect_timeout: float = 10.0,
        auth: security.SecurityConfig | None = None,
    ) -> RemoteKVClient:
        """Open a channel to ``host:port`` and wait up to ``connect_timeout`` s for it.

        ``auth``: token and TLS settings; ``None`` reads ``ICECACHE_AUTH_TOKEN``,
        ``ICECACHE_TLS_CA`` ... from the environment (``cache_service.security``).
        """
        auth = security.security_from_env() if auth is None else auth
        channel = security.make_channel(address, auth, options=codec.CLIENT_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
            return cls(channel, address, transport, timeout)
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
    def create(self, seq_id: str, spec: SequenceSpec) -> None:
        request = pb.CreateRequest(seq_id=seq_id, spec=codec.spec_to_proto(spec))
        self._call(self._stub.Create, request)

    def append(
        self, seq_id: str, layer: int, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> None:
        """keys, values ``[T, kv_heads, head_dim]``; positions ``[T]``; sent in chunks."""
        for rows in _chunks(len(positions), 2 * keys[:1].nbytes, codec.APPEND_CHUNK_BYTES):
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
        request = pb.DecodeRequest(
            layer=layer,
            seq_ids=seq_ids,
            keys=codec.to_tensor(keys),
            values=codec.to_tensor(values),
            positions=codec.to_tensor(np.asarray(positions, dtype=np.int64)),
            queries=codec.to_tensor(queries),
        )
        response = self._call(self._stub.Decode, request)
        return [codec.selection_from_proto(s) for s in response.selections]

    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        """queries ``[q_heads, head_dim]`` -> the pages they attend, nothing stored."""
        request = pb.RetrieveRequest(seq_id=seq_id, layer=layer, queries=codec.to_tensor(queries))
        return codec.selection_from_proto(self._call(self._stub.Retrieve, request).selection)

    def read_pages(self, pages: np.ndarray) -> np.ndarray:
        """ids ``[n]`` -> page data ``[n, 2, page_size, head_dim]`` in one contiguous array."""
        pages = np.asarray(pages, dtype=np.int64)
        if self.segment is not None:
            return self.segment.gather(pages)
        out = np.empty((pages.size, *self.page_shape), dtype=DTYPES[self.info.pool.dtype])
        for start in range(0, pages.size, codec.READ_PAGES_MAX):
            part = pages[start : start + codec.READ_PAGES_MAX]
            request = pb.ReadPagesRequest(pages=codec.to_tensor(part))
            response = self._call(self._stub.ReadPages, request)
            out[start : start + part.size] = codec.from_tensor(response.data, "data")
        return out

    def release(self, seq_id: str) -> None:
        self._call(self._stub.Release, pb.ReleaseRequest(seq_id=seq_id))

    # ---- extras --------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        s = self._call(self._stub.Stats, pb.StatsRequest())
        return StoreStats(s.sequences, s.pages_used, s.pages_total, s.page_bytes)

    def close(self) -> None:
        """Unmap the segment and close the channel."""
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        self._channel.close()

    def __enter__(self) -> RemoteKVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers -------------------------------------------------------------------------
    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise codec.error_from_status(err, self.address) from None

    def _map_segment(self) -> SegmentView | None:
        """The pool's segment mapped read-only, or ``None`` when it cannot be shared."""
        name, pool = self.info.segment.name, self.info.pool
        if not name or self.info.host_id != codec.host_identity():
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
