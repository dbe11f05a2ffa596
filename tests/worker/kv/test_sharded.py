"""ShardedKVClient: which replica gets which sequence, health, disjoint page ids, engine equality.

Replicas here are in-process stores behind the compose file's replica names, so placements
are exact and known in advance.
"""

import itertools

import numpy as np
import pytest

from cache_service.types import PrefixKeys, SequenceSpec
from worker.engine import Engine, EngineConfig
from worker.kv.health import HealthMonitor
from worker.kv.sharded import NoHealthyReplica, Shard, ShardedKVClient
from worker.kv_client import LocalKVClient, Traffic

A, B, C = "cache-0:50061", "cache-1:50062", "cache-2:50063"
SEQS = [f"req-{i}" for i in range(8)]
ON_TWO = {
    "req-0": B, "req-1": B, "req-2": A, "req-3": A,
    "req-4": B, "req-5": A, "req-6": B, "req-7": A,
}  # fmt: skip
ON_THREE = {**ON_TWO, "req-6": C}  # the new replica wins exactly one of the eight
SPEC = SequenceSpec(2, 3, 9, 64, policy="quest", budget=64, dense_layers=1)
PAGES = 512


def _sharded(addresses, pages=PAGES):
    shards = [Shard(a, LocalKVClient.with_capacity(pages * 8192, 16, 64), pages) for a in addresses]
    return ShardedKVClient(shards, HealthMonitor(addresses))  # not started: health set by hand


def _store(kv, address):
    return kv.shards[address].client.store


def _fill(kv, seq, prompt=100, seed=0):
    rng = np.random.default_rng(seed)
    kv.create(seq, SPEC)
    for layer in range(SPEC.num_layers):
        keys, values = rng.standard_normal((2, prompt, 3, 64), np.float32)
        kv.append(seq, layer, keys, values, np.arange(prompt))


def test_each_sequence_lands_on_its_rendezvous_owner():
    kv = _sharded([A, B])
    for seq in SEQS:
        kv.create(seq, SPEC)
    assert kv.routes.of == ON_TWO
    for seq, address in ON_TWO.items():
        assert seq in _store(kv, address)
        assert seq not in _store(kv, A if address == B else B)
    assert kv.routes.counts.live == {A: 4, B: 4} and kv.routes.counts.total == {A: 4, B: 4}


def test_a_third_replica_takes_only_the_sequences_it_wins():
    kv = _sharded([A, B, C])
    for seq in SEQS:
        kv.create(seq, SPEC)
    assert kv.routes.of == ON_THREE
    moved = {s for s in SEQS if ON_TWO[s] != ON_THREE[s]}
    assert moved == {"req-6"}


def test_an_unhealthy_replica_takes_no_new_sequences_but_keeps_its_own():
    kv = _sharded([A, B])
    _fill(kv, "req-0")  # B
    kv.health.mark(B, healthy=False)
    for seq in SEQS[1:]:
        kv.create(seq, SPEC)
    assert {kv.routes.of[s] for s in SEQS[1:]} == {A}
    assert kv.routes.of["req-0"] == B and "req-0" in _store(kv, B)
    kv.release("req-0")  # calls still route to the recorded replica
    assert "req-0" not in _store(kv, B) and kv.routes.counts.live[B] == 0
    kv.health.mark(B, healthy=True)
    kv.create("req-0", SPEC)
    assert kv.routes.of["req-0"] == B


def test_bounded_load_counts_the_sequences_other_workers_placed():
    """Two workers share three replicas. The first puts two questions about one document
    on the document's replica; a third question from the second worker finds that replica
    at its bound (2x the fair share of 3 sequences on 3 replicas) only if it asks the
    replicas how many they hold: its own count of them is 0."""
    document = PrefixKeys(tuple(bytes([i]) * 16 for i in range(4)), 256)
    first = _sharded([A, B, C])
    stores = {a: _store(first, a) for a in (A, B, C)}

    def held(address):
        return stores[address].stats().sequences  # every worker's sequences on it

    def second_worker(load):
        shards = [Shard(a, first.shards[a].client, PAGES) for a in (A, B, C)]
        return ShardedKVClient(shards, HealthMonitor([A, B, C]), load=load)

    first.create("w1-q1", SPEC, document)
    first.create("w1-q2", SPEC, document)
    (home,) = {first.routes.of["w1-q1"], first.routes.of["w1-q2"]}
    blind = second_worker(load=None)
    blind.create("blind-q3", SPEC, document)
    assert blind.routes.of["blind-q3"] == home  # its own count: the replica looks empty
    blind.release("blind-q3")
    seeing = second_worker(load=held)
    seeing.create("w2-q3", SPEC, document)
    assert seeing.routes.of["w2-q3"] != home
    assert held(home) == 2 and held(seeing.routes.of["w2-q3"]) == 1


def test_no_healthy_replica_is_a_clear_error():
    kv = _sharded([A, B])
    kv.health.mark(A, False)
    kv.health.mark(B, False)
    with pytest.raises(NoHealthyReplica, match="none of the cache-service replicas"):
        kv.create("req-0", SPEC)


def test_a_replica_listed_twice_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        _sharded([A, A])


def test_page_ids_are_disjoint_per_replica_and_read_back_from_their_owner():
    kv = _sharded([A, B])
    assert (kv.shards[A].base, kv.shards[B].base) == (0, PAGES)
    _fill(kv, "req-0", seed=1)  # on B
    _fill(kv, "req-2", seed=2)  # on A
    rng = np.random.default_rng(3)
    keys, values = rng.standard_normal((2, 2, 3, 64), np.float32)
    queries = rng.standard_normal((2, 9, 64), np.float32)
    sels = kv.decode(1, ["req-0", "req-2"], keys, values, np.array([100, 100]), queries)
    on_b, on_a = sels
    assert on_b.pages.min() >= PAGES and on_a.pages.max() < PAGES  # B's ids are offset
    pages = np.concatenate([on_b.pages, on_a.pages])
    expected = np.concatenate(
        [
            _store(kv, B).read_pages(on_b.pages - PAGES),
            _store(kv, A).read_pages(on_a.pages),
        ]
    )
    assert np.array_equal(kv.read_pages(pages), expected)
    # the local ids collide (both stores number pages from 0); the global ids do not
    assert set(on_b.pages - PAGES) & set(on_a.pages)
    assert not set(on_b.pages) & set(on_a.pages)


def test_append_only_steps_reach_each_owner_and_skip_lost_sequences():
    kv = _sharded([A, B])
    _fill(kv, "req-0", seed=1)  # on B
    _fill(kv, "req-2", seed=2)  # on A
    rng = np.random.default_rng(5)
    keys, values = rng.standard_normal((2, 2, 3, 64), np.float32)
    kv.append_step(0, ["req-0", "req-2"], keys, values, np.array([100, 100]))
    assert (_store(kv, B).length("req-0", 0), _store(kv, A).length("req-2", 0)) == (101, 101)
    assert not kv.take_lost()
    _store(kv, B).release("req-0")  # B forgets it (as after a restart): the step loses it
    kv.append_step(0, ["req-0", "req-2"], keys, values, np.array([101, 101]))
    assert _store(kv, A).length("req-2", 0) == 102  # A's sequence took its token
    assert kv.shards[B].stale
    kv.append_step(0, ["req-0", "req-2"], keys, values, np.array([102, 102]))  # req-0 skipped
    assert _store(kv, A).length("req-2", 0) == 103
    assert kv.take_lost() == {"req-0"}


def test_traffic_counts_pages_selected_and_read_per_sequence():
    kv = _sharded([A, B])
    _fill(kv, "req-0", seed=1)
    _fill(kv, "req-2", seed=2)
    rng = np.random.default_rng(4)
    keys, values = rng.standard_normal((2, 2, 3, 64), np.float32)
    queries = rng.standard_normal((2, 9, 64), np.float32)
    sels = kv.decode(1, ["req-0", "req-2"], keys, values, np.array([100, 100]), queries)
    kv.read_pages(np.unique(sels[1].pages)[:5])
    assert kv.take_traffic("req-0") == Traffic(pages_selected=sels[0].pages.size, pages_read=0)
    assert kv.take_traffic("req-2") == Traffic(pages_selected=sels[1].pages.size, pages_read=5)
    assert kv.take_traffic("req-2") == Traffic()  # taken: counted once


def test_an_engine_over_two_replicas_generates_what_it_does_over_one_store(smollm, monkeypatch):
    model, tokenizer = smollm
    prompts = [tokenizer.chat_prompt_ids(p) for p in ("Name a colour.", "Count to five.")]
    prompts.append(tokenizer.chat_prompt_ids("What is the capital of France?"))
    config = EngineConfig(policy="quest", budget=64)
    single = Engine(model, LocalKVClient.with_capacity(2**28, 16, 64), config)
    sharded_kv = _sharded([A, B], pages=4096)
    sharded = Engine(model, sharded_kv, config)
    want = single.generate_batch(prompts, 12, tokenizer.eos_token_ids)
    monkeypatch.setattr(Engine, "_ids", itertools.count())  # seq-0, seq-1, seq-2
    got = sharded.generate_batch(prompts, 12, tokenizer.eos_token_ids)
    assert got == want
    assert sharded_kv.routes.counts.total == {B: 2, A: 1}  # seq-0, seq-1 on B; seq-2 on A
    assert sharded_kv.routes.counts.live == {A: 0, B: 0} and not sharded_kv.routes.of
