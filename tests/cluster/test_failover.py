"""Failover in one process: two real cache services behind real gRPC servers on loopback, one
stopped mid-run (``server.stop(0)``).

Facts checked: the sharded client gives the stopped replica up, reports exactly its
sequences as lost and re-places them on the survivor, where the rebuilt sequence selects the
same page data; a replica started again on its port is reconnected and its pages get new
global ids; and the scheduler rebuilds a sequence lost mid-generation and replays it to the
very tokens of an in-process engine that saw no fault.
"""

import time

import numpy as np
import pytest

from cache_service.config import CacheServiceConfig
from cache_service.server import CacheServer, serve
from cache_service.types import SequenceSpec
from worker.engine import Engine, EngineConfig
from worker.kv.sharded import ShardedKVClient
from worker.kv_client import LocalKVClient, ReplicaState
from worker.placement import owner
from worker.scheduler import DoneEvent, Request, Scheduler, TokenEvent

SPEC = SequenceSpec(2, 3, 9, 64, policy="quest", budget=64, dense_layers=1)
POLICY, BUDGET = "icecache", 48  # prompts longer than the budget: selection matters
PROMPTS = (
    "Summarise: " + " ".join(f"item {i} weighs {i * 7 % 13} kg" for i in range(12)),
    "List the planets of the solar system and one fact about each of them, in order.",
)
NEW_TOKENS, STOP_AFTER_STEP = 10, 4


class Replicas:
    """Cache services on loopback by ``host:port``: ``stop`` one, ``start`` it again."""

    def __init__(self, count: int) -> None:
        self.running: dict[str, CacheServer] = {}
        for _ in range(count):
            server = _serve(0)
            self.running[f"127.0.0.1:{server.port}"] = server
        self.addresses = list(self.running)

    def stop(self, address: str) -> None:
        self.running.pop(address).stop(0)

    def start(self, address: str) -> CacheServer:
        """A new process of the replica, on its old port."""
        server = self.running[address] = _serve(int(address.rsplit(":", 1)[1]))
        return server

    def close(self) -> None:
        for server in self.running.values():
            server.stop(0)


def _serve(port: int) -> CacheServer:
    return serve(CacheServiceConfig(port=port, max_memory=64 * 2**20, workers=2))


@pytest.fixture
def replicas():
    running = Replicas(2)
    yield running
    running.close()


@pytest.fixture
def kv(replicas):
    client = ShardedKVClient.connect(replicas.addresses, health_interval=0.2, rpc_timeout=10)
    yield client
    client.close()


def _seq_on(address, addresses, prefix):
    """The first ``<prefix>-<n>`` that rendezvous hashing puts on ``address``."""
    return next(f"{prefix}-{n}" for n in range(64) if owner(f"{prefix}-{n}", addresses) == address)


def _fill(kv, seq, seed, prompt=100):
    """Create ``seq`` and append a prompt's K/V (the same for the same ``seed``)."""
    rng = np.random.default_rng(seed)
    kv.create(seq, SPEC)
    for layer in range(SPEC.num_layers):
        keys, values = rng.standard_normal((2, prompt, 3, 64), np.float32)
        kv.append(seq, layer, keys, values, np.arange(prompt))


def _step(kv, seqs, seeds, position=100):
    """One decode step of the last layer; a row's inputs are the same for the same seed."""
    rows = [np.random.default_rng(seed) for seed in seeds]
    keys, values = np.stack([r.standard_normal((2, 3, 64), np.float32) for r in rows], axis=1)
    queries = np.stack([r.standard_normal((9, 64), np.float32) for r in rows])
    return kv.decode(1, seqs, keys, values, np.full(len(seqs), position), queries)


def test_a_stopped_replica_loses_exactly_its_sequences_which_are_placed_on_the_survivor(
    replicas, kv
):
    victim, survivor = replicas.addresses
    doomed = _seq_on(victim, replicas.addresses, "s")
    kept = _seq_on(survivor, replicas.addresses, "s")
    _fill(kv, doomed, seed=1)
    _fill(kv, kept, seed=2)
    before = _step(kv, [doomed, kept], seeds=[3, 4])
    assert all(s.pages.size for s in before) and kv.take_lost() == set()
    want = kv.read_pages(before[0].pages)  # the doomed sequence's selected page data

    replicas.stop(victim)
    after = _step(kv, [doomed, kept], seeds=[5, 6], position=101)
    assert after[0].pages.size == 0 and not after[0].indptr.any()  # an empty row, no error
    assert after[1].pages.size > 0
    assert kv.take_lost() == {doomed} and kv.take_lost() == set()
    assert kv.replicas() == [
        ReplicaState(victim, healthy=False, sequences=1, placed_total=1),
        ReplicaState(survivor, healthy=True, sequences=1, placed_total=1),
    ]
    assert kv.routes.counts.failures == {victim: 1}

    kv.release(doomed)  # no call to the dead replica: just forgotten
    rebuilt = f"{doomed}.r1"
    _fill(kv, rebuilt, seed=1)
    assert kv.replica_of(rebuilt) == survivor
    again = _step(kv, [rebuilt], seeds=[3])[0]
    survivor_base = kv.shards[survivor].base
    assert again.pages.min() >= survivor_base  # the survivor's global ids
    assert np.array_equal(again.lens, before[0].lens)
    assert np.array_equal(kv.read_pages(again.pages), want)  # the same selection, elsewhere


def test_a_replica_started_again_is_reconnected_with_new_page_ids(replicas, kv):
    victim, survivor = replicas.addresses
    pages = kv.shards[victim].num_pages
    assert (kv.shards[victim].base, kv.shards[survivor].base) == (0, pages)
    seq = _seq_on(victim, replicas.addresses, "t")
    _fill(kv, seq, seed=5)
    replicas.stop(victim)
    _step(kv, [seq], seeds=[6])
    assert kv.take_lost() == {seq}
    kv.release(seq)

    server = replicas.start(victim)
    _wait(lambda: victim in kv.health.healthy())  # its health polls answer SERVING again
    _fill(kv, seq, seed=5)
    assert kv.replica_of(seq) == victim
    assert kv.shards[victim].base == 2 * pages  # after every earlier range, never reused
    sel = _step(kv, [seq], seeds=[7])[0]
    assert sel.pages.min() >= 2 * pages
    want = server.store.read_pages(sel.pages - 2 * pages)
    assert np.array_equal(kv.read_pages(sel.pages), want)  # the new process's pages


def test_the_scheduler_rebuilds_a_lost_sequence_and_replays_it_to_the_same_tokens(
    smollm, replicas, kv
):
    model, tokenizer = smollm
    config = EngineConfig(policy=POLICY, budget=BUDGET)
    prompts = [tokenizer.chat_prompt_ids(p) for p in PROMPTS]
    local = Engine(model, LocalKVClient.with_capacity(2**27, 16, 64), config)
    expected = [local.generate(p, NEW_TOKENS) for p in prompts]

    scheduler = Scheduler(Engine(model, kv, config), id_prefix="fo")
    stopped: list[str] = []

    def stop_a_replica(batch: int, seconds: float) -> None:  # on the scheduler's thread
        running = scheduler.running
        both = not stopped and len(running) == len(prompts)
        if both and min(len(r.output) for r in running) >= STOP_AFTER_STEP:
            stopped.append(kv.replica_of(running[0].seq.seq_id))
            replicas.stop(stopped[0])

    scheduler.on_step.append(stop_a_replica)
    requests = [Request(p, NEW_TOKENS) for p in prompts]
    scheduler.start()
    try:
        for request in requests:
            scheduler.submit(request)
        results = [_drain(r) for r in requests]
    finally:
        scheduler.stop()

    (victim,) = stopped
    survivor = next(a for a in replicas.addresses if a != victim)
    for (tokens, done), want in zip(results, expected, strict=True):
        assert tokens == done.token_ids == want  # every token, exactly as without the fault
        assert done.stats.replica == survivor
    lost = [done.stats for _, done in results if done.stats.recoveries]
    assert len(lost) == scheduler.recovered >= 1
    assert all(s.recoveries == 1 and s.replayed_tokens >= STOP_AFTER_STEP for s in lost)
    assert all(s.seq_id.endswith(".r1") for s in lost)
    assert scheduler.diverged == 0
    assert [r.sequences for r in kv.replicas()] == [0, 0]  # every sequence released


def _drain(request: Request) -> tuple[list[int], DoneEvent]:
    """The tokens sent for ``request`` and its final event."""
    tokens = []
    while True:
        event = request.events.get(timeout=300)
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        elif isinstance(event, DoneEvent):
            return tokens, event
        else:
            raise event.error


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
