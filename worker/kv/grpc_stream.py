"""Decode steps on one gRPC ``DecodeStream`` call, with a watchdog for steps left unanswered."""

from __future__ import annotations

import queue
import threading
import time

from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc


class DecodeStream:
    """One open ``DecodeStream`` call: ``send`` a request, get its response.

    A stream has no per-message deadline, so a watchdog thread cancels the call when a
    response takes longer than ``timeout`` s. The service refuses a step it gets to after the
    cancellation; one it was already applying may have been applied (as with a unary call
    whose reply is lost), so the caller treats the sequence as failed. After any error the
    stream is over.
    """

    def __init__(self, stub: pb_grpc.CacheServiceStub, timeout: float | None) -> None:
        self._requests: queue.SimpleQueue[pb.DecodeRequest | None] = queue.SimpleQueue()
        self._call = stub.DecodeStream(iter(self._requests.get, None))
        self.timeout = timeout
        self.answered = 0
        """Responses received so far."""
        self.timed_out = False
        self._sent_at: float | None = None
        self._closed = threading.Event()
        if timeout is not None:
            threading.Thread(target=self._watch, name="decode-stream-watchdog", daemon=True).start()

    def send(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        """The response to ``request``; ``grpc.RpcError`` if the stream failed."""
        self._sent_at = time.monotonic()
        self._requests.put(request)
        try:
            response = next(self._call)
        except StopIteration:
            raise ConnectionError("the cache service ended the decode stream") from None
        finally:
            self._sent_at = None
        self.answered += 1
        return response

    def close(self) -> None:
        """End the stream (the service sees the end of its requests)."""
        self._closed.set()
        self._requests.put(None)

    def _watch(self) -> None:
        assert self.timeout is not None
        tick = min(1.0, self.timeout / 4)
        while not self._closed.wait(tick):
            sent = self._sent_at
            if sent is not None and time.monotonic() - sent > self.timeout:
                self.timed_out = True
                self._call.cancel()
                return
