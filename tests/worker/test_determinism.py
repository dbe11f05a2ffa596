"""A sequence's tokens depend on its prompt doc_outputs: not on the device page cache's size, not on
what it evicted, not on other sequences before or beside it, in one engine or several.

The device cache is sized far below a sequence's pages (each layer of each step evicts), and
every output is compared with the same prompt alone in an engine whose cache never evicts.
"""

import pytest

from cache_service.types import POLICIES
from tests.conftest import DOC_NEW_TOKENS as NEW_TOKENS
from tests.conftest import doc_engine, doc_store
from worker.scheduler import DoneEvent, ErrorEvent, Request, Scheduler, SchedulerConfig

ONE_LAYER_MB = 1  # 128 pages: one dense layer of one sequence (3 heads x 32 pages), no more
BATCH_MB = 4  # one dense layer of three sequences; a step touches ~2,000 pages


@pytest.mark.parametrize("policy", POLICIES)
def test_a_tiny_device_cache_gives_the_tokens_of_an_unbounded_one(
    smollm, doc_prompts, doc_outputs, policy
):
    engine = doc_engine(smollm, policy, ONE_LAYER_MB)
    first = engine.generate(doc_prompts[0], NEW_TOKENS)
    assert engine.cache.filled == engine.cache.capacity  # full, so every miss evicts
    assert engine.generate(doc_prompts[1], NEW_TOKENS) == doc_outputs[policy][1]
    again = engine.generate(doc_prompts[0], NEW_TOKENS)
    assert first == again == doc_outputs[policy][0]


@pytest.mark.parametrize("policy", ["icecache", "icecache-r", "quest"])
def test_tokens_do_not_depend_on_sequences_before_or_beside(
    smollm, doc_prompts, doc_outputs, policy
):
    engine = doc_engine(smollm, policy, BATCH_MB)
    want = doc_outputs[policy]
    assert engine.generate_batch([doc_prompts[2], doc_prompts[0]], NEW_TOKENS) == [want[2], want[0]]
    assert engine.generate(doc_prompts[1], NEW_TOKENS) == want[1]
    assert engine.generate_batch(doc_prompts[::-1], NEW_TOKENS) == want[::-1]
    assert engine.cache.stats.misses > engine.cache.capacity  # it evicted throughout


def test_engines_sharing_one_store_decode_side_by_side_unchanged(smollm, doc_prompts, doc_outputs):
    # Two schedulers (each its own thread and engine) over one store: the store interleaves
    # their layers' decodes while their sequences share its pool and index. One batches in a
    # small cache; the other decodes one sequence at a time in a one-layer cache.
    store = doc_store()
    engines = [(BATCH_MB, 16), (ONE_LAYER_MB, 1)]  # (device cache MiB, max batch)
    loops = [
        Scheduler(
            doc_engine(smollm, "icecache", cache_mb, store),
            SchedulerConfig(max_batch=batch),
            id_prefix=f"engine{i}",
        ).start()
        for i, (cache_mb, batch) in enumerate(engines)
    ]
    try:
        order = [(0, 0), (1, 1), (0, 2), (1, 0), (0, 1), (1, 2)]  # (engine, prompt)
        requests = [loops[e].submit(Request(doc_prompts[p], NEW_TOKENS)) for e, p in order]
        outputs = [_tokens(r) for r in requests]
    finally:
        for loop in loops:
            loop.stop()
    assert outputs == [doc_outputs["icecache"][p] for _, p in order]
    assert store.store.stats().sequences == 0
    assert all(loop.engine.cache.stats.misses > loop.engine.cache.capacity for loop in loops)


def _tokens(request: Request) -> list[int]:
    while True:
        event = request.events.get(timeout=300)
        if isinstance(event, DoneEvent):
            return event.token_ids
        assert not isinstance(event, ErrorEvent), event.error
