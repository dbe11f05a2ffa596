"""The gRPC face of a ``Store``: translates ``icecache.v1`` messages and delegates.

Every handler decodes its request with ``cache_service.codec``, checks what only the wire can
get wrong (``cache_service.wire_checks``), calls the store, and encodes the answer; an error
ends the call with its status (``cache_service.refusals``). Decode steps, wherever they
arrive from, are translated by ``cache_service.decode_steps``; open streams hold a slot of
``cache_service.stream_slots``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpc

from cache_service import codec, limits
from cache_service.decode_steps import DecodeSteps
from cache_service.leases import LeaseTable, lease_of
from cache_service.metrics import ServiceMetrics
from cache_service.refusals import Refused, abort, check_deadline, pool_limit, refusal
from cache_service.store import Store
from cache_service.stream_slots import StreamSlots
from cache_service.types import POLICIES, AdoptionRefused
from cache_service.wire_checks import check_id, check_spec, floats, ints
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

LEASE_METHODS = frozenset({"OpenLease", "RenewLease", "CloseLease"})
"""Methods that handle a lease themselves."""
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheService"].full_name
"""``icecache.v1.CacheService``: for health checking and reflection."""
DEFAULT_MAX_STREAMS = 32
"""Stream slots of a servicer given none (``--max-streams``' default)."""
DEFAULT_LEASE_TTL_S = 10.0
"""Lease TTL of a servicer given no lease table (``--lease-ttl-s``' default)."""

Handler = TypeVar("Handler", bound=Callable[..., Any])


class LocalOffer(Protocol):
    """Same-host decode streams as ``OpenLocalStream`` offers them."""

    name: str
    """The abstract Unix socket they listen on."""

    def ticket(self, lease: str = "") -> bytes:
        """A new one-time ticket for one connection, carrying ``lease``."""
        ...


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
    """``handler``'s answer to one request, timed in the metrics; an exception ends the call
    with its status."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        check_deadline(context)
        lease = lease_of(context)
        if lease and method not in LEASE_METHODS:
            servicer.leases.renew(lease)  # any traffic renews; an expired lease fails here
        return handler(servicer, request, context)
    except Exception as err:  # noqa: BLE001 - every error becomes a status
        refused = refusal(err, servicer.limit)
        code = refused.code
        abort(context, method, refused)
    finally:
        servicer.metrics.observe(method, code.name, time.perf_counter() - started)


class CacheServicer(pb_grpc.CacheServiceServicer):
    """Serves one store; ``info`` tells clients how to reach its page data."""

    def __init__(
        self,
        store: Store,
        metrics: ServiceMetrics,
        host_id: str,
        max_memory: int = 0,
        slots: StreamSlots | None = None,
        local: LocalOffer | None = None,
        leases: LeaseTable | None = None,
    ) -> None:
        self.store = store
        self.leases = leases if leases is not None else LeaseTable(DEFAULT_LEASE_TTL_S, 0.0)
        """Whose sequences are whose (``cache_service.leases``)."""
        self.metrics = metrics
        self.limit = pool_limit(store.pool, max_memory)
        self.slots = (
            slots if slots is not None else StreamSlots(DEFAULT_MAX_STREAMS, metrics.open_streams)
        )
        self.local = local
        """Same-host decode streams, when the service offers them."""
        self.steps = DecodeSteps(store, metrics, self.limit, self.leases)
        pool = store.pool
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
        check_id(request.seq_id)
        spec = codec.spec_from_proto(request.spec)
        check_spec(spec)
        prefix = codec.prefix_from_proto(request.prefix) if request.HasField("prefix") else None
        lease = lease_of(context)
        with self.store.lock:
            check_deadline(context)
            self.leases.check(lease, [request.seq_id])
            reused = self.store.create(request.seq_id, spec, prefix)
            self.leases.attach(lease, request.seq_id)
        log.info(
            "created %s",
            request.seq_id,
            extra={
                "seq_id": request.seq_id,
                "policy": spec.policy,
                "budget": spec.budget,
                "reused_tokens": reused,
            },
        )
        return pb.CreateResponse(reused_tokens=reused)

    @_rpc
    def SharePrefix(
        self, request: pb.SharePrefixRequest, context: grpc.ServicerContext
    ) -> pb.SharePrefixResponse:
        prefix = codec.prefix_from_proto(request.prefix)
        with self.store.lock:
            check_deadline(context)
            self.leases.check(lease_of(context), [request.seq_id])
            published = self.store.share_prefix(request.seq_id, prefix)
        return pb.SharePrefixResponse(published=published)

    @_rpc
    def PositionalPages(
        self, request: pb.PositionalPagesRequest, context: grpc.ServicerContext
    ) -> pb.PositionalPagesResponse:
        with self.store.lock:
            check_deadline(context)
            self.leases.check(lease_of(context), [request.seq_id])
            pages = self.store.positional_pages(request.seq_id, request.layer)
        return pb.PositionalPagesResponse(pages=codec.to_tensor(pages))

    @_rpc
    def Append(self, request: pb.AppendRequest, context: grpc.ServicerContext) -> pb.AppendResponse:
        keys, values = floats(request.keys, "keys"), floats(request.values, "values")
        positions = ints(request.positions, "positions")
        with self.store.lock:
            check_deadline(context)
            self.leases.check(lease_of(context), [request.seq_id])
            self.store.append(request.seq_id, request.layer, keys, values, positions)
        self.metrics.received.labels("Append").inc(keys.nbytes + values.nbytes)
        return pb.AppendResponse()

    @_rpc
    def Decode(self, request: pb.DecodeRequest, context: grpc.ServicerContext) -> pb.DecodeResponse:
        return self.steps.decode(request, context, pb.DecodeResponse())

    def DecodeStream(
        self, requests: Iterator[pb.DecodeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.DecodeResponse]:
        """``Decode`` of each request in turn; a failed one ends the stream with its status."""
        if not self.slots.acquire("grpc"):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self.metrics.observe("DecodeStream", code.name, 0.0)
            abort(context, "DecodeStream", Refused(code, self.slots.refusal()))
        carried: dict[int, int] = {}  # page -> version this stream sent (``push_pages``)

        def decode(servicer: CacheServicer, request: pb.DecodeRequest, context: Any) -> Any:
            return servicer.steps.decode(request, context, pb.DecodeResponse(), carried)

        try:
            for request in requests:
                yield _serve(self, "DecodeStream", decode, request, context)
        finally:
            self.slots.release("grpc")

    @_rpc
    def OpenLocalStream(
        self, request: pb.OpenLocalStreamRequest, context: grpc.ServicerContext
    ) -> pb.OpenLocalStreamResponse:
        if self.local is None:
            return pb.OpenLocalStreamResponse()
        ticket = self.local.ticket(lease_of(context))
        return pb.OpenLocalStreamResponse(socket=self.local.name, ticket=ticket)

    @_rpc
    def Retrieve(
        self, request: pb.RetrieveRequest, context: grpc.ServicerContext
    ) -> pb.RetrieveResponse:
        queries = floats(request.queries, "queries")
        with self.store.lock:
            check_deadline(context)
            sel = self.store.retrieve(request.seq_id, request.layer, queries)
        self.metrics.selected_pages.inc(sel.pages.size)
        return pb.RetrieveResponse(selection=codec.selection_to_proto(sel))

    @_rpc
    def ReadPages(
        self, request: pb.ReadPagesRequest, context: grpc.ServicerContext
    ) -> pb.ReadPagesResponse:
        pages = ints(request.pages, "pages")
        num_pages = self.store.pool.num_pages
        if pages.ndim != 1:
            raise ValueError(f"pages must be one-dimensional [n], got shape {pages.shape}")
        if pages.size > limits.READ_PAGES_MAX:
            raise ValueError(f"ReadPages takes at most {limits.READ_PAGES_MAX} pages per call")
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
            check_deadline(context)
            self.leases.check(lease_of(context), [request.seq_id])
            self.store.release(request.seq_id)
            self.leases.detach(request.seq_id)
        log.info("released %s", request.seq_id, extra={"seq_id": request.seq_id})
        return pb.ReleaseResponse()

    @_rpc
    def Adopt(self, request: pb.AdoptRequest, context: grpc.ServicerContext) -> pb.AdoptResponse:
        check_id(request.seq_id)
        lease = lease_of(context)
        if not lease:
            raise ValueError("Adopt needs the caller's lease (metadata icecache-lease)")
        with self.store.lock:
            check_deadline(context)
            if request.seq_id not in self.store:
                raise AdoptionRefused(f"sequence {request.seq_id!r} is not held here (released?)")
            spec = self.store.spec(request.seq_id)
            if codec.spec_from_proto(request.spec) != spec:
                raise AdoptionRefused(
                    f"sequence {request.seq_id!r} was created with another spec ({spec}); "
                    "rebuild it"
                )
            layers = spec.num_layers
            lengths = [self.store.length(request.seq_id, layer) for layer in range(layers)]
            ahead = sum(n == request.length + 1 for n in lengths)
            expected = [request.length + 1] * ahead + [request.length] * (layers - ahead)
            if lengths != expected:
                raise AdoptionRefused(
                    f"sequence {request.seq_id!r} holds {lengths} tokens in its layers where "
                    f"{request.length} (or one more in the first layers) are expected; "
                    "rebuild it"
                )
            self.store.check_usable(request.seq_id)
            self.leases.adopt(lease, request.seq_id, request.epoch)
        log.info(
            "lease %s adopted %s (%d layer(s) a token ahead)", lease, request.seq_id, ahead,
            extra={"lease": lease, "seq_id": request.seq_id},
        )  # fmt: skip
        return pb.AdoptResponse(ahead=ahead)

    @_rpc
    def OpenLease(
        self, request: pb.OpenLeaseRequest, context: grpc.ServicerContext
    ) -> pb.OpenLeaseResponse:
        lease = self.leases.open(request.holder)
        log.info(
            "opened lease %s for %s",
            lease.lease_id,
            request.holder or "?",
            extra={"lease": lease.lease_id, "holder": request.holder},
        )
        return pb.OpenLeaseResponse(
            lease_id=lease.lease_id,
            epoch=lease.epoch,
            ttl_s=self.leases.ttl_s,
            grace_s=self.leases.grace_s,
        )

    @_rpc
    def RenewLease(
        self, request: pb.RenewLeaseRequest, context: grpc.ServicerContext
    ) -> pb.RenewLeaseResponse:
        self.leases.renew(request.lease_id)
        return pb.RenewLeaseResponse()

    @_rpc
    def CloseLease(
        self, request: pb.CloseLeaseRequest, context: grpc.ServicerContext
    ) -> pb.CloseLeaseResponse:
        with self.store.lock:
            seq_ids = self.leases.close(request.lease_id)
            for seq_id in seq_ids:
                if seq_id in self.store:
                    self.store.release(seq_id)
        log.info(
            "closed lease %s, released %d sequence(s)",
            request.lease_id,
            len(seq_ids),
            extra={"lease": request.lease_id, "released": len(seq_ids)},
        )
        return pb.CloseLeaseResponse(released=len(seq_ids))

    @_rpc
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        stats = self.store.stats()
        return pb.StatsResponse(
            sequences=stats.sequences,
            pages_used=stats.pages_used,
            pages_total=stats.pages_total,
            page_bytes=stats.page_bytes,
            bytes_used=stats.bytes_used,
            prefix_blocks=stats.prefix.blocks,
            prefix_pages=stats.prefix.pages,
            prefix_hits=stats.prefix.hits,
            prefix_tokens_reused=stats.prefix.tokens_reused,
            pages_shared=stats.pages_shared,
            prefix_indexes=stats.prefix.indexes,
            prefix_index_reuses=stats.prefix.index_reuses,
            index_bytes=stats.index_bytes,
        )
