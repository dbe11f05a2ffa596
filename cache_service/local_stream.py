"""Same-host decode streams: ``DecodeStream``'s messages on a Unix socket instead of gRPC.

A worker on the service's host decodes layer after layer, one request and one answer per
layer and step, so the cost of a round trip is paid ~30 times per token. Over a gRPC stream
a message wakes several threads at each end (the client's request feeder and channel poller,
the server's poller and handler): ~1 ms per round trip on a 2-vCPU VM. Here a dedicated
thread per connection reads a frame, answers it with the frame handler it was given (the
same translation as ``Decode``: ``DecodeSteps.answer_frame``), and writes a frame back, so a
round trip is one socket write and one read each way.

The protocol (``OpenLocalStream`` in the .proto): the client gets a socket name and a
one-time ticket over gRPC (so auth applies), connects to the Linux abstract socket, sends the
ticket and reads an empty ``LocalReply``; then ``DecodeRequest`` frames, each answered by a
``LocalReply`` frame. Abstract sockets leave nothing on disk to clean up after a crash and
are reachable only within the service's network namespace; a client that cannot connect
uses ``DecodeStream``. Open local streams count against ``--max-streams`` with the gRPC ones.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable

import grpc

from cache_service import framing
from cache_service.stream_slots import StreamSlots
from cache_service.types import TooManyStreams
from proto.icecache.v1 import cache_service_pb2 as pb

log = logging.getLogger(__name__)

METHOD = "LocalStream"
"""The method label of local-stream requests in the metrics."""
TICKET_TTL_S = 60.0
"""Seconds a ticket from ``OpenLocalStream`` stays good."""
MAX_TICKETS = 1024
"""Most unused tickets held at once; ``OpenLocalStream`` beyond it is RESOURCE_EXHAUSTED
(``TooManyStreams``: its client decodes with ``Decode`` calls for a while)."""
HANDSHAKE_TIMEOUT_S = 10.0
"""Seconds a new connection has to send its ticket."""
EXTRA_CONNECTIONS = 16
"""Connections accepted beyond ``--max-streams`` (for tickets and refusals in flight)."""


class LocalContext:
    """What a frame handler asks of its call (``time_remaining``, ``is_active``), for a
    connection.

    A local stream has no deadline; it is cancelled by its client hanging up, which a step
    that waited for the store sees before it applies anything.
    """

    def __init__(self, conn: socket.socket, lease: str = "") -> None:
        self._poll = select.poll()
        self._poll.register(conn, select.POLLRDHUP)
        self.lease = lease
        """The lease of the ``OpenLocalStream`` call whose ticket opened the stream."""

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        """Whether the client is still there (it has not closed or shut down its end)."""
        return not self._poll.poll(0)


FrameHandler = Callable[[bytes, LocalContext], pb.LocalReply]
"""The reply to one ``DecodeRequest`` frame of a connection: a response, or an error (which
ends the stream)."""
Observe = Callable[[str, str, float], None]
"""Records one finished request: method, status code name, seconds (``ServiceMetrics``)."""


class LocalStreams:
    """Listens on an abstract Unix socket and serves each connection on a thread of its own.

    ``slots``: the stream slots shared with gRPC streams; ``answer``: the frame handler;
    ``observe``: where each request's status and time go, once its reply is on its way.
    """

    def __init__(
        self, name: str, slots: StreamSlots, answer: FrameHandler, observe: Observe
    ) -> None:
        self.name = name
        self._slots = slots
        self._answer = answer
        self._observe = observe
        self._tickets: dict[bytes, tuple[float, str]] = {}  # ticket -> (expires, lease)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a connection ended
        self._closed = False
        self._limit = slots.limit + EXTRA_CONNECTIONS
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind("\0" + name)
            self._listener.listen(64)
        except BaseException:
            self._listener.close()
            raise
        self._thread = threading.Thread(target=self._accept, name="local-streams", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """Connections open now (streams, and clients still presenting their ticket)."""
        return len(self._conns)

    def ticket(self, lease: str = "") -> bytes:
        """A new one-time ticket for one connection within ``TICKET_TTL_S``; the stream it
        opens carries ``lease`` (the lease id of the call that asked for it)."""
        now = time.monotonic()
        ticket = secrets.token_bytes(32)
        with self._lock:
            if len(self._tickets) >= MAX_TICKETS:
                self._tickets = {t: v for t, v in self._tickets.items() if v[0] > now}
            if len(self._tickets) >= MAX_TICKETS:
                raise TooManyStreams(
                    f"{MAX_TICKETS} local-stream tickets are unused; connect with the ones "
                    "issued before asking for more"
                )
            self._tickets[ticket] = (now + TICKET_TTL_S, lease)
        return ticket

    def stop(self, grace: float | None) -> None:
        """Accept no more connections, give open ones ``grace`` s to close, then end them.

        Returns once every connection's thread is done with the store.
        """
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        self._thread.join()
        with self._changed:
            self._changed.wait_for(lambda: not self._conns, timeout=grace or 0)
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # its thread reads the end of the stream
            if not self._changed.wait_for(lambda: not self._conns, timeout=30):
                log.error("%d local streams did not end", len(self._conns))

    # ---- connections ---------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                if self._closed or len(self._conns) >= self._limit:
                    conn.close()
                    if self._closed:
                        return
                    log.warning("refused a local connection: %d are open", len(self._conns))
                    continue
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="local-stream", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        holding = False
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            frames = framing.FrameReader(conn)
            refusal, lease = self._admit(frames.read())
            if refusal is not None:
                _send(conn, pb.LocalReply(error=refusal))
                return
            holding = True
            conn.settimeout(None)
            _send(conn, pb.LocalReply())
            context = LocalContext(conn, lease)
            while (frame := frames.read()) is not None:
                started = time.perf_counter()
                reply = self._answer(frame, context)
                seconds = time.perf_counter() - started
                try:
                    _send(conn, reply)
                finally:  # off the client's wait
                    self._observe(METHOD, reply.error.code or grpc.StatusCode.OK.name, seconds)
                if reply.HasField("error"):
                    return
        except framing.FrameError as err:
            error = pb.LocalError(code=grpc.StatusCode.INVALID_ARGUMENT.name, message=str(err))
            log.info("local stream refused: %s", err, extra={"method": METHOD})
            _send_quietly(conn, pb.LocalReply(error=error))
        except OSError as err:  # the client went away (or the service is stopping)
            log.debug("local stream ended: %s", err, extra={"method": METHOD})
        finally:
            if holding:
                self._slots.release("local")
            conn.close()
            with self._changed:
                self._conns.discard(conn)
                self._changed.notify_all()

    def _admit(self, ticket: bytes | None) -> tuple[pb.LocalError | None, str]:
        """``(None, lease)`` when ``ticket`` is good and a stream is free (now held); else
        why not."""
        now = time.monotonic()
        with self._lock:
            expires, lease = self._tickets.pop(ticket, (0.0, "")) if ticket else (0.0, "")
        if expires <= now:
            code = grpc.StatusCode.UNAUTHENTICATED
            self._observe(METHOD, code.name, 0.0)
            return pb.LocalError(
                code=code.name,
                message="the local-stream ticket is unknown, used or expired; ask "
                "OpenLocalStream for a new one and send it first",
            ), ""
        if not self._slots.acquire("local"):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self._observe(METHOD, code.name, 0.0)
            err = self._slots.refusal()
            return pb.LocalError(code=code.name, message=str(err), error=type(err).__name__), ""
        return None, lease


def _send(conn: socket.socket, reply: pb.LocalReply) -> None:
    framing.write_frame(conn, reply.SerializeToString())


def _send_quietly(conn: socket.socket, reply: pb.LocalReply) -> None:
    """``_send`` to a client that may be gone already."""
    with contextlib.suppress(OSError):
        _send(conn, reply)
