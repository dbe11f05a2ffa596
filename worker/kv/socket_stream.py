"""Decode steps on a same-host cache service's Unix socket (``OpenLocalStream``).

The same messages as a gRPC ``DecodeStream``, framed by ``cache_service.framing``, at a
fraction of a gRPC message's cost.
"""

from __future__ import annotations

import logging
import socket

from cache_service import framing, wire_errors
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class LocalDecodeStream:
    """A local stream (``OpenLocalStream``): ``send`` a request, get its response.

    The same contract as ``DecodeStream``, over the service's Unix socket: ``timeout`` s per
    step (then the connection is closed, and the service applies nothing it had not started);
    after any error the stream is over.
    """

    def __init__(self, sock: socket.socket, address: str, timeout: float | None) -> None:
        self._sock = sock
        self._frames = framing.FrameReader(sock)
        self.address = address
        self.timeout = timeout
        self.answered = 0
        """Responses received so far."""

    @classmethod
    def open(
        cls, stub: pb_grpc.CacheServiceStub, address: str, timeout: float | None
    ) -> LocalDecodeStream | None:
        """A stream the service accepted; ``None`` where it offers none or its socket is out
        of reach (another network namespace). Raises the service's refusal (e.g.
        ``TooManyStreams``) as its exception, ``grpc.RpcError`` if ``OpenLocalStream`` fails."""
        offer = stub.OpenLocalStream(pb.OpenLocalStreamRequest(), timeout=timeout)
        if not offer.socket:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect("\0" + offer.socket)
            except OSError as err:
                log.info("cannot reach local stream socket %s (%s)", offer.socket, err)
                sock.close()
                return None
            stream = cls(sock, address, timeout)
            stream._reply(offer.ticket)
        except BaseException:
            sock.close()
            raise
        return stream

    def send(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        """The response to ``request``; the service's error as its exception."""
        response = self._reply(request.SerializeToString()).response
        self.answered += 1
        return response

    def close(self) -> None:
        self._sock.close()

    def _reply(self, frame: bytes) -> pb.LocalReply:
        try:
            framing.write_frame(self._sock, frame)
            answer = self._frames.read()
        except TimeoutError:
            assert self.timeout is not None
            raise ConnectionError(
                f"cache service at {self.address} did not answer a decode step within "
                f"{self.timeout:g} s; check that it is running"
            ) from None
        except OSError as err:
            raise ConnectionError(
                f"the cache service at {self.address} ended the decode stream ({err})"
            ) from None
        if answer is None:
            raise ConnectionError(f"the cache service at {self.address} ended the decode stream")
        reply = pb.LocalReply.FromString(answer)
        if reply.HasField("error"):
            raise wire_errors.error_from_local(reply.error, self.address)
        return reply
