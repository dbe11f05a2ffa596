"""Prefix reuse in the engine, on the embedded model: a prompt that starts from blocks the
store kept gives exactly (bit for bit) the logits and tokens of its full prefill, under every
policy and with a float16 store, and prefills only the rest."""

import pytest
import torch

from cache_service.types import INDEXED_POLICIES, POLICIES
from worker.engine import Engine, EngineConfig
from worker.kv_client import LocalKVClient

BLOCK, NEW = 32, 5


def _engine(smollm, policy, reuse, dtype="float32"):
    kv = LocalKVClient.with_capacity(2**30, 16, 64, dtype)
    config = EngineConfig(policy=policy, budget=64, prefill_chunk=BLOCK, prefix_reuse=reuse)
    return Engine(smollm[0], kv, config)


def _run(engine, prompt, **start):
    """(first logits, greedy tokens, tokens reused, last logits) of one prompt; the sequence
    is released."""
    seq, logits = engine.start(prompt, **start)
    first = logits.clone()
    tokens = [int(logits.argmax())]
    try:
        for _ in range(NEW - 1):
            logits = engine.decode_step([seq], [tokens[-1]])[0]
            tokens.append(int(logits.argmax()))
    finally:
        engine.finish(seq)
    return first, tokens, seq.reused_tokens, logits


@pytest.fixture(scope="module")
def prompts(smollm, doc_prompts):
    doc = doc_prompts[0][:230]  # 7 whole blocks of 32, then the questions
    ask = [smollm[1].encode(q) for q in (" What is this about?", " Name one keyword here.")]
    return [doc + ask[0], doc + ask[1]]


@pytest.mark.parametrize("policy", POLICIES)
def test_reuse_gives_the_full_prefills_output_bit_for_bit(smollm, prompts, policy):
    shared = _engine(smollm, policy, reuse=True)
    plain = _engine(smollm, policy, reuse=False)
    first = _run(shared, prompts[0])
    assert first[2] == 0  # nothing kept yet
    second = _run(shared, prompts[1])
    assert second[2] == 7 * BLOCK  # the document's whole blocks
    again = _run(shared, prompts[0])  # the same prompt: all its blocks but the last token's
    assert again[2] == (len(prompts[0]) - 1) // BLOCK * BLOCK
    for got, prompt in ((second, prompts[1]), (again, prompts[0])):
        logits, tokens, _, last = _run(plain, prompt)
        assert torch.equal(got[0], logits) and torch.equal(got[3], last)
        assert got[1] == tokens
    assert shared.timings.prefill_tokens == sum(len(p) for p in (*prompts, prompts[0])) - (
        second[2] + again[2]
    )
    if policy in INDEXED_POLICIES:  # the later prompts started from the first one's index
        spec = shared.config.spec(smollm[0])
        heads = (spec.num_layers - spec.full_layers) * spec.num_kv_heads
        assert shared.kv.store.stats().prefix.index_reuses == 2 * heads


def test_a_float16_store_gives_the_same_output_with_and_without_reuse(smollm, prompts):
    shared = _engine(smollm, "quest", reuse=True, dtype="float16")
    plain = _engine(smollm, "quest", reuse=False, dtype="float16")
    _run(shared, prompts[0])
    reused = _run(shared, prompts[1])
    assert reused[2] == 7 * BLOCK
    logits, tokens, _, _ = _run(plain, prompts[1])
    assert torch.equal(reused[0], logits) and reused[1] == tokens


@pytest.mark.parametrize("policy", INDEXED_POLICIES)
def test_a_replay_builds_the_index_where_a_prefill_does_when_asked(smollm, prompts, policy):
    """The offline eval replays recorded prefills; with ``index_blocks`` its indexed
    sequences are the ones a worker serves (built over the whole blocks, the rest
    inserted), bit for bit."""
    engine = _engine(smollm, policy, reuse=False)
    record = engine.record_prefill(prompts[1])
    served = _run(engine, prompts[1])
    replayed = _run(engine, prompts[1], replay=record, index_blocks=True)
    assert torch.equal(served[3], replayed[3]) and served[1] == replayed[1]
    assert engine.kv.store.stats().prefix.blocks == 0  # reuse off: nothing kept


def test_a_request_can_turn_reuse_off_and_a_bad_block_size_is_refused(smollm, prompts):
    engine = _engine(smollm, "full", reuse=True)
    _run(engine, prompts[0])
    seq, _ = engine.start(prompts[1], reuse_prefix=False)
    assert seq.reused_tokens == 0
    engine.finish(seq)
    kv = LocalKVClient.with_capacity(2**26, 16, 64)
    with pytest.raises(ValueError, match="multiple of the cache service's page size"):
        Engine(smollm[0], kv, EngineConfig(prefill_chunk=40))


def test_the_block_prefill_matches_transformers_forward(smollm, smollm_dir, prompts):
    """The blocks change how the prompt is cut, not what it computes: the last logits agree
    with transformers' own one-pass forward on the same weights."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32)
    with torch.inference_mode():
        expected = reference(torch.tensor([prompts[1]])).logits[0, -1]
    logits, _, _, _ = _run(_engine(smollm, "full", reuse=False), prompts[1])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
