"""Local streams (``OpenLocalStream``) at the wire: tickets, frames, bad input, limits.

Real service (and, once, ``LocalStreams`` alone with a stub frame handler), real abstract Unix
sockets; the client side here speaks the frame protocol by
hand, as any client implementing the .proto would. (Decoding through ``RemoteKVClient`` on
a local stream, errors, time-outs, fall-backs and shutdown: ``test_servicer.py``.)
"""

import os
import socket
import struct
import time

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge

from cache_service import codec, framing, limits, local_stream, wire_errors
from cache_service.config import CacheServiceConfig
from cache_service.local_stream import LocalStreams
from cache_service.server import serve
from cache_service.stream_slots import StreamSlots
from cache_service.types import SequenceSpec, UnknownSequence
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

DIM = 64
SPEC = SequenceSpec(2, 2, 4, DIM, policy="quest", budget=32, dense_layers=1)


@pytest.fixture(scope="module")
def service():
    server = serve(CacheServiceConfig(port=0, max_memory=8 * 2**20, workers=2))
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield pb_grpc.CacheServiceStub(channel)


def _dial(offer):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect("\0" + offer.socket)
    return sock


def _reply(sock, frame):
    framing.write_frame(sock, frame)
    return pb.LocalReply.FromString(framing.FrameReader(sock).read())  # (one frame in flight)


def _closed(sock):
    """Whether the service closed the connection (the next read is the end)."""
    return sock.recv(1) == b""


def _handshake(stub):
    offer = stub.OpenLocalStream(pb.OpenLocalStreamRequest())
    sock = _dial(offer)
    reply = _reply(sock, offer.ticket)
    assert not reply.HasField("error") and not reply.HasField("response")
    return sock


def _decode_request(seq_id, position, rng):
    kv = rng.standard_normal((2, 1, 2, DIM), np.float32)
    queries = rng.standard_normal((1, 4, DIM), np.float32)
    return pb.DecodeRequest(
        layer=0,
        seq_ids=[seq_id],
        keys=codec.to_tensor(kv[0]),
        values=codec.to_tensor(kv[1]),
        positions=codec.to_tensor(np.array([position])),
        queries=codec.to_tensor(queries),
    )


def test_the_offer_names_an_abstract_socket_and_a_fresh_ticket_each_time(stub, service):
    first = stub.OpenLocalStream(pb.OpenLocalStreamRequest())
    second = stub.OpenLocalStream(pb.OpenLocalStreamRequest())
    assert first.socket == second.socket == service.local.name
    assert first.socket.startswith("icecache_") and first.socket.endswith(".decode")
    assert len(first.ticket) == 32 and first.ticket != second.ticket


def test_a_ticket_admits_one_connection_once(stub):
    offer = stub.OpenLocalStream(pb.OpenLocalStreamRequest())
    sock = _dial(offer)
    assert not _reply(sock, offer.ticket).HasField("error")
    sock.close()
    again = _dial(offer)
    reply = _reply(again, offer.ticket)
    assert reply.error.code == "UNAUTHENTICATED" and "used or expired" in reply.error.message
    assert _closed(again)
    again.close()


@pytest.mark.parametrize("ticket", [b"", b"\0" * 32, b"not a ticket"])
def test_a_connection_without_a_good_ticket_is_refused_and_closed(stub, ticket):
    sock = _dial(stub.OpenLocalStream(pb.OpenLocalStreamRequest()))
    reply = _reply(sock, ticket)
    assert reply.error.code == "UNAUTHENTICATED" and "OpenLocalStream" in reply.error.message
    assert _closed(sock)
    sock.close()


def test_an_expired_ticket_is_refused(stub, monkeypatch):
    monkeypatch.setattr(local_stream, "TICKET_TTL_S", 0.0)
    offer = stub.OpenLocalStream(pb.OpenLocalStreamRequest())
    sock = _dial(offer)
    assert _reply(sock, offer.ticket).error.code == "UNAUTHENTICATED"
    sock.close()


def test_unused_tickets_are_capped(monkeypatch):
    monkeypatch.setattr(local_stream, "MAX_TICKETS", 3)
    server = serve(CacheServiceConfig(port=0, max_memory=8 * 2**20, workers=2))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CacheServiceStub(channel)
            monkeypatch.setattr(local_stream, "TICKET_TTL_S", 0.0)
            for _ in range(4):  # expired ones are dropped to make room
                stub.OpenLocalStream(pb.OpenLocalStreamRequest())
            monkeypatch.setattr(local_stream, "TICKET_TTL_S", 60.0)
            for _ in range(3):
                stub.OpenLocalStream(pb.OpenLocalStreamRequest())
            with pytest.raises(grpc.RpcError) as err:
                stub.OpenLocalStream(pb.OpenLocalStreamRequest())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tickets are unused" in err.value.details()
            assert wire_errors.trailer(err.value)[wire_errors.ERROR_KEY] == "TooManyStreams"
    finally:
        server.stop(0)


def test_a_client_that_sends_no_ticket_is_disconnected(stub, monkeypatch):
    monkeypatch.setattr(local_stream, "HANDSHAKE_TIMEOUT_S", 0.2)
    sock = _dial(stub.OpenLocalStream(pb.OpenLocalStreamRequest()))
    started = time.monotonic()
    assert _closed(sock)
    assert time.monotonic() - started < 5
    sock.close()


def test_steps_answer_like_decode_and_errors_close_the_stream(stub, service):
    rng = np.random.default_rng(0)
    stub.Create(pb.CreateRequest(seq_id="wire", spec=codec.spec_to_proto(SPEC)))
    kv = rng.standard_normal((2, 40, 2, DIM), np.float32)
    append = pb.AppendRequest(
        seq_id="wire",
        layer=0,
        keys=codec.to_tensor(kv[0]),
        values=codec.to_tensor(kv[1]),
        positions=codec.to_tensor(np.arange(40)),
    )
    stub.Append(append)
    sock = _handshake(stub)
    reply = _reply(sock, _decode_request("wire", 40, rng).SerializeToString())
    (selection,) = reply.response.selections
    assert codec.selection_from_proto(selection).lens.sum() == 2 * 41  # dense: all, 2 KV heads
    reply = _reply(sock, _decode_request("ghost", 0, rng).SerializeToString())
    err = wire_errors.error_from_local(reply.error, "here")
    assert isinstance(err, UnknownSequence) and err.args[0] == "ghost"
    assert _closed(sock)
    sock.close()
    # a position that does not continue the layer: the store's message, nothing applied
    sock = _handshake(stub)
    reply = _reply(sock, _decode_request("wire", 45, rng).SerializeToString())
    assert reply.error.code == "FAILED_PRECONDITION" and reply.error.error == "OutOfOrder"
    assert "must continue at 41" in reply.error.message
    sock.close()
    stub.Release(pb.ReleaseRequest(seq_id="wire"))


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (b"\xff\xff\xff", "not a DecodeRequest"),  # unparseable bytes
        (pb.DecodeRequest(layer=0, seq_ids=["a"]).SerializeToString(), "keys: dtype"),
    ],
)
def test_a_frame_that_is_no_valid_request_is_an_invalid_argument(stub, frame, says):
    sock = _handshake(stub)
    reply = _reply(sock, frame)
    assert reply.error.code == "INVALID_ARGUMENT" and says in reply.error.message
    assert _closed(sock)
    sock.close()


def test_a_frame_over_the_message_limit_is_refused_unread(stub):
    sock = _handshake(stub)
    sock.sendall(struct.pack("<I", limits.MAX_MESSAGE_BYTES + 1))
    reply = pb.LocalReply.FromString(framing.FrameReader(sock).read())
    assert reply.error.code == "INVALID_ARGUMENT" and "over the" in reply.error.message
    assert _closed(sock)
    sock.close()


def test_a_stream_cut_inside_a_frame_ends_quietly_and_frees_its_slot(stub, service):
    sock = _handshake(stub)
    sock.sendall(struct.pack("<I", 100) + b"only part")
    sock.close()
    deadline = time.monotonic() + 10
    while service.local.connections:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sample = {"kind": "local"}
    assert service.metrics.registry.get_sample_value("icecache_open_streams", sample) == 0


def test_frames_round_trip_and_a_cut_frame_is_an_error():
    a, b = socket.socketpair()
    with a, b:
        frames = framing.FrameReader(b)
        framing.write_frame(a, b"")
        framing.write_frame(a, b"x" * 100_000)  # more than one read's worth
        framing.write_frame(a, b"after")  # arrives with the one before: kept for the next read
        assert frames.read() == b""
        assert frames.read() == b"x" * 100_000
        assert frames.read() == b"after"
        a.sendall(struct.pack("<I", 10) + b"12345")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(framing.FrameError, match="5 bytes short of a frame"):
            frames.read()
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\1\0")
        a.close()
        with pytest.raises(framing.FrameError, match="2 bytes short of a frame"):  # in the header
            framing.FrameReader(b).read()
    a, b = socket.socketpair()
    with a, b:
        a.close()
        assert framing.FrameReader(b).read() is None  # the end between frames
    with pytest.raises(ValueError, match="over the"):
        framing.write_frame(socket.socket(), b"\0" * (limits.MAX_MESSAGE_BYTES + 1))


def test_local_streams_need_only_stream_slots_a_frame_handler_and_a_recorder():
    registry = CollectorRegistry()
    slots = StreamSlots(1, Gauge("open", "open streams", ["kind"], registry=registry))
    observed = []

    def answer(frame, context):
        if frame == b"bad":
            return pb.LocalReply(error=pb.LocalError(code="INVALID_ARGUMENT", message="bad"))
        return pb.LocalReply()

    def observe(method, code, seconds):
        observed.append((method, code))

    streams = LocalStreams(f"icecache-test-{os.getpid()}.decode", slots, answer, observe)
    try:
        sock = _dial(pb.OpenLocalStreamResponse(socket=streams.name))
        assert not _reply(sock, streams.ticket()).HasField("error")
        assert registry.get_sample_value("open", {"kind": "local"}) == 1
        refused = _dial(pb.OpenLocalStreamResponse(socket=streams.name))
        reply = _reply(refused, streams.ticket())  # the one slot is held
        assert reply.error.code == "RESOURCE_EXHAUSTED" and reply.error.error == "TooManyStreams"
        assert reply.error.message == str(slots.refusal())
        assert _closed(refused)
        refused.close()
        assert not _reply(sock, b"good").HasField("error")
        assert _reply(sock, b"bad").error.message == "bad"
        assert _closed(sock)
        sock.close()
        deadline = time.monotonic() + 10
        while streams.connections:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert registry.get_sample_value("open", {"kind": "local"}) == 0
        assert observed == [
            ("LocalStream", "RESOURCE_EXHAUSTED"),
            ("LocalStream", "OK"),
            ("LocalStream", "INVALID_ARGUMENT"),
        ]
    finally:
        streams.stop(0)
