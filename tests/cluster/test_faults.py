"""Faults on real processes: a cache-service replica SIGKILLed in the middle of generations,
then restarted; a worker process drained by SIGTERM.

The replicas are the compose file's ``cache-0`` and ``cache-1`` run by ``worker.launcher`` on
free loopback ports; the first worker runs in this process (so the test can read its
scheduler), the drained one is ``python -m worker``. Every output is compared token for
token with the in-process engine on the same prompt (and the same seed, for a sampled one).
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from worker.client import WorkerClient, check_health
from worker.engine import Engine, EngineConfig
from worker.kv.remote import RemoteKVClient
from worker.kv_client import LocalKVClient
from worker.launcher import LocalCluster
from worker.placement import owner
from worker.sampling import GREEDY, SamplingParams
from worker.serving.config import WorkerConfig
from worker.serving.server import serve

from .test_compose_cluster import _free_ports

POLICY, BUDGET = "icecache", 48  # prompts longer than the budget: selection matters
PROMPTS = (
    "Summarise: " + " ".join(f"item {i} weighs {i * 7 % 13} kg" for i in range(12)),
    "List the planets of the solar system and one fact about each of them, in order.",
)
NEW_TOKENS = 10
SHORT, SHORT_TOKENS = "Say hi.", 3
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 2026}
ROOT = Path(__file__).resolve().parents[2]


def _reference(smollm, prompts, new_tokens, sampling=GREEDY):
    model, tokenizer = smollm
    kv = LocalKVClient.with_capacity(2**27, 16, model.config.head_dim)
    engine = Engine(model, kv, EngineConfig(policy=POLICY, budget=BUDGET))
    ids = [tokenizer.chat_prompt_ids(p) for p in prompts]
    return [engine.generate(i, new_tokens, sampling=sampling) for i in ids]


@pytest.fixture(scope="module")
def expected(smollm):
    return [*_reference(smollm, PROMPTS, NEW_TOKENS), *_reference(smollm, [SHORT], SHORT_TOKENS)]


@pytest.fixture(scope="module")
def expected_sampled(smollm, expected):
    (tokens,) = _reference(smollm, PROMPTS[1:], NEW_TOKENS, SamplingParams(**SAMPLED))
    assert tokens != expected[1]  # sampling changes this output
    return tokens


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    names = ("ICECACHE_CACHE0_PORT", "ICECACHE_CACHE0_METRICS_PORT")
    names += ("ICECACHE_CACHE1_PORT", "ICECACHE_CACHE1_METRICS_PORT")
    overrides = dict(zip(names, map(str, _free_ports(len(names))), strict=True))
    overrides["ICECACHE_CACHE_MEMORY"] = "128M"
    logs = tmp_path_factory.mktemp("fault-logs")
    cluster = LocalCluster.from_compose(
        overrides=overrides, names=["cache-0", "cache-1"], log_dir=logs
    )
    cluster.start(timeout=120)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def worker(smollm, replicas):
    addresses = (replicas.address("cache-0"), replicas.address("cache-1"))
    config = WorkerConfig(
        cache_services=addresses, port=0, engine=EngineConfig(policy=POLICY, budget=BUDGET),
        health_interval_s=0.2, rpc_timeout_s=20,
    )  # fmt: skip
    running = serve(config, loaded=smollm)
    running.scheduler.id_prefix = "faults"  # placements computable in advance
    try:
        yield running
    finally:
        running.stop(0)


@pytest.fixture(scope="module")
def client(worker):
    with WorkerClient(f"127.0.0.1:{worker.port}").wait_ready() as c:
        yield c


def _service_of(replicas, address):
    return next(s.name for s in replicas.services if replicas.address(s.name) == address)


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_replica_killed_mid_generation_loses_no_token(
    replicas, worker, client, expected, expected_sampled
):
    """A sampled stream goes first, so its sequence (``faults-<n>``) and the victim, its
    replica, are known: the sampled sequence is always one of those rebuilt."""
    calls = [(PROMPTS[1], SAMPLED), *((p, {}) for p in PROMPTS)]
    want = [expected_sampled, *expected[: len(PROMPTS)]]
    started = [threading.Event() for _ in calls]
    results: list = [None] * len(calls)

    def run(i):
        tokens = []
        prompt, sampling = calls[i]
        for message in client.generate(prompt, NEW_TOKENS, ignore_eos=True, **sampling):
            if message.HasField("token"):
                tokens.append(message.token.id)
                if len(tokens) == 3:
                    started[i].set()
            else:
                results[i] = (tokens, message.done)

    sampled_seq = f"faults-{worker.scheduler.started}"
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    threads[0].start()
    assert started[0].wait(180)
    for thread in threads[1:]:
        thread.start()
    assert all(event.wait(180) for event in started)
    placed = {r.address: r.sequences for r in client.info().replicas}
    victim = owner(sampled_seq, list(placed))
    survivor = next(a for a in placed if a != victim)
    assert placed[victim] >= 1
    replicas.kill(_service_of(replicas, victim))
    for thread in threads:
        thread.join(300)
    for (tokens, done), tokens_wanted in zip(results, want, strict=True):
        assert tokens == list(done.token_ids) == tokens_wanted  # exactly as without the fault
        assert done.stats.replica == survivor
    recovered = [done.stats.recoveries for _, done in results]
    assert sum(recovered) == placed[victim]
    assert all(d.stats.replayed_tokens >= 3 for _, d in results if d.stats.recoveries)
    sampled = results[0][1]
    assert sampled.stats.seq_id.startswith(f"{sampled_seq}.r1") and sampled.stats.recoveries == 1
    assert sampled.seed == SAMPLED["seed"]
    info = client.info()
    assert info.recovered_sequences == placed[victim]
    assert {r.address: r.healthy for r in info.replicas} == {victim: False, survivor: True}
    assert worker.scheduler.diverged == 0
    with RemoteKVClient.connect(survivor) as kv:
        assert kv.stats().sequences == 0  # rebuilt sequences were released at the end


def test_new_sequences_avoid_the_dead_replica(replicas, worker, client, expected):
    dead = next(r.address for r in client.info().replicas if not r.healthy)
    result = client.complete(SHORT, SHORT_TOKENS, ignore_eos=True)
    assert result.token_ids == expected[2]
    assert result.stats.replica != dead and result.stats.recoveries == 0


def test_a_restarted_replica_is_reconnected_and_takes_its_sequences_again(
    replicas, worker, client, expected
):
    dead = next(r.address for r in client.info().replicas if not r.healthy)
    replicas.restart(_service_of(replicas, dead))
    _wait(lambda: all(r.healthy for r in client.info().replicas))
    addresses = [r.address for r in client.info().replicas]
    n = worker.scheduler.started
    lands = next(k for k in range(n, n + 64) if owner(f"faults-{k}", addresses) == dead)
    for _ in range(n, lands):  # sequences that the rendezvous puts on the other replica
        client.complete([1, 2, 3], 1, chat=False)
    result = client.complete(PROMPTS[0], NEW_TOKENS, ignore_eos=True)
    assert (result.stats.seq_id, result.stats.replica) == (f"faults-{lands}", dead)
    assert result.token_ids == expected[0]  # pages of the new incarnation, not stale ones


def test_a_replica_restarted_while_idle_is_noticed_before_it_takes_a_sequence(
    replicas, worker, client, expected
):
    addresses = [r.address for r in client.info().replicas]
    n = worker.scheduler.started
    target = owner(f"faults-{n}", addresses)  # where the next sequence goes
    replicas.kill(_service_of(replicas, target))  # it holds nothing: no call to it fails
    replicas.restart(_service_of(replicas, target))
    _wait(lambda: all(r.healthy for r in client.info().replicas))
    result = client.complete(PROMPTS[0], NEW_TOKENS, ignore_eos=True)
    assert (result.stats.seq_id, result.stats.replica) == (f"faults-{n}", target)
    assert result.token_ids == expected[0]  # read from the new process's pool, not the old


# ---- graceful shutdown --------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(replicas, expected, tmp_path):
    (port,) = _free_ports(1)
    address = f"127.0.0.1:{port}"
    addresses = f"{replicas.address('cache-0')},{replicas.address('cache-1')}"
    command = [
        sys.executable, "-m", "worker", "--port", str(port), "--cache-service", addresses,
        "--policy", POLICY, "--budget", str(BUDGET), "--grace-s", "120", "--log-format", "text",
    ]  # fmt: skip
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        _wait(lambda: check_health(address, service="icecache.v1.Worker"), timeout=180)
        with WorkerClient(address) as client:
            stream = client.generate(PROMPTS[0], NEW_TOKENS, ignore_eos=True)
            first = next(stream)
            process.send_signal(signal.SIGTERM)
            _wait(lambda: not check_health(address))  # NOT_SERVING while it drains
            with pytest.raises(grpc.RpcError) as refused:
                list(client.generate(SHORT, 2, request_id="late"))
            rest = list(stream)
        assert process.wait(120) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    tokens = [first.token.id] + [m.token.id for m in rest[:-1]]
    assert tokens == list(rest[-1].done.token_ids) == expected[0]
    assert "draining 1 in-flight request" in log_path.read_text()
