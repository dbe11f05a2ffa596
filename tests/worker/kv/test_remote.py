"""The worker's data path against a live cache service: page cache loads, engine equality."""

import functools

import numpy as np
import pytest
import torch

from cache_service.config import CacheServiceConfig
from cache_service.server import serve
from cache_service.types import SequenceSpec
from worker.engine import Engine, EngineConfig
from worker.kv.health import LoadProbe
from worker.kv.remote import RemoteKVClient, _chunks
from worker.kv_client import LocalKVClient
from worker.page_cache import DevicePageCache

LAYERS, KV, Q, DIM, PAGE = 3, 3, 9, 64, 16
POLICY = "icecache"


@pytest.fixture(scope="module")
def service():
    server = serve(CacheServiceConfig(port=0, max_memory=256 * 2**20, workers=2))
    yield server
    server.stop(0)


@pytest.fixture(scope="module", params=["shm", "rpc"])
def client(request, service):
    with RemoteKVClient.connect(f"127.0.0.1:{service.port}", transport=request.param) as kv:
        assert kv.transport == request.param
        yield kv


def _decode_steps(kv, seq, steps, prompt=200, seed=0):
    """Yields each decode step's selections (all layers) of a random sequence."""
    rng = np.random.default_rng(seed)
    spec = SequenceSpec(LAYERS, KV, Q, DIM, policy="quest", budget=64, dense_layers=1)
    kv.create(seq, spec)
    for layer in range(LAYERS):
        keys, values = rng.standard_normal((2, prompt, KV, DIM), np.float32)
        kv.append(seq, layer, keys, values, np.arange(prompt))
    for step in range(steps):
        sels = []
        for layer in range(LAYERS):
            keys, values = rng.standard_normal((2, 1, KV, DIM), np.float32)
            queries = rng.standard_normal((1, Q, DIM), np.float32)
            sels += kv.decode(layer, [seq], keys, values, np.array([prompt + step]), queries)
        yield sels


def test_page_cache_holds_the_service_pages_and_moves_only_misses(client, service):
    cache = DevicePageCache(256, PAGE, DIM)
    for step, sels in enumerate(_decode_steps(client, "cache", steps=6)):
        pages = np.concatenate([s.pages for s in sels])
        versions = np.concatenate([s.versions for s in sels])
        before = cache.stats.bytes_moved
        slots = cache.resolve(pages, versions, client.read_pages)
        assert torch.equal(cache.kv[slots], torch.from_numpy(service.store.read_pages(pages)))
        moved = (cache.stats.bytes_moved - before) // cache.page_bytes
        if step == 0:
            assert moved == np.unique(pages).size  # a cold cache loads everything
        else:
            assert 0 < moved < pages.size / 2  # the pages the new token changed, and few others
        again = cache.resolve(pages, versions, client.read_pages)
        assert torch.equal(again, slots)
    assert cache.stats.hits > cache.stats.misses > 0
    client.release("cache")


def test_both_transports_load_the_same_bytes(service):
    address = f"127.0.0.1:{service.port}"
    shm = RemoteKVClient.connect(address, transport="shm")
    rpc = RemoteKVClient.connect(address, transport="rpc")
    caches = {kv: DevicePageCache(256, PAGE, DIM) for kv in (shm, rpc)}
    for sels in _decode_steps(shm, "both", steps=4, seed=5):
        pages = np.concatenate([s.pages for s in sels])
        versions = np.concatenate([s.versions for s in sels])
        shm_rows, rpc_rows = (
            c.kv[c.resolve(pages, versions, kv.read_pages)] for kv, c in caches.items()
        )
        assert torch.equal(shm_rows, rpc_rows)
    assert vars(caches[shm].stats) == vars(caches[rpc].stats)
    shm.release("both")
    shm.close()
    rpc.close()


def test_chunks_cover_every_row_within_the_limit():
    assert list(_chunks(10, 3, 9)) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert list(_chunks(2, 100, 10)) == [slice(0, 1), slice(1, 2)]
    assert list(_chunks(0, 8, 64)) == [slice(0, 0)]


PROMPT = "The quick brown fox jumps over the lazy dog by the river. " * 10 + "What did the fox do?"
BUDGET, NEW_TOKENS = 48, 6


def greedy(model, kv, prompt_ids):
    """Greedy tokens of the engine over ``kv`` (the in-process/remote comparison)."""
    config = EngineConfig(policy=POLICY, budget=BUDGET, device_cache_mb=64)
    return Engine(model, kv, config).generate(prompt_ids, NEW_TOKENS)


@functools.cache
def local_greedy(model, prompt_ids):
    """The in-process store's answer, computed once per session."""
    kv = LocalKVClient.with_capacity(2**28, PAGE, model.config.head_dim)
    return greedy(model, kv, list(prompt_ids))


def test_engine_output_is_identical_through_the_service(smollm, service):
    model, tokenizer = smollm
    prompt_ids = tuple(tokenizer.chat_prompt_ids(PROMPT))
    assert len(prompt_ids) > 2 * BUDGET  # the budget really selects
    address = f"127.0.0.1:{service.port}"
    with RemoteKVClient.connect(address, transport="rpc") as kv:
        assert greedy(model, kv, list(prompt_ids)) == local_greedy(model, prompt_ids)
        assert kv.stats().sequences == 0  # the engine released its sequence


def test_the_load_probe_reads_every_clients_sequences_from_the_replica(service):
    address = f"127.0.0.1:{service.port}"
    spec = SequenceSpec(LAYERS, KV, Q, DIM, policy="quest", budget=64, dense_layers=1)
    probe = LoadProbe()
    try:
        before = probe(address)
        with RemoteKVClient.connect(address) as one, RemoteKVClient.connect(address) as two:
            one.create("load-a", spec)
            two.create("load-b", spec)
            two.create("load-c", spec)
            assert probe(address) == before + 3
            one.release("load-a")
            assert probe(address) == before + 2
            two.release("load-b")
            two.release("load-c")
        with pytest.raises(ConnectionError, match="did not answer Stats"):
            LoadProbe(timeout=0.5)("127.0.0.1:9")  # nothing listens on the discard port
    finally:
        probe.close()
