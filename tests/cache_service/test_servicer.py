"""The cache service over real gRPC on 127.0.0.1: every RPC, errors, both page transports."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, Gauge

import proto.build
from cache_service import codec, host, limits
from cache_service.config import CacheServiceConfig
from cache_service.page_pool import PagePool, PoolExhausted
from cache_service.refusals import DeadlinePassed, local_error, refusal
from cache_service.server import serve
from cache_service.store import Store
from cache_service.stream_slots import StreamSlots
from cache_service.types import (
    OutOfOrder,
    PrefixKeys,
    SequenceExists,
    SequenceSpec,
    UnknownSequence,
)
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc
from worker.kv.grpc_stream import DecodeStream
from worker.kv.remote import RemoteKVClient
from worker.kv.socket_stream import LocalDecodeStream
from worker.page_cache import DevicePageCache

LAYERS, KV, Q, DIM, PAGE = 3, 2, 4, 64, 16
SHM = Path("/dev/shm")


def _spec(policy="quest", budget=64):
    return SequenceSpec(LAYERS, KV, Q, DIM, policy=policy, budget=budget, dense_layers=1)


def _config(**kw):
    return CacheServiceConfig(**{"port": 0, "max_memory": 32 * 2**20, "workers": 2, **kw})


def _kv(rng, tokens):
    shape = (tokens, KV, DIM)
    return rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)


def _replay(kv, seq, seed=0, prompt=100, steps=20, append_only=False):
    """Prefill and decode steps on any store client; returns every decode selection.
    ``append_only``: the dense layer 0 stores its token without selecting every other step."""
    rng = np.random.default_rng(seed)
    kv.create(seq, _spec())
    for layer in range(LAYERS):
        kv.append(seq, layer, *_kv(rng, prompt), np.arange(prompt))
    sels = []
    for step in range(steps):
        for layer in range(LAYERS):
            keys, values = _kv(rng, 1)
            queries = rng.standard_normal((1, Q, DIM), np.float32)
            pos = np.array([prompt + step])
            if append_only and layer == 0 and step % 2 == 0:
                kv.append_step(layer, [seq], keys, values, pos)
            else:
                sels.append(kv.decode(layer, [seq], keys, values, pos, queries)[0])
    return sels


@pytest.fixture(scope="module")
def service():
    server = serve(_config())
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def address(service):
    return f"127.0.0.1:{service.port}"


@pytest.fixture(scope="module")
def shm_client(address):
    with RemoteKVClient.connect(address) as client:
        yield client


@pytest.fixture(scope="module")
def rpc_client(address):
    with RemoteKVClient.connect(address, transport="rpc") as client:
        yield client


def test_generated_stubs_are_up_to_date():
    assert proto.build.build() == []
    for proto_file in (proto.build.ROOT / "proto").rglob("*.proto"):
        assert not proto.build.is_stale(proto_file)


def test_info_describes_the_pool_its_segment_and_host(shm_client, service):
    info = shm_client.info
    pool = service.store.pool
    assert (info.pool.num_pages, info.pool.page_size, info.pool.head_dim) == (
        pool.num_pages,
        PAGE,
        DIM,
    )
    assert info.pool.dtype == "float32" and info.pool.page_bytes == 2 * PAGE * DIM * 4
    assert info.segment.name == pool.shm_name and (SHM / pool.shm_name).exists()
    assert info.segment.size_bytes == pool.num_pages * pool.page_bytes
    assert info.host_id == host.host_identity()
    assert "icecache" in info.policies


def test_same_host_client_maps_the_segment_and_others_use_rpc(shm_client, rpc_client):
    assert shm_client.transport == "shm" and shm_client.page_size == PAGE
    assert rpc_client.transport == "rpc"


def test_client_on_another_host_reads_pages_by_rpc(address, monkeypatch):
    monkeypatch.setattr(host, "host_identity", lambda: "other-boot/other-host")
    with RemoteKVClient.connect(address) as client:
        assert client.transport == "rpc"
        with pytest.raises(ConnectionError, match="another host"):
            RemoteKVClient.connect(address, transport="shm")


def test_decode_selections_equal_the_in_process_store(shm_client):
    local = Store(PagePool(2048, PAGE, DIM))
    remote_sels = _replay(shm_client, "replay")
    local_sels = _replay(local, "replay")
    assert len(remote_sels) == len(local_sels) == 20 * LAYERS
    for got, want in zip(remote_sels, local_sels, strict=True):
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.lens, want.lens)
        # page ids differ between pools, so compare what the pages hold
        got_data, want_data = shm_client.read_pages(got.pages), local.read_pages(want.pages)
        np.testing.assert_array_equal(got_data, want_data)
    shm_client.release("replay")


def _decodes(service, method, code="OK"):
    sample = {"method": method, "code": code}
    return service.metrics.registry.get_sample_value("icecache_requests_total", sample) or 0


def _counted(service, method, expected, code="OK"):
    """Whether the service counted ``expected`` requests; a local stream counts each one
    after its reply is sent, so the count may trail the client by a moment."""
    _wait_for(lambda: _decodes(service, method, code) >= expected)
    return _decodes(service, method, code) == expected


def _open_streams(service, kind):
    sample = {"kind": kind}
    return service.metrics.registry.get_sample_value("icecache_open_streams", sample) or 0


def _wait_for(condition, timeout=10.0):
    """Until ``condition()`` holds: a service notices a closed stream on its own thread."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the service did not get there in time"
        time.sleep(0.01)


DECODE_PATHS = {"auto": "LocalStream", "stream": "DecodeStream", "unary": "Decode"}
"""A client's ``decode`` setting -> the method its decode steps are counted under (on the
service's host, ``auto`` takes a local stream)."""
STREAM_TYPES = {"auto": LocalDecodeStream, "stream": DecodeStream}


@pytest.mark.parametrize("append_only", [False, True], ids=["decode", "append-only"])
def test_local_stream_grpc_stream_and_unary_decodes_select_the_same_pages(
    address, service, append_only
):
    """Every path selects what the in-process store does, append-only steps among them
    (``DecodeRequest.append_only``: stored, nothing selected, the next selections the same)."""
    local = Store(PagePool(2048, PAGE, DIM))
    want = _replay(local, "all", append_only=append_only)
    steps = 20 * LAYERS
    open_before = {kind: _open_streams(service, kind) for kind in ("local", "grpc")}
    for decode, method in DECODE_PATHS.items():
        before = _decodes(service, method)
        with RemoteKVClient.connect(address, decode=decode) as client:
            got = _replay(client, decode, append_only=append_only)
            assert _counted(service, method, before + steps)
            assert len(got) == len(want) == steps - (10 if append_only else 0)
            if decode in STREAM_TYPES:
                assert type(client._stream) is STREAM_TYPES[decode]
            for a, c in zip(got, want, strict=True):
                for field in ("indptr", "lens"):
                    np.testing.assert_array_equal(getattr(a, field), getattr(c, field))
                ours, theirs = client.read_pages(a.pages), local.read_pages(c.pages)
                for page, tokens in enumerate(c.lens):  # past ``lens``: what a freed page held
                    np.testing.assert_array_equal(ours[page, :, :tokens], theirs[page, :, :tokens])
            client.release(decode)
    # closed clients' streams end at the service
    _wait_for(lambda: all(_open_streams(service, k) == n for k, n in open_before.items()))


@pytest.mark.parametrize("decode", STREAM_TYPES)
def test_an_error_ends_the_stream_and_the_next_step_opens_another(address, decode):
    local = Store(PagePool(2048, PAGE, DIM))
    rng = np.random.default_rng(3)
    with RemoteKVClient.connect(address, decode=decode) as client:
        for kv in (local, client):
            kv.create("gap", _spec())
            for layer in range(LAYERS):
                kv.append("gap", layer, *_kv(rng, 40), np.arange(40))
        keys, values = _kv(rng, 1)
        queries = rng.standard_normal((1, Q, DIM), np.float32)
        client.decode(1, ["gap"], keys, values, np.array([40]), queries)  # opens the stream
        assert type(client._stream) is STREAM_TYPES[decode]
        with pytest.raises(OutOfOrder) as want:
            local.decode(0, ["gap"], keys, values, np.array([41]), queries)
        with pytest.raises(OutOfOrder) as got:
            client.decode(0, ["gap"], keys, values, np.array([41]), queries)
        assert str(got.value) == str(want.value)  # the store's own message
        assert client._stream is None
        with pytest.raises(UnknownSequence, match="nobody"):
            client.decode(0, ["nobody"], keys, values, np.array([0]), queries)
        sel = client.decode(0, ["gap"], keys, values, np.array([40]), queries)[0]
        assert type(client._stream) is STREAM_TYPES[decode] and sel.pages.size > 0
        client.release("gap")


@pytest.mark.parametrize(("holder", "refused"), [("auto", "stream"), ("stream", "auto")])
def test_streams_beyond_the_limit_fall_back_to_unary_decode(caplog, holder, refused):
    server = serve(_config(max_streams=1))
    address = f"127.0.0.1:{server.port}"
    try:
        first = RemoteKVClient.connect(address, decode=holder)
        with first, RemoteKVClient.connect(address, decode=refused) as second:
            _replay(first, "first", steps=1)
            assert _counted(server, DECODE_PATHS[holder], LAYERS)  # first holds the one stream
            with caplog.at_level("WARNING", logger="worker.kv.remote"):
                _replay(second, "second", steps=2)
            assert _counted(server, "Decode", 2 * LAYERS)
            assert _counted(server, DECODE_PATHS[refused], 1, "RESOURCE_EXHAUSTED")
            assert "refused a decode stream" in caplog.text and "TooManyStreams" not in caplog.text
            assert "--max-streams" in caplog.text
            first.close()  # its stream ends and frees the slot
            _wait_for(lambda: _open_streams(server, "local") + _open_streams(server, "grpc") == 0)
            second._stream_after = 0.0  # (the retry pause is a minute)
            _replay(second, "third", steps=1)
            assert _counted(server, DECODE_PATHS[refused], LAYERS)
            assert type(second._stream) is STREAM_TYPES[refused]
    finally:
        server.stop(0)


def test_a_service_without_streams_serves_unary_decode():
    server = serve(_config(max_streams=0))
    try:
        with RemoteKVClient.connect(f"127.0.0.1:{server.port}") as client:
            assert len(_replay(client, "plain", steps=2)) == 2 * LAYERS
        assert _counted(server, "Decode", 2 * LAYERS)
    finally:
        server.stop(0)


def test_without_local_streams_same_host_clients_use_a_grpc_stream():
    server = serve(_config(local_streams=False))
    try:
        assert server.local is None
        with RemoteKVClient.connect(f"127.0.0.1:{server.port}") as client:
            _replay(client, "grpc", steps=1)
            assert type(client._stream) is DecodeStream
        assert _counted(server, "DecodeStream", LAYERS)
    finally:
        server.stop(0)


def test_a_local_socket_out_of_reach_means_a_grpc_stream(address, service, monkeypatch):
    # as for a client in another network namespace: the name leads to no listener
    monkeypatch.setattr(service.local, "name", "icecache-nobody-listens-here")
    with RemoteKVClient.connect(address) as client:
        _replay(client, "unreachable", steps=1)
        assert type(client._stream) is DecodeStream
        client.release("unreachable")


def test_clients_on_another_host_or_reading_by_rpc_use_a_grpc_stream(rpc_client):
    _replay(rpc_client, "by-rpc", steps=1)
    assert type(rpc_client._stream) is DecodeStream
    rpc_client.release("by-rpc")


@pytest.mark.parametrize("decode", STREAM_TYPES)
def test_a_stream_step_without_answer_times_out_and_is_not_applied(address, service, decode):
    with RemoteKVClient.connect(address, timeout=0.5, decode=decode) as client:
        rng = np.random.default_rng(4)
        client.create("stuck", _spec())
        client.append("stuck", 0, *_kv(rng, 40), np.arange(40))
        step = (*_kv(rng, 1), np.array([40]), rng.standard_normal((1, Q, DIM), np.float32))
        no_answer = pytest.raises(ConnectionError, match="did not answer a decode step within")
        refused = _decodes(service, DECODE_PATHS[decode], "DEADLINE_EXCEEDED")
        with service.store.lock:  # the service cannot get to the request
            with no_answer:
                client.decode(0, ["stuck"], *step)
            time.sleep(0.3)  # the cancellation reaches the service before the lock is free
        _wait_for(lambda: _decodes(service, DECODE_PATHS[decode], "DEADLINE_EXCEEDED") > refused)
        # refused once the service got to it, not applied: position 40 is still the next one
        assert client.decode(0, ["stuck"], *step)[0].pages.size > 0
        client.release("stuck")


@pytest.mark.parametrize("decode", STREAM_TYPES)
def test_stopping_the_service_ends_open_streams(decode):
    server = serve(_config())
    client = RemoteKVClient.connect(f"127.0.0.1:{server.port}", decode=decode)
    try:
        _replay(client, "open", steps=1)
        assert type(client._stream) is STREAM_TYPES[decode]
        started = time.monotonic()
        server.stop(0.5)
        assert time.monotonic() - started < 5
        with pytest.raises(ConnectionError):
            _replay(client, "after", steps=1)
    finally:
        client.close()
        server.stop(0)


def test_a_stream_sends_an_rpc_client_the_pages_it_lacks_with_the_selections(address, service):
    local = Store(PagePool(2048, PAGE, DIM))
    rng = np.random.default_rng(5)
    prompt = [_kv(rng, 100) for _ in range(LAYERS)]
    reads = _decodes(service, "ReadPages")
    with RemoteKVClient.connect(address, transport="rpc") as client:
        assert client.transport == "rpc"
        cache = DevicePageCache(4096, PAGE, DIM)
        for kv in (local, client):
            kv.create("pushed", _spec())
            for layer in range(LAYERS):
                kv.append("pushed", layer, *prompt[layer], np.arange(100))
        for step in range(6):
            for layer in range(LAYERS):
                step_in = (*_kv(rng, 1), np.array([100 + step]))
                queries = rng.standard_normal((1, Q, DIM), np.float32)
                want = local.decode(layer, ["pushed"], *step_in, queries)[0]
                got = client.decode(layer, ["pushed"], *step_in, queries)[0]
                slots = cache.resolve(got.pages, got.versions, client.read_pages)
                theirs = local.read_pages(want.pages)
                for row, tokens in enumerate(want.lens):
                    ours = cache.kv[slots[row], :, :tokens].numpy()
                    np.testing.assert_array_equal(ours, theirs[row, :, :tokens])
        assert type(client._stream) is DecodeStream
        assert cache.stats.misses > 0 and _decodes(service, "ReadPages") == reads
        # a read naming no versions, or other ones, is a ReadPages call
        client.read_pages(got.pages)
        client.read_pages(got.pages, got.versions + 1)
        assert _decodes(service, "ReadPages") == reads + 2
        client.release("pushed")
    with RemoteKVClient.connect(address, transport="rpc", decode="unary") as unary:
        got = _replay(unary, "unary-rpc", steps=1)[-1]  # Decode sends no pages along
        assert unary.read_pages(got.pages, got.versions).shape[0] == got.pages.size
        assert _decodes(service, "ReadPages") == reads + 3
        unary.release("unary-rpc")


def test_shm_and_rpc_reads_give_identical_bytes(shm_client, rpc_client, service):
    sels = _replay(shm_client, "bytes", seed=1, steps=3)
    pages = np.concatenate([s.pages for s in sels])
    via_shm, via_rpc = shm_client.read_pages(pages), rpc_client.read_pages(pages)
    assert via_shm.shape == (pages.size, 2, PAGE, DIM) and via_shm.flags.c_contiguous
    assert via_shm.tobytes() == via_rpc.tobytes() == service.store.read_pages(pages).tobytes()
    shm_client.release("bytes")


def test_read_pages_splits_large_requests(rpc_client, service, monkeypatch):
    monkeypatch.setattr(limits, "READ_PAGES_MAX", 7)
    pages = np.arange(30) % service.store.pool.num_pages
    np.testing.assert_array_equal(rpc_client.read_pages(pages), service.store.read_pages(pages))


def test_append_is_sent_in_chunks_under_the_limit(shm_client, service, monkeypatch):
    monkeypatch.setattr(limits, "APPEND_CHUNK_BYTES", 10 * 2 * KV * DIM * 4)  # 10 tokens
    calls = service.metrics.requests.labels("Append", "OK")
    before = calls._value.get()
    rng = np.random.default_rng(2)
    shm_client.create("chunks", _spec())
    keys, values = _kv(rng, 95)
    shm_client.append("chunks", 0, keys, values, np.arange(95))
    assert calls._value.get() - before == 10
    assert service.store.length("chunks", 0) == 95
    shm_client.release("chunks")


def test_retrieve_selects_without_storing(shm_client, service):
    _replay(shm_client, "retrieve", steps=1)
    length = service.store.length("retrieve", 2)
    queries = np.ones((Q, DIM), np.float32)
    sel = shm_client.retrieve("retrieve", 2, queries)
    want = service.store.retrieve("retrieve", 2, queries)
    for got, expected in zip(sel, want, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert service.store.length("retrieve", 2) == length
    shm_client.release("retrieve")


def test_stats_count_sequences_and_pages(shm_client, service):
    before = shm_client.stats()
    shm_client.create("stats", _spec())
    rng = np.random.default_rng(3)
    shm_client.append("stats", 0, *_kv(rng, 40), np.arange(40))
    during = shm_client.stats()
    assert during.sequences == before.sequences + 1
    assert during.pages_used == service.store.stats().pages_used > before.pages_used
    assert during.index_bytes == service.store.stats().index_bytes  # over the wire
    assert during.bytes_used == during.pages_used * during.page_bytes + during.index_bytes
    shm_client.release("stats")
    assert shm_client.stats() == before


def test_errors_come_back_as_the_store_exceptions_with_its_messages(shm_client):
    local = Store(PagePool(64, PAGE, DIM))
    cases = [
        (lambda kv: kv.release("nope"), UnknownSequence),
        (lambda kv: kv.retrieve("nope", 0, np.ones((Q, DIM), np.float32)), UnknownSequence),
        (lambda kv: kv.create("dup", _spec()), SequenceExists),
        (lambda kv: kv.create("bad", _spec(budget=8)), ValueError),
        (lambda kv: kv.create("bad", SequenceSpec(2, 2, 4, 32)), ValueError),
        (lambda kv: kv.append("dup", 0, *_kv(np.random.default_rng(), 2), np.array([3, 4])),
         ValueError),
        (lambda kv: kv.append("dup", 9, *_kv(np.random.default_rng(), 1), np.array([0])),
         ValueError),
        (lambda kv: kv.append_step(1, ["dup"], *_kv(np.random.default_rng(), 1), np.array([0])),
         ValueError),  # a layer that selects: no append-only steps
    ]  # fmt: skip
    for kv in (local, shm_client):
        kv.create("dup", _spec())
    for call, kind in cases:
        with pytest.raises(kind) as want:
            call(local)
        with pytest.raises(kind) as got:
            call(shm_client)
        assert str(got.value) == str(want.value)
        assert type(got.value) is type(want.value)
    shm_client.release("dup")


def test_a_full_pool_is_resource_exhausted():
    server = serve(_config(max_memory=8 * 2 * PAGE * DIM * 4))  # 8 pages
    try:
        with RemoteKVClient.connect(f"127.0.0.1:{server.port}") as client:
            client.create("big", _spec())
            with pytest.raises(PoolExhausted, match="only .* of 8 are free"):
                client.append("big", 0, *_kv(np.random.default_rng(), 200), np.arange(200))
    finally:
        server.stop(0)


def test_malformed_tensors_are_invalid_arguments(address, shm_client):
    shm_client.create("raw", _spec())
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        short = pb.Tensor(dtype="float32", shape=[1, KV, DIM], data=b"\0" * 12)
        wrong = pb.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8)
        for keys in (short, wrong):
            request = pb.AppendRequest(seq_id="raw", layer=0, keys=keys, values=keys)
            with pytest.raises(grpc.RpcError) as err:
                stub.Append(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "keys:" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Decode(pb.DecodeRequest(layer=1, seq_ids=["raw", "raw"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        two = codec.to_tensor(np.zeros((2, KV, DIM), np.float32))  # for one sequence
        at = codec.to_tensor(np.array([0]))
        request = pb.DecodeRequest(
            layer=0, seq_ids=["raw"], keys=two, values=two, positions=at, append_only=True
        )
        with pytest.raises(grpc.RpcError) as err:  # append-only: no queries asked for
            stub.Decode(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one key, value and position per sequence (1 ids)" in err.value.details()
        ids = codec.to_tensor(np.array([10**9]))
        with pytest.raises(grpc.RpcError) as err:
            stub.ReadPages(pb.ReadPagesRequest(pages=ids))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    shm_client.release("raw")


def test_health_is_serving_and_reflection_lists_the_service(address):
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "icecache.v1.CacheService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(reflect.ServerReflectionInfo(iter([request])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"icecache.v1.CacheService", "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_and_expose_memory(service, shm_client):
    _replay(shm_client, "metrics", steps=2)
    registry = service.metrics.registry
    ok = {"method": "DecodeStream", "code": "OK"}  # a client decodes on a stream
    assert registry.get_sample_value("icecache_requests_total", ok) >= 2 * LAYERS
    assert (
        registry.get_sample_value("icecache_request_seconds_count", {"method": "DecodeStream"})
        >= 2 * LAYERS
    )
    assert registry.get_sample_value("icecache_selected_pages_total") > 0
    port = service.metrics.serve_http(0, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        service.metrics.close()
    used = service.store.stats().bytes_used
    assert f"icecache_memory_used_bytes {float(used)}".encode() in text
    assert b'icecache_requests_total{code="NOT_FOUND",method="Release"}' in text
    shm_client.release("metrics")


def test_the_segment_outlives_clients_and_goes_with_the_service():
    server = serve(_config())
    name = server.store.pool.shm_name
    address = f"127.0.0.1:{server.port}"
    try:
        RemoteKVClient.connect(address).close()
        # a client process that maps the segment and exits must not unlink it
        code = (
            "import sys; from worker.kv.remote import RemoteKVClient; "
            "c = RemoteKVClient.connect(sys.argv[1]); assert c.transport == 'shm'"
        )
        subprocess.run([sys.executable, "-c", code, address], check=True, timeout=60)
        assert (SHM / name).exists()
    finally:
        server.stop(0)
    assert not (SHM / name).exists()


def test_a_service_without_shared_memory_serves_pages_by_rpc():
    server = serve(_config(shared_memory=False))
    try:
        with RemoteKVClient.connect(f"127.0.0.1:{server.port}") as client:
            assert client.info.segment.name == "" and client.transport == "rpc"
            sel = _replay(client, "heap", steps=1)[-1]
            data = client.read_pages(sel.pages)
            np.testing.assert_array_equal(data, server.store.read_pages(sel.pages))
    finally:
        server.stop(0)


def test_connecting_to_nothing_says_how_to_start_a_service():
    with pytest.raises(ConnectionError, match="python -m cache_service"):
        RemoteKVClient.connect("127.0.0.1:1", connect_timeout=0.5)


def test_stream_slots_hold_at_most_their_limit_and_count_open_streams_by_kind():
    registry = CollectorRegistry()
    slots = StreamSlots(2, Gauge("open", "open streams", ["kind"], registry=registry))
    assert slots.acquire("grpc") and slots.acquire("local")
    assert not slots.acquire("grpc")
    slots.release("grpc")
    assert slots.acquire("local")
    assert registry.get_sample_value("open", {"kind": "grpc"}) == 0
    assert registry.get_sample_value("open", {"kind": "local"}) == 2
    assert "holds 2 open decode streams, its --max-streams" in str(slots.refusal())
    none = StreamSlots(0, Gauge("none", "no streams", ["kind"], registry=registry))
    assert not none.acquire("grpc")


def test_refusals_give_each_error_its_status_and_name_the_pool_limit():
    assert refusal(DeadlinePassed("late"), "L").code == grpc.StatusCode.DEADLINE_EXCEEDED
    full = refusal(PoolExhausted("no free page"), "64 pages")
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(full.err) == "no free page (limit: 64 pages)"
    assert refusal(RuntimeError("bug"), "L").code == grpc.StatusCode.INTERNAL
    bad_id = local_error("LocalStream", refusal(UnknownSequence("\x00"), "L"))
    assert (bad_id.code, bad_id.error, bad_id.seq_id) == ("NOT_FOUND", "UnknownSequence", "")
    internal = local_error("LocalStream", refusal(RuntimeError("bug"), "L"))
    assert (internal.error, internal.message) == (
        "",
        "internal error in LocalStream: RuntimeError: bug",
    )


def test_prefix_blocks_are_kept_found_and_read_back_over_grpc(shm_client, rpc_client, service):
    """Create with prefix keys, SharePrefix and PositionalPages over the wire: the second
    sequence starts from the first's blocks (on both transports), reads their K/V back
    unchanged, and the service counts the hit in Stats and the metrics."""
    rng = np.random.default_rng(3)
    block = 2 * PAGE
    keys, values = _kv(rng, 3 * block + 5)
    prefix = PrefixKeys((b"block-0-key", b"block-1-key", b"block-2-key"), block)
    assert shm_client.create("p-first", _spec(), prefix) == 0
    for layer in range(LAYERS):
        shm_client.append("p-first", layer, keys, values, np.arange(len(keys)))
    assert shm_client.share_prefix("p-first", prefix) == 3
    assert shm_client.share_prefix("p-first", prefix) == 0  # kept already
    for client in (shm_client, rpc_client):
        assert client.create("p-second", _spec(), prefix) == 3 * block
        pages = client.positional_pages("p-second", 1)  # [KV, 6]
        assert pages.shape == (KV, 3 * block // PAGE)
        data = client.read_pages(pages.ravel()).reshape(KV, -1, 2, PAGE, DIM)
        got = data.transpose(2, 1, 3, 0, 4).reshape(2, 3 * block, KV, DIM)
        np.testing.assert_array_equal(got[0], keys[: 3 * block])
        np.testing.assert_array_equal(got[1], values[: 3 * block])
        client.release("p-second")
        off = PrefixKeys(prefix.keys, block, reuse=False)  # the build boundary only
        assert client.create("p-off", _spec(), off) == 0
        client.release("p-off")
    assert shm_client.create("p-other", _spec(budget=80), prefix) == 0  # another spec: none
    stats = rpc_client.stats()
    assert (stats.prefix.blocks, stats.prefix.hits, stats.prefix.tokens_reused) == (
        3, 2, 6 * block
    )  # fmt: skip
    assert stats.prefix.pages == 3 * LAYERS * KV * (block // PAGE)
    registry = service.metrics.registry
    assert registry.get_sample_value("icecache_prefix_hits_total") == 2
    assert registry.get_sample_value("icecache_prefix_blocks") == 3
    _replay_step(shm_client, "p-first")
    with pytest.raises(OutOfOrder, match="right after its prefill"):
        shm_client.share_prefix("p-first", prefix)
    with pytest.raises(OutOfOrder, match="has decoded"):
        shm_client.positional_pages("p-first", 0)
    with pytest.raises(ValueError, match="multiple of the page size"):
        shm_client.create("p-bad", _spec(), PrefixKeys((b"12345678",), PAGE + 1))
    for seq in ("p-first", "p-other"):
        shm_client.release(seq)
    service.store.prefixes.evict(10**9)
    assert service.store.stats().prefix.blocks == 0


def _replay_step(kv, seq):
    """One decode step of every layer."""
    rng = np.random.default_rng(0)
    for layer in range(LAYERS):
        keys, values = _kv(rng, 1)
        queries = rng.standard_normal((1, Q, DIM), np.float32)
        kv.decode(layer, [seq], keys, values, np.array([3 * 2 * PAGE + 5]), queries)
