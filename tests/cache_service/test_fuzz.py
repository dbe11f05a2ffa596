"""Property-based fuzzing of a live cache service with random and mutated messages.

Each hypothesis example drives a few sequences through a batch of ~40 requests: well-formed
ones built from a model of what the service holds, and mutations of them that are wrong in
one known way, plus raw garbage bytes. Decodes go a third each as unary calls, on a gRPC
``DecodeStream`` and on a local stream. Facts checked:

- a mutated request gets exactly the status its mutation calls for, never OK or INTERNAL;
- a well-formed request succeeds, or is refused for memory (RESOURCE_EXHAUSTED) having
  changed nothing: later well-formed requests, built from the model, still fit;
- after the example releases its sequences, the service holds no sequence and no page;
- afterwards the service still answers correctly, and leaves no shared memory behind.
"""

import itertools
import queue
import socket
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_service import codec, framing, wire_errors
from cache_service.config import CacheServiceConfig
from cache_service.page_pool import PagePool
from cache_service.server import SHM_DIR, serve
from cache_service.store import Store
from cache_service.types import SequenceSpec
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

DIM, PAGE, PAGES = 8, 4, 160  # small: the fuzz must reach the ceiling
POLICIES = (
    "full", "oracle", "icecache", "icecache-r", "icecache-tokens", "quest", "kmeans", "streaming",
)  # fmt: skip
OK, BAD, MISSING, EXISTS, ORDER, FULL = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
OPS = ("create", "append", "append", "append", "decode", "decode", "decode", "retrieve", "read")
OPS += ("release", "stats", "garbage")
COUNTS: dict[str, int] = {"messages": 0, "ok": 0, "refused_full": 0, "failed_seq": 0}


@dataclass
class Seq:
    spec: SequenceSpec
    lengths: list[int]
    flushed: list[bool]
    failed: bool = False


@dataclass
class Model:
    """What the service should hold for this example."""

    prefix: str
    seqs: dict[str, Seq] = field(default_factory=dict)
    names: itertools.count = field(default_factory=itertools.count)


@pytest.fixture(scope="module")
def service():
    config = CacheServiceConfig(
        port=0, max_memory=PAGES * 2 * PAGE * DIM * 4, page_size=PAGE, head_dim=DIM, workers=4
    )
    server = serve(config)
    yield server
    name = server.store.pool.shm_name
    server.stop(0)
    assert not (SHM_DIR / name).exists()


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield pb_grpc.CacheServiceStub(channel), channel


def _leader(spec, layer):
    if spec.policy != "icecache-r" or layer < spec.dense_layers:
        return None
    offset = (layer - spec.dense_layers) % spec.reuse_group
    return layer - offset if offset else None


def _spec(rng):
    kv = int(rng.integers(1, 3))
    budget = int(rng.choice([4 * PAGE, 6 * PAGE, 10 * PAGE]))
    policy = str(rng.choice(POLICIES))
    return SequenceSpec(
        num_layers=int(rng.integers(1, 5)),
        num_kv_heads=kv,
        num_q_heads=kv * int(rng.integers(1, 3)),
        head_dim=DIM,
        policy=policy,
        budget=None if policy == "full" and rng.random() < 0.5 else budget,
        dense_layers=int(rng.integers(0, 2)),
        reuse_group=int(rng.integers(1, 4)),
        seed=int(rng.integers(0, 100)),
    )


def _tensor(array):
    return codec.to_tensor(np.ascontiguousarray(array))


def _mutate_tensor(rng, tensor):
    """One way to break a tensor; returns the broken copy."""
    out = pb.Tensor()
    out.CopyFrom(tensor)
    kind = int(rng.integers(0, 5))
    if kind in (1, 3) and len(out.data) < 4:
        kind = 4
    if kind == 0:
        out.dtype = str(rng.choice(["int32", "", "float64", "bfloat16"]))
    elif kind == 1:
        out.data = out.data[: max(0, len(out.data) - int(rng.integers(1, 9)))]
    elif kind == 2:
        out.shape.append(2)
    elif kind == 3 and out.dtype == "float32":
        values = np.frombuffer(out.data, np.float32).copy()
        values[int(rng.integers(0, values.size))] = rng.choice([np.nan, np.inf, 1e9])
        out.data = values.tobytes()
    else:
        del out.shape[:]
        out.shape.extend([len(out.data) + 1])
    return out


def _layer_to_append(seq):
    """A layer and token count that keep icecache-r followers in step with their leader."""
    top = max(seq.lengths)
    for layer, length in enumerate(seq.lengths):
        if length < top:
            return layer, top - length
    return 0, None


def _ready_to_select(seq, layer, appending):
    leader = _leader(seq.spec, layer)
    if leader is None:
        return True
    return seq.flushed[leader] and seq.lengths[layer] + appending == seq.lengths[leader]


def _build(rng, model, op):
    """(method name, request, expected codes, effect on success) for one fuzz message."""
    live = [s for s in model.seqs if not model.seqs[s].failed]
    mutate = rng.random() < 0.4
    if op == "create" or (not live and op in ("append", "decode", "retrieve", "release")):
        seq_id = f"{model.prefix}-{next(model.names)}"
        spec = _spec(rng)
        request = pb.CreateRequest(seq_id=seq_id, spec=codec.spec_to_proto(spec))
        effect = ("create", seq_id, spec)
        if not mutate:
            return "Create", request, {OK, FULL}, effect
        kind = int(rng.integers(0, 4))
        if kind == 0 and model.seqs:
            request.seq_id = str(rng.choice(list(model.seqs)))
            return "Create", request, {EXISTS}, None
        if kind == 1:
            request.seq_id = str(rng.choice(["", "x" * 300, "tab\there", "ünïcode"]))
            return "Create", request, {BAD}, None
        field_name, value = [
            ("num_layers", int(rng.choice([0, -3, 5000]))),
            ("head_dim", DIM + 1),
            ("policy", "bogus"),
            ("budget", 1),
            ("num_q_heads", 0),
            ("seed", -1),
            ("reuse_group", 0),
            ("sink_tokens", PAGE + 1),
        ][int(rng.integers(0, 8))]
        setattr(request.spec, field_name, value)
        return "Create", request, {BAD}, None
    if op in ("append", "decode", "retrieve", "release"):
        seq_id = str(rng.choice(live))
        seq = model.seqs[seq_id]
        spec = seq.spec
    if op == "append":
        layer, tokens = _layer_to_append(seq)
        tokens = tokens or int(rng.integers(0, 8 * PAGE))
        keys, values = rng.standard_normal((2, tokens, spec.num_kv_heads, DIM), np.float32)
        positions = np.arange(seq.lengths[layer], seq.lengths[layer] + tokens)
        request = pb.AppendRequest(
            seq_id=seq_id,
            layer=layer,
            keys=_tensor(keys),
            values=_tensor(values),
            positions=_tensor(positions),
        )
        effect = ("append", seq_id, layer, tokens)
        if not mutate:
            return "Append", request, {OK, FULL}, effect
        return _mutate_request(rng, request, spec, "Append")
    if op == "decode":
        low = min(seq.lengths)
        layer = seq.lengths.index(low)  # the engine's order: layer by layer, one token each
        if max(seq.lengths) - low > 1 or not _ready_to_select(seq, layer, 1):
            return "Stats", pb.StatsRequest(), {OK}, None
        rows = (1, spec.num_kv_heads, DIM)
        keys, values = rng.standard_normal((2, *rows), np.float32)
        queries = rng.standard_normal((1, spec.num_q_heads, DIM), np.float32)
        request = pb.DecodeRequest(
            layer=layer,
            seq_ids=[seq_id],
            keys=_tensor(keys),
            values=_tensor(values),
            positions=_tensor(np.array([seq.lengths[layer]])),
            queries=_tensor(queries),
        )
        effect = ("decode", seq_id, layer, 1)
        if not mutate:
            return "Decode", request, {OK, FULL}, effect
        if rng.random() < 0.2:
            request.seq_ids.append(seq_id)  # twice in one batch
            for name in ("keys", "values", "queries"):
                arr = codec.from_tensor(getattr(request, name), name)
                getattr(request, name).CopyFrom(_tensor(np.concatenate([arr, arr])))
            request.positions.CopyFrom(_tensor(np.array([seq.lengths[layer]] * 2)))
            return "Decode", request, {BAD}, None
        return _mutate_request(rng, request, spec, "Decode")
    if op == "retrieve":
        layers = [layer for layer in range(spec.num_layers) if _ready_to_select(seq, layer, 0)]
        layer = int(rng.choice(layers))
        queries = rng.standard_normal((spec.num_q_heads, DIM), np.float32)
        request = pb.RetrieveRequest(seq_id=seq_id, layer=layer, queries=_tensor(queries))
        effect = ("retrieve", seq_id, layer, 0)
        if not mutate:
            return "Retrieve", request, {OK, FULL}, effect
        return _mutate_request(rng, request, spec, "Retrieve")
    if op == "release":
        if mutate:
            return "Release", pb.ReleaseRequest(seq_id=f"{model.prefix}-ghost"), {MISSING}, None
        return "Release", pb.ReleaseRequest(seq_id=seq_id), {OK}, ("release", seq_id)
    if op == "read":
        n = int(rng.integers(0, 20))
        pages = rng.integers(0, PAGES, n)
        expect = {OK}
        if mutate:
            pages = np.append(pages, rng.choice([-1, PAGES, 2**40]))
            expect = {BAD}
        return "ReadPages", pb.ReadPagesRequest(pages=_tensor(pages)), expect, None
    if op == "garbage":  # a well-formed Append of an unknown sequence with bytes flipped
        keys = _tensor(rng.standard_normal((2, 1, DIM), np.float32))
        request = pb.AppendRequest(
            seq_id=f"{model.prefix}-ghost",
            keys=keys,
            values=keys,
            positions=_tensor(np.zeros(2, np.int64)),
        )
        raw = bytearray(request.SerializeToString())
        for at in rng.integers(0, len(raw), int(rng.integers(1, 4))):
            raw[at] = int(rng.integers(0, 256))
        return "garbage", bytes(raw[: int(rng.integers(len(raw) // 2, len(raw) + 1))]), None, None
    return "Stats", pb.StatsRequest(), {OK}, None


def _mutate_request(rng, request, spec, method):
    """Break one field of a well-formed Append / Decode / Retrieve; the codes it must get."""
    tensors = [f.name for f in request.DESCRIPTOR.fields if f.message_type is not None]
    kind = int(rng.integers(0, 4))
    if kind == 0:
        name = str(rng.choice(tensors))
        getattr(request, name).CopyFrom(_mutate_tensor(rng, getattr(request, name)))
        return method, request, {BAD}, None
    if kind == 1:
        request.layer = int(rng.choice([-1, spec.num_layers, 2**31 - 1]))
        return method, request, {BAD}, None
    if kind == 2 and method != "Retrieve":
        positions = codec.from_tensor(request.positions, "positions")
        if positions.size:
            request.positions.CopyFrom(_tensor(positions + int(rng.choice([-1, 1, 7]))))
            return method, request, {ORDER}, None
    if method == "Decode":
        request.seq_ids[0] = "ghost"
    else:
        request.seq_id = "ghost"
    return method, request, {MISSING}, None


def _apply(model, effect):
    kind, seq_id = effect[0], effect[1]
    if kind == "create":
        spec = effect[2]
        model.seqs[seq_id] = Seq(spec, [0] * spec.num_layers, [False] * spec.num_layers)
    elif kind == "release":
        del model.seqs[seq_id]
    else:
        layer, tokens = effect[2], effect[3]
        seq = model.seqs[seq_id]
        seq.lengths[layer] += tokens
        if kind != "append":
            seq.flushed[layer] = True


class _Stream:
    """An open DecodeStream: one request in, its response out, until an error ends it."""

    def __init__(self, stub):
        self.requests = queue.SimpleQueue()
        self.call = stub.DecodeStream(iter(self.requests.get, None), timeout=600)

    def __call__(self, request, timeout):
        self.requests.put(request)
        return next(self.call)

    def close(self):
        self.requests.put(None)


class _LocalFailure(Exception):
    def __init__(self, error):
        super().__init__(error.code)
        self.error = error


class _LocalStream:
    """An open local stream (``OpenLocalStream``), spoken by hand: frames on its socket."""

    def __init__(self, stub):
        offer = stub.OpenLocalStream(pb.OpenLocalStreamRequest())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(600)
        self.sock.connect("\0" + offer.socket)
        self.frames = framing.FrameReader(self.sock)
        self(offer.ticket, None)

    def __call__(self, request, timeout):
        frame = request if isinstance(request, bytes) else request.SerializeToString()
        framing.write_frame(self.sock, frame)
        reply = pb.LocalReply.FromString(self.frames.read())
        if reply.HasField("error"):
            raise _LocalFailure(reply.error)
        return reply.response

    def close(self):
        self.sock.close()


def _send(stub, channel, method, request, stream=None):
    """Status code, error name and details of one call (a Decode on ``stream`` if given:
    a one-item list holding a ``_Stream`` or a ``_LocalStream``)."""
    on_stream = stream is not None and method == "Decode"
    if on_stream:
        call = stream[0]
    elif method == "garbage":
        call = channel.unary_unary("/icecache.v1.CacheService/Append")
    else:
        call = getattr(stub, method)
    try:
        call(request, timeout=30)
        return OK, "", ""
    except grpc.RpcError as err:
        if on_stream:  # an error ends a stream: the client opens another
            stream[0].close()
            stream[0] = _Stream(stub)
        return err.code(), wire_errors.trailer(err).get(wire_errors.ERROR_KEY, ""), err.details()
    except _LocalFailure as failure:
        stream[0].close()
        stream[0] = _LocalStream(stub)
        error = failure.error
        return getattr(grpc.StatusCode, error.code), error.error, error.message


messages = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 2**32 - 1)), min_size=30, max_size=50
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(batch=messages)
def test_random_and_mutated_messages_get_the_right_status_and_leak_nothing(service, stub, batch):
    stub, channel = stub
    model = Model(prefix=f"fz{COUNTS['messages']}")
    streams = {1: [_Stream(stub)], 2: [_LocalStream(stub)]}
    try:
        for op, seed in batch:
            rng = np.random.default_rng(seed)
            method, request, expect, effect = _build(rng, model, op)
            on_stream = streams.get(seed % 3)  # decodes: unary, on a gRPC or a local stream
            code, name, details = _send(stub, channel, method, request, on_stream)
            COUNTS["messages"] += 1
            key = f"{method} {code.name}"
            COUNTS[key] = COUNTS.get(key, 0) + 1
            if method == "garbage":
                try:
                    pb.AppendRequest.FromString(request)
                except Exception:  # noqa: BLE001 - unparseable: grpc refuses it itself
                    continue
                assert code != OK and code != grpc.StatusCode.INTERNAL, details
                continue
            if name == "SequenceFailed":  # a request failed half-way: allowed, counted
                COUNTS["failed_seq"] += 1
                for seq_id in _touched(request):
                    if seq_id in model.seqs:
                        model.seqs[seq_id].failed = True
                continue
            assert code in expect, f"{method} got {code.name} ({details}), expected {expect}"
            COUNTS["ok"] += code == OK
            COUNTS["refused_full"] += code == FULL
            if code == OK and effect is not None:
                _apply(model, effect)
    finally:
        for stream in streams.values():
            stream[0].close()
        for seq_id in list(model.seqs):
            code, _, details = _send(stub, channel, "Release", pb.ReleaseRequest(seq_id=seq_id))
            assert code == OK, details
    stats = stub.Stats(pb.StatsRequest())
    assert (stats.sequences, stats.pages_used) == (0, 0)


def _touched(request):
    if isinstance(request, pb.DecodeRequest):
        return list(request.seq_ids)
    return [getattr(request, "seq_id", "")]


def test_after_the_fuzz_the_service_still_answers_correctly(service, stub):
    stub, _ = stub
    assert COUNTS["messages"] >= 4000, COUNTS
    assert COUNTS["ok"] >= COUNTS["messages"] // 4, COUNTS  # the fuzz got deep, not refused
    assert COUNTS["refused_full"] > 0, COUNTS  # and the memory ceiling was hit
    spec = SequenceSpec(3, 2, 4, DIM, policy="icecache", budget=8 * PAGE, dense_layers=1)
    local = Store(PagePool(PAGES, PAGE, DIM))
    stub.Create(pb.CreateRequest(seq_id="check", spec=codec.spec_to_proto(spec)))
    local.create("check", spec)
    rng = np.random.default_rng(0)
    for layer in range(3):
        keys, values = rng.standard_normal((2, 30, 2, DIM), np.float32)
        positions = np.arange(30)
        local.append("check", layer, keys, values, positions)
        stub.Append(
            pb.AppendRequest(
                seq_id="check",
                layer=layer,
                keys=_tensor(keys),
                values=_tensor(values),
                positions=_tensor(positions),
            )
        )
    for layer in range(3):
        queries = rng.standard_normal((4, DIM), np.float32)
        want = local.retrieve("check", layer, queries)
        reply = stub.Retrieve(
            pb.RetrieveRequest(seq_id="check", layer=layer, queries=_tensor(queries))
        )
        got = codec.selection_from_proto(reply.selection)
        np.testing.assert_array_equal(got.lens, want.lens)
        data, expected = service.store.read_pages(got.pages), local.read_pages(want.pages)
        for page, fill in enumerate(want.lens):  # slots past the fill hold stale bytes
            np.testing.assert_array_equal(data[page, :, :fill], expected[page, :, :fill])
    stub.Release(pb.ReleaseRequest(seq_id="check"))
    stats = stub.Stats(pb.StatsRequest())
    assert (stats.sequences, stats.pages_used) == (0, 0)
    port = service.port
    segments = sorted(p.name for p in SHM_DIR.glob(f"icecache_{port}_*"))
    assert segments == [service.store.pool.shm_name]
    print("fuzz:", COUNTS)
