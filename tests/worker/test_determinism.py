"""A sequence's tokens depend on its prompt alone: not on the device page cache's size, not on
what it evicted, not on other sequences before or beside it, in one engine or several.

The device cache is sized far below a sequence's pages (each layer of each step evicts), and
every output is compared with the same prompt alone in an engine whose cache never evicts.
"""

import pydoc_data.topics

import pytest

from cache_service.types import POLICIES
from worker.engine import Engine, EngineConfig
from worker.kv_client import LocalKVClient
from worker.scheduler import DoneEvent, ErrorEvent, Request, Scheduler

BUDGET, NEW_TOKENS = 64, 10
PROMPT_TOKENS = (470, 380, 500)  # ~30 pages per (layer, KV head), far over the budget
UNBOUNDED_MB = 256  # holds every page of these sequences: never evicts
ONE_LAYER_MB = 1  # 128 pages: one dense layer of one sequence (3 heads x 32 pages), no more
BATCH_MB = 4  # one dense layer of three sequences; a step touches ~2,000 pages


def _store() -> LocalKVClient:
    return LocalKVClient.with_capacity(2**30, 16, 64)  # the OS backs only pages written


def _engine(smollm, policy: str, cache_mb: int, kv: LocalKVClient | None = None) -> Engine:
    config = EngineConfig(policy=policy, budget=BUDGET, device_cache_mb=cache_mb)
    return Engine(smollm[0], kv or _store(), config)


@pytest.fixture(scope="module")
def prompts(smollm) -> list[list[int]]:
    """Three prompts of real text, each from another part of the Python docs."""
    topics = pydoc_data.topics.topics
    names = sorted(topics)
    out = []
    for i, tokens in enumerate(PROMPT_TOKENS):
        text = " ".join(topics[k] for k in names[26 * i : 26 * i + 26])
        out.append(smollm[1].encode(text)[:tokens])
    return out


@pytest.fixture(scope="module")
def alone(smollm, prompts) -> dict[str, list[list[int]]]:
    """Each prompt's tokens under each policy, alone in an engine that never evicts."""
    out = {}
    for policy in POLICIES:
        engine = _engine(smollm, policy, UNBOUNDED_MB)
        out[policy] = [engine.generate(p, NEW_TOKENS) for p in prompts]
        assert engine.cache.stats.hits > 0  # resident pages were reused, never evicted
        assert engine.cache.filled < engine.cache.capacity
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_a_tiny_device_cache_gives_the_tokens_of_an_unbounded_one(smollm, prompts, alone, policy):
    engine = _engine(smollm, policy, ONE_LAYER_MB)
    first = engine.generate(prompts[0], NEW_TOKENS)
    assert engine.cache.filled == engine.cache.capacity  # full, so every miss evicts
    assert engine.generate(prompts[1], NEW_TOKENS) == alone[policy][1]
    again = engine.generate(prompts[0], NEW_TOKENS)
    assert first == again == alone[policy][0]


@pytest.mark.parametrize("policy", ["icecache", "icecache-r", "quest"])
def test_tokens_do_not_depend_on_sequences_before_or_beside(smollm, prompts, alone, policy):
    engine = _engine(smollm, policy, BATCH_MB)
    want = alone[policy]
    assert engine.generate_batch([prompts[2], prompts[0]], NEW_TOKENS) == [want[2], want[0]]
    assert engine.generate(prompts[1], NEW_TOKENS) == want[1]
    assert engine.generate_batch(prompts[::-1], NEW_TOKENS) == want[::-1]
    assert engine.cache.stats.misses > engine.cache.capacity  # it evicted throughout


def test_engines_sharing_one_store_decode_side_by_side_unchanged(smollm, prompts, alone):
    # Two schedulers (each its own thread, engine and tiny device cache) over one store: the
    # store interleaves their layers' decodes while their sequences share its pool and index.
    store = _store()
    loops = [
        Scheduler(_engine(smollm, "icecache", BATCH_MB, store), id_prefix=f"engine{i}").start()
        for i in range(2)
    ]
    try:
        order = [(0, 0), (1, 1), (0, 2), (1, 0), (0, 1), (1, 2)]  # (engine, prompt)
        requests = [loops[e].submit(Request(prompts[p], NEW_TOKENS)) for e, p in order]
        outputs = [_tokens(r) for r in requests]
    finally:
        for loop in loops:
            loop.stop()
    assert outputs == [alone["icecache"][p] for _, p in order]
    assert store.store.stats().sequences == 0
    assert all(loop.engine.cache.stats.misses > loop.engine.cache.capacity for loop in loops)


def _tokens(request: Request) -> list[int]:
    while True:
        event = request.events.get(timeout=300)
        if isinstance(event, DoneEvent):
            return event.token_ids
        assert not isinstance(event, ErrorEvent), event.error
