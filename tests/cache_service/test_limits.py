"""Memory ceiling, sequence limit, deadlines, message sizes and retries of a live service.

The common fact: a refused request changes nothing that was accepted before it.
"""

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from cache_service import channel_options, host, limits
from cache_service.config import CacheServiceConfig
from cache_service.metrics import ServiceMetrics
from cache_service.page_pool import PagePool, PoolExhausted
from cache_service.server import serve
from cache_service.servicer import CacheServicer
from cache_service.store import Store
from cache_service.types import (
    OutOfOrder,
    SequenceFailed,
    SequenceSpec,
    TooManySequences,
    UnknownSequence,
)
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc
from worker.kv.remote import RemoteKVClient

LAYERS, KV, Q, DIM, PAGE = 2, 2, 4, 32, 16
PAGE_BYTES = 2 * PAGE * DIM * 4
SPEC = SequenceSpec(LAYERS, KV, Q, DIM, policy="quest", budget=64, dense_layers=1)


def _service(pages, **kw):
    config = CacheServiceConfig(
        port=0, max_memory=pages * PAGE_BYTES, head_dim=DIM, workers=2, **kw
    )
    return serve(config)


def _kv(seed, tokens):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, tokens, KV, DIM), np.float32)


def _prefill(kv, seq, tokens, seed=0):
    kv.create(seq, SPEC)
    for layer in range(LAYERS):
        keys, values = _kv(seed + layer, tokens)
        kv.append(seq, layer, keys, values, np.arange(tokens))


def _step(kv, seqs, position, seed):
    """One decode step of every layer for ``seqs`` (all at ``position``)."""
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(LAYERS):
        keys, values = rng.standard_normal((2, len(seqs), KV, DIM), np.float32)
        queries = rng.standard_normal((len(seqs), Q, DIM), np.float32)
        pos = np.full(len(seqs), position)
        out += kv.decode(layer, seqs, keys, values, pos, queries)
    return out


def _page_data(kv, sels):
    return [kv.read_pages(s.pages) for s in sels]


def test_memory_ceiling_refuses_with_the_limit_and_keeps_what_was_accepted():
    server = _service(pages=64)
    try:
        with RemoteKVClient.connect(f"127.0.0.1:{server.port}") as client:
            _prefill(client, "kept", 96)
            used = client.stats().pages_used
            client.create("greedy", SPEC)
            keys, values = _kv(9, 500)
            with pytest.raises(PoolExhausted) as err:
                client.append("greedy", 0, keys, values, np.arange(500))
            message = str(err.value)
            assert "--max-memory" in message and f"{64 * PAGE_BYTES} bytes = 64 pages" in message
            assert client.stats().pages_used == used  # refused before anything was taken
            # the refused sequence is intact and takes what fits; the kept one decodes
            # exactly as in a store that never saw the refused request
            client.append("greedy", 0, keys[:20], values[:20], np.arange(20))
            reference = Store(PagePool(64, PAGE, DIM))
            _prefill(reference, "kept", 96)
            got, want = _step(client, ["kept"], 96, 1), _step(reference, ["kept"], 96, 1)
            for a, b in zip(_page_data(client, got), _page_data(reference, want), strict=True):
                np.testing.assert_array_equal(a, b)
            # a decode batch that does not fit is refused whole: with pages for one of its
            # sequences free, neither takes its token
            _prefill(client, "third", 32, seed=3)
            _prefill(client, "fourth", 32, seed=4)  # both at a page boundary: 2 pages a layer
            client.create("filler", SPEC)
            free = client.stats().pages_total - client.stats().pages_used
            filler = 16 * ((free - 2) // 2)  # leaves 2 or 3 pages free
            client.append("filler", 0, *_kv(5, filler), np.arange(filler))
            assert client.stats().pages_total - client.stats().pages_used in (2, 3)
            with pytest.raises(PoolExhausted, match="decode of 2 sequences needs up to 4"):
                _step(client, ["third", "fourth"], 32, 2)
            assert [server.store.length(s, 0) for s in ("third", "fourth")] == [32, 32]
            client.release("filler")
            _step(client, ["third", "fourth"], 32, 2)  # the same step goes through now
            for seq in ("kept", "greedy", "third", "fourth"):
                client.release(seq)
            assert client.stats().pages_used == 0
    finally:
        server.stop(0)


def test_max_sequences():
    server = _service(pages=256, max_sequences=2)
    try:
        with RemoteKVClient.connect(f"127.0.0.1:{server.port}") as client:
            client.create("a", SPEC)
            client.create("b", SPEC)
            with pytest.raises(TooManySequences, match="limit of 2 sequences .*--max-sequences"):
                client.create("c", SPEC)
            with pytest.raises(UnknownSequence):
                client.release("c")
            client.release("a")
            client.create("c", SPEC)
            assert client.stats().sequences == 2
    finally:
        server.stop(0)


def test_a_call_whose_deadline_passed_while_it_waited_is_not_applied():
    server = _service(pages=256)
    address = f"127.0.0.1:{server.port}"
    try:
        with RemoteKVClient.connect(address, timeout=0.5) as client:
            _prefill(client, "late", 40)
            held = threading.Event()

            def hold_store():
                with server.store.lock:  # a long operation of another client
                    held.set()
                    time.sleep(1.5)

            blocker = threading.Thread(target=hold_store)
            blocker.start()
            held.wait()
            keys, values = _kv(5, 3)
            with pytest.raises(ConnectionError, match="DEADLINE_EXCEEDED"):
                client.append("late", 0, keys, values, np.array([40, 41, 42]))
            blocker.join()
            counter = ("icecache_requests_total", {"method": "Append", "code": "DEADLINE_EXCEEDED"})
            deadline = time.monotonic() + 5
            while not server.metrics.registry.get_sample_value(*counter):
                assert time.monotonic() < deadline, "the late Append never finished"
                time.sleep(0.05)
            assert server.store.length("late", 0) == 40  # refused, not applied
            client.append("late", 0, keys, values, np.array([40, 41, 42]))  # the retry fits
            assert server.store.length("late", 0) == 43
    finally:
        server.stop(0)


def test_oversized_messages_are_refused_and_the_service_carries_on():
    server = _service(pages=64)
    address = f"127.0.0.1:{server.port}"
    try:
        with grpc.insecure_channel(address, options=channel_options.CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.CacheServiceStub(channel)
            big = pb.Tensor(dtype="float32", shape=[limits.MAX_MESSAGE_BYTES // 4 + 16])
            big.data = bytes(limits.MAX_MESSAGE_BYTES + 64)
            with pytest.raises(grpc.RpcError) as err:
                stub.Append(pb.AppendRequest(seq_id="x", keys=big))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Stats(pb.StatsRequest()).pages_used == 0
    finally:
        server.stop(0)


class FailingPool(PagePool):
    """A real pool whose ``alloc`` fails once after ``allow`` more calls succeed."""

    allow: int | None = None

    def alloc(self, n):
        if self.allow is not None:
            if self.allow == 0:
                self.allow = None
                raise PoolExhausted("injected fault")
            self.allow -= 1
        return super().alloc(n)


@pytest.mark.parametrize("policy", ["quest", "icecache", "icecache-tokens", "oracle"])
def test_a_request_failing_half_way_marks_its_sequence_and_leaks_nothing(policy):
    pool = FailingPool(512, PAGE, DIM)
    store = Store(pool)
    spec = SequenceSpec(LAYERS, KV, Q, DIM, policy=policy, budget=64, dense_layers=0)
    store.create("other", spec)
    store.create("victim", spec)
    for seq in ("other", "victim"):
        for layer in range(LAYERS):
            keys, values = _kv(layer, 160)
            store.append(seq, layer, keys, values, np.arange(160))
    queries = np.ones((Q, DIM), np.float32)
    before = store.read_pages(store.retrieve("other", 1, queries).pages)
    pool.allow = 1  # at a page boundary each head takes a page: the second one fails
    keys, values = _kv(7, 1)
    with pytest.raises(SequenceFailed, match="injected fault.*release them"):
        store.decode(1, ["victim"], keys, values, np.array([160]), queries[None])
    with pytest.raises(SequenceFailed, match="release it and create it again"):
        store.retrieve("victim", 0, queries)
    with pytest.raises(SequenceFailed):
        store.append("victim", 0, keys, values, np.array([160]))
    after = store.retrieve("other", 1, queries)  # the other sequence is untouched
    np.testing.assert_array_equal(store.read_pages(after.pages), before)
    store.release("victim")
    store.release("other")
    assert pool.num_used == 0


def test_wrong_order_is_a_failed_precondition_naming_what_to_do():
    server = _service(pages=256)
    try:
        with RemoteKVClient.connect(f"127.0.0.1:{server.port}") as client:
            spec = SequenceSpec(4, KV, Q, DIM, policy="icecache-r", budget=64, dense_layers=1)
            client.create("r", spec)
            keys, values = _kv(0, 40)
            with pytest.raises(OutOfOrder, match="must continue at 0"):
                client.append("r", 0, keys, values, np.arange(1, 41))
            with pytest.raises(OutOfOrder, match="append to layer 1 first"):
                client.append("r", 2, keys, values, np.arange(40))
            for layer in range(4):
                client.append("r", layer, keys, values, np.arange(40))
            with pytest.raises(OutOfOrder, match="retrieve layer 1 first"):
                client.retrieve("r", 2, np.ones((Q, DIM), np.float32))
            client.retrieve("r", 1, np.ones((Q, DIM), np.float32))
            client.retrieve("r", 2, np.ones((Q, DIM), np.float32))
            client.release("r")
            with pytest.raises(UnknownSequence, match="or it was released"):
                client.append("r", 0, keys, values, np.arange(40, 80))
    finally:
        server.stop(0)


class FlakyServicer(CacheServicer):
    """The real servicer, but each method's first ``fails`` calls end UNAVAILABLE."""

    fails = 2

    def __init__(self, *args):
        super().__init__(*args)
        self.calls: dict[str, int] = {}

    def _flaky(self, name, context):
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.fails:
            context.abort(grpc.StatusCode.UNAVAILABLE, "transient fault")

    def Stats(self, request, context):
        self._flaky("Stats", context)
        return super().Stats(request, context)

    def Create(self, request, context):
        self._flaky("Create", context)
        return super().Create(request, context)


def test_read_only_calls_are_retried_when_unavailable_and_writes_are_not():
    store = Store(PagePool(64, PAGE, DIM))
    servicer = FlakyServicer(store, ServiceMetrics(store), host.host_identity())
    server = grpc.server(futures.ThreadPoolExecutor(2), options=channel_options.CHANNEL_OPTIONS)
    pb_grpc.add_CacheServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with RemoteKVClient.connect(f"127.0.0.1:{port}", transport="rpc") as client:
            assert client.stats().sequences == 0  # two faults, then an answer
            assert servicer.calls["Stats"] == 3
            with pytest.raises(ConnectionError, match="UNAVAILABLE"):
                client.create("once", SPEC)  # a write is never sent twice by gRPC
            assert servicer.calls["Create"] == 1 and "once" not in store
    finally:
        server.stop(0)
