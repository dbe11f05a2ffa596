"""Translates ``icecache.v1.Worker`` calls into ``Generations`` calls and back.

The engine's KV store is seen here only through the ``KVClient`` contract (``replicas``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn

import grpc

from proto.icecache.v1 import worker_pb2 as pb
from proto.icecache.v1 import worker_pb2_grpc as pb_grpc
from worker.serving.generation import Generations, deadline_in


class WorkerServicer(pb_grpc.WorkerServicer):
    """Translates ``icecache.v1.Worker`` calls into ``Generations`` calls and back."""

    def __init__(self, generations: Generations, info: pb.WorkerInfoResponse) -> None:
        self.generations = generations
        self.info = info

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        try:
            call = self.generations.open(request, deadline_in(context.time_remaining()))
        except Exception as err:
            self._abort(context, err)
        context.add_callback(call.cancel)
        with call:
            try:
                yield from call.messages(context.is_active)
            except Exception as err:
                self._abort(context, err)

    def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.ServicerContext
    ) -> pb.CountTokensResponse:
        ids = self.generations.encode(request.prompt, request.chat)
        return pb.CountTokensResponse(
            tokens=len(ids), ids=ids, max_context=self.generations.max_context
        )

    def Info(
        self, request: pb.WorkerInfoRequest, context: grpc.ServicerContext
    ) -> pb.WorkerInfoResponse:
        info = pb.WorkerInfoResponse()
        info.CopyFrom(self.info)
        scheduler = self.generations.scheduler
        info.recovered_sequences = scheduler.recovered
        info.draining = self.generations.draining.is_set()
        for replica in scheduler.engine.kv.replicas():
            info.replicas.add(
                address=replica.address,
                healthy=replica.healthy,
                sequences=replica.sequences,
                placed_total=replica.placed_total,
            )
        return info

    def _abort(self, context: grpc.ServicerContext, err: BaseException) -> NoReturn:
        context.abort(self.generations.refuse(err), str(err))
        raise AssertionError("context.abort raises")  # pragma: no cover
