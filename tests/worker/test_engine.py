"""The engine over the in-process store, on the real embedded model."""

import pydoc_data.topics

import pytest
import torch

from cache_service.types import INDEXED_POLICIES
from worker.engine import Engine, EngineConfig
from worker.factory import build_engine
from worker.kv_client import LocalKVClient
from worker.page_cache import DevicePageCache

SPARSE = ["oracle", "quest", "streaming", "kmeans", "icecache", "icecache-r", "icecache-tokens"]


def _text_ids(tokenizer, tokens: int) -> list[int]:
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40])
    return tokenizer.encode(text)[:tokens]


def _engine(smollm, **config) -> Engine:
    engine, _ = build_engine(EngineConfig(device_cache_mb=64, **config), loaded=smollm)
    return engine


def test_full_greedy_output_equals_transformers_generate(smollm, smollm_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm
    ids = tokenizer.chat_prompt_ids("What is the capital of France? Answer in one sentence.")
    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    want = hf.generate(
        torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=2
    )[0, len(ids) :].tolist()
    got = _engine(smollm, policy="full").generate(ids, 24)
    assert got == want


@pytest.mark.parametrize("policy", SPARSE)
def test_sparse_policies_equal_full_when_the_budget_covers_the_context(smollm, policy):
    # 150 prompt tokens + 12 generated < 256: every policy must attend to every token.
    ids = _text_ids(smollm[1], 150)
    full = _engine(smollm, policy="full").generate(ids, 12)
    assert _engine(smollm, policy=policy, budget=256).generate(ids, 12) == full


@pytest.mark.parametrize("policy", ["icecache", "quest"])
def test_sparse_decoding_attends_to_at_most_the_budget(smollm, policy):
    engine = _engine(smollm, policy=policy, budget=64)
    seen = []
    decode = engine.kv.decode

    def recording_decode(layer, *args):
        sels = decode(layer, *args)
        seen.extend((layer, s) for s in sels)
        return sels

    engine.kv.decode = recording_decode
    engine.generate(_text_ids(smollm[1], 400), 20)
    sparse = [s for layer, s in seen if layer >= 2]
    assert len(sparse) == 19 * 28
    for sel in sparse:
        per_head = [int(sel.lens[sel.indptr[h] : sel.indptr[h + 1]].sum()) for h in range(3)]
        assert 16 < max(per_head) <= 64
    dense = [s for layer, s in seen if layer < 2]
    assert all(s.tokens() == 3 * (400 + i // 2 + 1) for i, s in enumerate(dense))
    store = engine.kv.store  # all released but the prompt's kept 256-token block and the
    stats = store.stats()  # index built over it (for the indexed policies)
    blocks = store.prefixes._blocks.values()
    index_pages = sum(len(b.all_pages()) for block in blocks for b in block.bodies.values())
    assert stats.pages_used == stats.prefix.pages == 30 * 3 * 256 // 16 + index_pages
    assert (index_pages > 0) == (policy in INDEXED_POLICIES)


@pytest.mark.parametrize("policy", ["icecache", "full"])  # dense copies of 2 and of 30 layers
def test_batched_decoding_equals_one_sequence_at_a_time(smollm, policy):
    prompts = [_text_ids(smollm[1], n) for n in (90, 130)]
    engine = _engine(smollm, policy=policy, budget=64)
    alone = [engine.generate(p, 10) for p in prompts]
    assert engine.generate_batch(prompts, 10) == alone


def test_bad_requests_are_clear_errors(smollm):
    with pytest.raises(ValueError, match="unknown policy 'best'"):
        _engine(smollm, policy="best")
    with pytest.raises(ValueError, match="budget 16 is below"):
        _engine(smollm, policy="quest", budget=16)
    engine = _engine(smollm, policy="quest", budget=64)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.start([])
    with pytest.raises(ValueError, match="the model supports 8192"):
        engine.start([1] * 9000)
    assert engine.kv.store.stats().sequences == 0


def test_decode_steps_move_only_the_pages_that_changed(smollm):
    # With a budget over the context every page is selected at every step, but only each
    # (layer, KV head)'s last page takes the new token: the device page cache must load
    # exactly those. (The dense layers attend over their contiguous copy, not the cache.)
    engine = _engine(smollm, policy="quest", budget=512, pages_in_place=False)
    model = smollm[0]
    seq, logits = engine.start(_text_ids(smollm[1], 150))
    token = int(torch.argmax(logits))
    paged_layers = model.config.num_layers - engine.config.dense_layers
    heads = paged_layers * model.config.num_kv_heads
    for step in range(5):  # the sequence grows from 151 to 155 tokens: 10 pages per head
        before = engine.cache.stats.bytes_moved
        token = int(torch.argmax(engine.decode_step([seq], [token])[0]))
        if step > 0:
            assert engine.cache.stats.bytes_moved - before == heads * engine.cache.page_bytes
    assert engine.cache.stats.misses == heads * (10 + 4)  # all pages once, then 1 per step
    assert engine.cache.stats.hits == heads * 10 * 5 - engine.cache.stats.misses
    engine.finish(seq)


@pytest.mark.parametrize("policy", ["icecache", "icecache-tokens", "quest"])
def test_pages_read_in_place_give_the_same_logits_as_the_page_cache(smollm, policy):
    # The same prompt into a fresh store each: attention over the store's own pages and
    # over the copies a small device page cache makes (evicting at every step) must agree
    # bit for bit.
    ids = _text_ids(smollm[1], 700)
    runs = []
    for in_place in (True, False):
        engine = _engine(smollm, policy=policy, budget=64, pages_in_place=in_place)
        engine.cache = DevicePageCache(40, engine.kv.page_size, smollm[0].config.head_dim)
        assert (engine.in_place is not None) == in_place
        seq, logits = engine.start(ids)
        steps = [logits]
        for _ in range(12):
            token = int(torch.argmax(steps[-1]))
            steps.append(engine.decode_step([seq], [token])[0])
        engine.finish(seq)
        runs.append((torch.stack(steps), engine.cache.stats))
    (in_place, unused), (copied, cache) = runs
    assert torch.equal(in_place, copied)
    assert unused.loads == 0 and unused.bytes_moved == 0
    assert cache.misses > 40  # the copies went through evictions


def test_pages_are_copied_when_the_store_keeps_another_dtype(smollm):
    # A float16 store under a float32 model: the page cache converts; nothing in place.
    kv = LocalKVClient.with_capacity(2**28, 16, smollm[0].config.head_dim, dtype="float16")
    engine = Engine(smollm[0], kv, EngineConfig(policy="quest", budget=64))
    assert engine.in_place is None
    seq, logits = engine.start(_text_ids(smollm[1], 200))
    engine.decode_step([seq], [int(torch.argmax(logits))])
    assert engine.cache.stats.loads > 0
