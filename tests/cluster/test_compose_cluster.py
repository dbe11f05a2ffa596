"""The compose file's services as local processes: two cache services and a worker, for real.

One cluster per module (started by ``worker.launcher`` from ``docker-compose.yml`` with free
ports), the embedded SmolLM2, generation through the whole cluster compared with the
in-process engine, placement checked against rendezvous hashing, a replica stopped, and
nothing left in ``/dev/shm`` at the end.
"""

import json
import socket
import threading
import time
from pathlib import Path

import openai
import pytest

from worker.cli import main as icecache
from worker.client import WorkerClient, check_health
from worker.engine import Engine, EngineConfig
from worker.kv.remote import RemoteKVClient
from worker.kv_client import LocalKVClient
from worker.launcher import LocalCluster
from worker.placement import owner

POLICY, BUDGET = "icecache", 64
PROMPTS = ("Name three colours.", "Count from one to ten.", "Why is the sky blue?")
NEW_TOKENS = 10
SHM = Path("/dev/shm")
PORT_VARS = (
    "ICECACHE_CACHE0_PORT", "ICECACHE_CACHE0_METRICS_PORT",
    "ICECACHE_CACHE1_PORT", "ICECACHE_CACHE1_METRICS_PORT",
    "ICECACHE_WORKER_PORT", "ICECACHE_WORKER_METRICS_PORT", "ICECACHE_WORKER_HTTP_PORT",
)  # fmt: skip


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    overrides = dict(zip(PORT_VARS, map(str, _free_ports(len(PORT_VARS))), strict=True))
    overrides.update(ICECACHE_CACHE_MEMORY="256M", ICECACHE_POLICY=POLICY)
    overrides.update(ICECACHE_BUDGET=str(BUDGET), ICECACHE_MAX_BATCH="4")
    logs = tmp_path_factory.mktemp("cluster-logs")
    local = LocalCluster.from_compose(overrides=overrides, log_dir=logs)
    assert [s.name for s in local.services] == ["cache-0", "cache-1", "worker"]
    local.start(timeout=240)
    replicas = [local.address("cache-0"), local.address("cache-1")]
    segments = []
    for address in replicas:
        with RemoteKVClient.connect(address) as kv:
            segments.append(kv.info.segment.name)
    assert all((SHM / name).exists() for name in segments)
    try:
        yield local, replicas
    finally:
        codes = local.stop()
    assert codes == {"worker": 0, "cache-1": 0, "cache-0": 0}, codes
    assert not [name for name in segments if (SHM / name).exists()]


@pytest.fixture(scope="module")
def client(cluster):
    local, _ = cluster
    with WorkerClient(local.address("worker")).wait_ready() as worker:
        yield worker


@pytest.fixture(scope="module")
def expected(smollm):
    model, tokenizer = smollm
    kv = LocalKVClient.with_capacity(2**28, 16, model.config.head_dim)
    engine = Engine(model, kv, EngineConfig(policy=POLICY, budget=BUDGET))
    return [
        engine.generate(tokenizer.chat_prompt_ids(p), NEW_TOKENS, tokenizer.eos_token_ids)
        for p in PROMPTS
    ]


def _concurrently(client, prompts):
    results = [None] * len(prompts)

    def run(i):
        results[i] = client.complete(prompts[i], NEW_TOKENS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    return results


def test_the_cluster_generates_what_the_in_process_engine_does(cluster, client, expected):
    _, replicas = cluster
    results = _concurrently(client, PROMPTS)
    assert [r.token_ids for r in results] == expected
    for result in results:
        assert result.stats.replica == owner(result.stats.seq_id, replicas)
        assert result.stats.pages_selected > 0 and result.stats.pages_moved > 0
    info = client.info()
    assert [(r.address, r.healthy, r.sequences) for r in info.replicas] == [
        (replicas[0], True, 0),
        (replicas[1], True, 0),
    ]
    assert sum(r.placed_total for r in info.replicas) == len(PROMPTS)


def test_icecache_generate_server_prints_the_same_tokens(cluster, smollm, expected, capsys):
    local, _ = cluster
    argv = ["generate", "--server", local.address("worker"), "--prompt", PROMPTS[0],
            "--max-new-tokens", str(NEW_TOKENS), "--json"]  # fmt: skip
    assert icecache(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == expected[0]
    prompt_tokens = len(smollm[1].chat_prompt_ids(PROMPTS[0]))
    assert (out["policy"], out["budget"], out["prompt_tokens"]) == (POLICY, BUDGET, prompt_tokens)


def test_the_openai_client_gets_the_same_answers_over_http(cluster, smollm, expected):
    local, replicas = cluster
    tokenizer = smollm[1]
    (worker,) = (s for s in local.services if s.name == "worker")
    port = worker.environment["ICECACHE_HTTP_PORT"]
    url = f"http://127.0.0.1:{port}/v1"
    with openai.OpenAI(api_key="unused", base_url=url, max_retries=0) as api:
        (model,) = api.models.list()
        for prompt, want in zip(PROMPTS[:2], expected, strict=False):
            messages = [{"role": "user", "content": prompt}]
            kwargs = {"model": model.id, "messages": messages, "max_tokens": NEW_TOKENS}
            answer = api.chat.completions.create(**kwargs, temperature=0)
            text = tokenizer.decode([t for t in want if t not in tokenizer.eos_token_ids])
            assert answer.choices[0].message.content == text
            assert answer.model_extra["icecache"]["replica"] in replicas
            chunks = api.chat.completions.create(**kwargs, temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_a_document_asked_twice_is_prefilled_once_on_the_replica_its_blocks_name(
    cluster, client, smollm, doc_prompts
):
    """Prefix reuse through the cluster: the second question about one document starts from
    the blocks the first left on its replica (placed by them, so both meet there), prefills
    only its own tail, and answers exactly as with reuse turned off."""
    _, replicas = cluster
    tokenizer = smollm[1]
    doc = doc_prompts[2][:480]  # one whole prefill block of 256 tokens, and more
    asks = [doc + tokenizer.encode(q) for q in (" Summarise.", " What is the first word?")]
    first, second = (client.complete(ids, 6, chat=False) for ids in asks)
    assert (first.stats.reused_tokens, second.stats.reused_tokens) == (0, 256)
    assert second.stats.prefill_tokens == len(asks[1]) - 256
    assert first.stats.replica == second.stats.replica
    plain = client.complete(asks[1], 6, chat=False, reuse_prefix=False)
    assert plain.stats.reused_tokens == 0 and plain.token_ids == second.token_ids
    assert {r.stats.replica for r in (first, second, plain)} <= set(replicas)


def test_a_stopped_replica_takes_no_new_sequences(cluster, client, expected):
    local, replicas = cluster
    process = local.running["cache-1"].process
    process.terminate()
    assert process.wait(30) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client.info().replicas[1].healthy:
        time.sleep(0.2)
    assert [r.healthy for r in client.info().replicas] == [True, False]
    results = _concurrently(client, PROMPTS)
    assert [r.token_ids for r in results] == expected
    assert {r.stats.replica for r in results} == {replicas[0]}
    worker = local.address("worker")
    assert check_health(worker, service="icecache.v1.Worker")  # one replica left: ready
