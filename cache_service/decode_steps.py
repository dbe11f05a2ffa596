"""Decode steps at the wire: ``DecodeRequest`` -> ``Store.decode`` -> ``DecodeResponse``.

One translation for the three ways a step arrives: a ``Decode`` call, a ``DecodeStream``
message (which may carry the selected pages' data, ``push_pages``), and a local-stream frame
(:meth:`DecodeSteps.answer_frame`, the frame handler of ``cache_service.local_stream``).
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from cache_service import codec, limits
from cache_service.leases import LeaseTable, lease_of
from cache_service.local_stream import METHOD as LOCAL_METHOD
from cache_service.metrics import ServiceMetrics
from cache_service.refusals import CallContext, check_deadline, local_error, refusal
from cache_service.store import Store
from cache_service.types import Selection
from cache_service.wire_checks import floats, ints
from proto.icecache.v1 import cache_service_pb2 as pb

PUSH_MAX_BYTES = 16 * 2**20
"""Most page bytes one ``DecodeStream`` response carries for ``push_pages``."""
MAX_CARRIED = 2**18
"""Most pages a stream remembers having sent (then it forgets them all)."""


class DecodeSteps:
    """Applies decode steps from the wire to one store."""

    def __init__(
        self, store: Store, metrics: ServiceMetrics, limit: str, leases: LeaseTable | None = None
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.leases = leases
        """Whose sequences are whose; ``None``: no leases checked."""
        self.limit = limit
        """The pool's size, named by ``PoolExhausted`` errors (``refusals.pool_limit``)."""

    def decode(
        self,
        request: pb.DecodeRequest,
        context: CallContext,
        response: pb.DecodeResponse,
        carried: dict[int, int] | None = None,
    ) -> pb.DecodeResponse:
        """Apply a decode step; its selections go into ``response`` (returned).

        ``carried``: on a gRPC stream, page -> version of the page data it has sent (for
        ``push_pages``).
        """
        seq_ids = list(request.seq_ids)
        keys, values = floats(request.keys, "keys"), floats(request.values, "values")
        positions = ints(request.positions, "positions")
        queries = None if request.append_only else floats(request.queries, "queries")
        arrays = [keys, values, positions] + ([] if queries is None else [queries])
        for array in arrays:
            if array.ndim == 0 or len(array) != len(seq_ids):
                names = ["key", "value", "position", "query"][: len(arrays)]
                raise ValueError(
                    f"Decode needs one {', '.join(names[:-1])} and {names[-1]} per sequence "
                    f"({len(seq_ids)} ids): shapes {[tuple(a.shape) for a in arrays]}"
                )
        with self.store.lock:
            check_deadline(context)
            if self.leases is not None:
                self.leases.check(lease_of(context), seq_ids)
            if queries is None:
                self.store.append_step(request.layer, seq_ids, keys, values, positions)
                return response
            sels = self.store.decode(request.layer, seq_ids, keys, values, positions, queries)
            if carried is not None and request.push_pages:
                self._push(sels, carried, response.pushed)
        for sel in sels:
            codec.selection_to_proto(sel, response.selections.add())
        self.metrics.selected_pages.inc(sum(s.pages.size for s in sels))
        return response

    def answer_frame(self, frame: bytes, context: CallContext) -> pb.LocalReply:
        """The reply to one frame of a local stream: ``Decode``'s response, or its error."""
        reply = pb.LocalReply()
        try:
            check_deadline(context)
            self.decode(_decode_request(frame), context, reply.response)
        except Exception as err:  # noqa: BLE001 - every error becomes a status
            return pb.LocalReply(error=local_error(LOCAL_METHOD, refusal(err, self.limit)))
        return reply

    def _push(self, sels: list[Selection], carried: dict[int, int], out: pb.PageData) -> None:
        """Data of the selected pages not in ``carried`` at their version, into ``out``."""
        pages = np.concatenate([s.pages for s in sels])
        versions = np.concatenate([s.versions for s in sels])
        pages, first = np.unique(pages, return_index=True)
        versions = versions[first]
        new = [carried.get(p) != v for p, v in zip(pages.tolist(), versions.tolist(), strict=True)]
        limit = max(1, min(limits.READ_PAGES_MAX, PUSH_MAX_BYTES // self.store.pool.page_bytes))
        pages, versions = pages[new][:limit], versions[new][:limit]
        if len(carried) + pages.size > MAX_CARRIED:
            carried.clear()  # forgetting only costs sending a page again
        carried.update(zip(pages.tolist(), versions.tolist(), strict=True))
        data = self.store.read_pages(pages)
        codec.to_tensor(pages, out.pages)
        codec.to_tensor(versions, out.versions)
        codec.to_tensor(data, out.data)
        self.metrics.sent.labels("DecodeStream").inc(data.nbytes)


def _decode_request(frame: bytes) -> pb.DecodeRequest:
    """A local stream's frame as the ``DecodeRequest`` it must be."""
    try:
        return pb.DecodeRequest.FromString(frame)
    except DecodeError as err:
        raise ValueError(f"a local-stream frame is not a DecodeRequest: {err}") from None
