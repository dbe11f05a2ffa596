"""The batching loop and the worker's gRPC service, in process, over an in-process store."""

import functools
import json
import socket
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from worker import cli
from worker.client import WorkerClient, check_health, generate_request
from worker.engine import Engine, EngineConfig
from worker.kv_client import LocalKVClient
from worker.sampling import SamplingParams
from worker.scheduler import DeadlineExceeded, DoneEvent, ErrorEvent, Request, Scheduler, TokenEvent
from worker.serving.config import WorkerConfig
from worker.serving.server import serve

POLICY, BUDGET = "icecache", 64
PROMPTS = ("Name three colours.", "Count from one to ten.", "Why is the sky blue?")
NEW_TOKENS = (12, 7, 10)


def _engine(model):
    kv = LocalKVClient.with_capacity(2**28, 16, model.config.head_dim)
    return Engine(model, kv, EngineConfig(policy=POLICY, budget=BUDGET))


@pytest.fixture(scope="module")
def expected(smollm):
    """In-process greedy outputs of each prompt alone."""
    model, tokenizer = smollm
    engine = _engine(model)
    return [
        engine.generate(tokenizer.chat_prompt_ids(p), n, tokenizer.eos_token_ids)
        for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)
    ]


@pytest.fixture
def scheduler(smollm):
    loop = Scheduler(_engine(smollm[0])).start()
    yield loop
    loop.stop()


def _drain(request, tokens=(), timeout=120):
    tokens = list(tokens)
    while True:
        event = request.events.get(timeout=timeout)
        if isinstance(event, DoneEvent):
            assert [t.token_id for t in tokens] == event.token_ids
            assert [t.index for t in tokens] == list(range(len(tokens)))
            return event
        assert isinstance(event, TokenEvent), event
        tokens.append(event)


def test_concurrent_requests_get_the_engines_own_greedy_output(smollm, expected, scheduler):
    tokenizer = smollm[1]
    ids = [tokenizer.chat_prompt_ids(p) for p in PROMPTS]
    first = scheduler.submit(Request(ids[0], NEW_TOKENS[0], tokenizer.eos_token_ids))
    started = first.events.get(timeout=60)
    assert isinstance(started, TokenEvent)  # the first request is running
    later = [
        scheduler.submit(Request(i, n, tokenizer.eos_token_ids))
        for i, n in zip(ids[1:], NEW_TOKENS[1:], strict=True)
    ]  # they join the running batch
    done = [_drain(r) for r in later]
    outputs = [_drain(first, [started]).token_ids, *(d.token_ids for d in done)]
    assert outputs == expected
    assert max(d.stats.mean_batch for d in done) > 1  # decode steps were shared
    assert scheduler.engine.kv.store.stats().sequences == 0


def test_cancel_and_zero_tokens_finish_and_release(smollm, scheduler):
    tokenizer = smollm[1]
    prompt = tokenizer.chat_prompt_ids(PROMPTS[0])
    zero = _drain(scheduler.submit(Request(prompt, 0)))
    assert (zero.token_ids, zero.stats.finish_reason) == ([], "length")
    long = scheduler.submit(Request(prompt, 10_000))
    assert isinstance(long.events.get(timeout=60), TokenEvent)
    long.cancel()
    event = long.events.get(timeout=60)
    while isinstance(event, TokenEvent):
        event = long.events.get(timeout=60)
    assert event.stats.finish_reason == "cancelled" and len(event.token_ids) < 100
    assert scheduler.engine.kv.store.stats().sequences == 0


def test_negative_max_tokens_are_refused(scheduler):
    with pytest.raises(ValueError, match="max_new_tokens"):
        scheduler.submit(Request([1, 2], -1))


# ---- gRPC ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(smollm):
    config = WorkerConfig(
        cache_services=("in-process:0",),
        port=0,
        engine=EngineConfig(policy=POLICY, budget=BUDGET),
        metrics_port=0,
    )
    kv = LocalKVClient.with_capacity(2**28, 16, smollm[0].config.head_dim)
    running = serve(config, loaded=smollm, kv=kv)
    running.http_port = running.metrics.serve_http(0, "127.0.0.1")
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with WorkerClient(f"127.0.0.1:{server.port}").wait_ready() as worker:
        yield worker


def test_generate_streams_the_engines_tokens_then_usage_and_stats(smollm, expected, client):
    tokenizer = smollm[1]
    results = [None] * len(PROMPTS)

    def run(i):
        results[i] = list(client.generate(PROMPTS[i], NEW_TOKENS[i], chat=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for i, messages in enumerate(results):
        *tokens, last = messages
        done = last.done
        assert list(done.token_ids) == [m.token.id for m in tokens] == expected[i]
        assert "".join(m.token.text for m in tokens) == done.text
        assert done.text == tokenizer.decode(
            [t for t in expected[i] if t not in tokenizer.eos_token_ids]
        )
        prompt_tokens = len(tokenizer.chat_prompt_ids(PROMPTS[i]))
        assert (done.usage.prompt_tokens, done.usage.output_tokens) == (
            prompt_tokens,
            len(expected[i]),
        )
        stats = done.stats
        assert (stats.policy, stats.budget, stats.dense_layers) == (POLICY, BUDGET, 2)
        assert stats.finish_reason in ("stop", "length") and stats.replica == "in-process"
        assert stats.decode_steps == len(expected[i]) - 1
        assert 0 < stats.first_token_s <= stats.total_s


BYTES_PER_VALUE = {"float32": 4, "float16": 2}  # IEEE 754 single and half precision
SMOLLM_KV_VALUES_PER_TOKEN = 2 * 30 * 3 * 64  # K and V, 30 layers, 3 KV heads, head_dim 64


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kv_bytes_stored_counts_the_pools_bytes_per_value(smollm, dtype):
    config = WorkerConfig(
        cache_services=("in-process:0",),
        port=0,
        engine=EngineConfig(policy=POLICY, budget=BUDGET),
        metrics_port=0,
    )
    kv = LocalKVClient.with_capacity(2**28, 16, smollm[0].config.head_dim, dtype=dtype)
    running = serve(config, loaded=smollm, kv=kv)
    try:
        with WorkerClient(f"127.0.0.1:{running.port}").wait_ready() as worker:
            *tokens, last = worker.generate(PROMPTS[0], 3, chat=True)
    finally:
        running.stop(0)
    stats = last.done.stats
    assert kv.store.pool.data.dtype.itemsize == BYTES_PER_VALUE[dtype]
    tokens_stored = len(smollm[1].chat_prompt_ids(PROMPTS[0])) + stats.decode_steps
    assert stats.decode_steps == len(tokens) - 1 == 2
    assert (
        stats.kv_bytes_stored == tokens_stored * SMOLLM_KV_VALUES_PER_TOKEN * BYTES_PER_VALUE[dtype]
    )


def test_count_tokens_and_info(smollm, client):
    tokenizer = smollm[1]
    assert client.count_tokens(PROMPTS[0]) == len(tokenizer.chat_prompt_ids(PROMPTS[0]))
    assert client.count_tokens("hello", chat=False) == len(tokenizer.encode("hello"))
    info = client.info()
    assert (info.policy, info.budget, info.max_context) == (POLICY, BUDGET, 8192)


BAD = [
    ({"prompt": "", "chat": False}, "the prompt is empty; give at least one token"),
    ({"prompt": [49152]}, "prompt ids must be in 0..49151"),
    ({"prompt": [1] * 8192}, "the model supports 8192; shorten it"),
    ({"prompt": "hi", "max_new_tokens": -1}, "max_tokens over HTTP) must be >= 0"),
    ({"prompt": "hi", "max_new_tokens": 5000}, "allows at most 4096 (--max-new-tokens)"),
    ({"prompt": [1] * 8000, "max_new_tokens": 500}, "ask for at most 192 or shorten the prompt"),
    ({"prompt": "hi", "policy": "nope"}, "unknown policy 'nope'; choose one of full, oracle"),
    ({"prompt": "hi", "budget": 0}, "budget must be a positive number of tokens, got 0"),
    ({"prompt": "hi", "budget": 16}, "budget 16 is below the sink tokens plus the recent window"),
    ({"prompt": "hi", "temperature": -1.0}, "temperature must be >= 0 (0 is greedy), got -1.0"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_k": -2}, "top_k must be >= 0"),
    ({"prompt": "hi", "stop": ["x", ""]}, "stop strings must not be empty"),
    ({"prompt": "hi", "stop_token_ids": [49152]}, "stop_token_ids must be in 0..49151"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD)
def test_bad_requests_are_invalid_argument_with_a_message(client, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate(kwargs.pop("prompt"), kwargs.pop("max_new_tokens"), **kwargs))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_health_reflection_and_metrics(server, client):
    address = f"127.0.0.1:{server.port}"
    assert check_health(address) and check_health(address, service="icecache.v1.Worker")
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in reply.list_services_response.service}
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert {"icecache.v1.Worker", "grpc.health.v1.Health"} <= names
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    client.complete("Say hi.", 2)
    scrape = functools.partial(urllib.request.urlopen, timeout=5)
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    # The server lets go of a call just after its last response goes out, so the client
    # may read the answer before the in-flight count drops: wait for it (10 s at most).
    deadline = time.monotonic() + 10
    text = scrape(url).read().decode()
    while "icecache_worker_inflight_requests 0.0" not in text and time.monotonic() < deadline:
        time.sleep(0.05)
        text = scrape(url).read().decode()
    assert 'icecache_worker_requests_total{code="OK"}' in text
    assert 'icecache_worker_requests_total{code="INVALID_ARGUMENT"}' in text
    assert "icecache_worker_generated_tokens_total" in text
    assert "icecache_worker_active_sequences 0.0" in text
    assert "icecache_worker_recovered_sequences 0.0" in text  # in-process: nothing to rebuild
    assert "icecache_worker_inflight_requests 0.0" in text


def test_a_request_may_choose_its_own_policy_and_budget(smollm, client):
    model, tokenizer = smollm
    kv = LocalKVClient.with_capacity(2**26, 16, model.config.head_dim)
    engine = Engine(model, kv, EngineConfig(policy="streaming", budget=32))
    want = engine.generate(tokenizer.chat_prompt_ids(PROMPTS[1]), 6, tokenizer.eos_token_ids)
    result = client.complete(PROMPTS[1], 6, policy="streaming", budget=32)
    assert result.token_ids == want
    assert (result.stats.policy, result.stats.budget) == ("streaming", 32)


def test_a_call_past_its_deadline_is_stopped_and_released(server, client):
    with pytest.raises(grpc.RpcError) as late:
        list(client.generate(PROMPTS[0], 4000, ignore_eos=True, timeout=1.5))
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    store = server.scheduler.engine.kv.store
    deadline = time.monotonic() + 10
    while (server.scheduler.active or store.stats().sequences) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (server.scheduler.active, store.stats().sequences) == (0, 0)


def test_an_expired_request_is_not_prefilled(scheduler):
    started = scheduler.started
    request = scheduler.submit(Request([1, 2, 3], 4, deadline=time.perf_counter() - 1))
    event = request.events.get(timeout=30)
    assert isinstance(event, ErrorEvent) and isinstance(event.error, DeadlineExceeded)
    assert "deadline passed while waiting" in str(event.error)
    assert scheduler.started == started and scheduler.engine.kv.store.stats().sequences == 0


def test_calls_beyond_max_requests_are_resource_exhausted(smollm):
    config = WorkerConfig(
        cache_services=("in-process:0",), port=0, engine=EngineConfig(policy=POLICY, budget=BUDGET),
        max_requests=1, workers=3,
    )  # fmt: skip
    kv = LocalKVClient.with_capacity(2**26, 16, smollm[0].config.head_dim)
    running = serve(config, loaded=smollm, kv=kv)
    try:
        with WorkerClient(f"127.0.0.1:{running.port}").wait_ready() as worker:
            stream = worker.generate(PROMPTS[0], 4000, ignore_eos=True)
            assert next(stream).HasField("token")
            with pytest.raises(grpc.RpcError) as busy:
                worker.complete(PROMPTS[1], 2)
            assert worker.info().max_requests == 1  # Info still answers
            stream.cancel()
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already serving 1 requests (its --max-requests)" in busy.value.details()
        assert worker.retries == 0  # back-pressure is not retried
    finally:
        running.stop(0)


# ---- sampling and stop strings ---------------------------------------------------------------
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}


def test_a_seeded_call_gets_the_engines_sampled_tokens_and_an_unseeded_one_its_seed(
    smollm, expected, client
):
    model, tokenizer = smollm
    ids = tokenizer.chat_prompt_ids(PROMPTS[2])
    params = SamplingParams(**SAMPLED, seed=2**63 + 5)  # a seed past int64 survives the wire
    want = _engine(model).generate(ids, NEW_TOKENS[2], tokenizer.eos_token_ids, params)
    seeded = client.complete(PROMPTS[2], NEW_TOKENS[2], **SAMPLED, seed=params.seed)
    assert (seeded.token_ids, seeded.seed) == (want, params.seed)
    assert want != expected[2]  # sampling changed the output
    unseeded = client.complete(PROMPTS[2], NEW_TOKENS[2], **SAMPLED)
    assert unseeded.seed is not None
    again = client.complete(PROMPTS[2], NEW_TOKENS[2], **SAMPLED, seed=unseeded.seed)
    assert again.token_ids == unseeded.token_ids
    # temperature 0 and top-k 1 are greedy whatever the seed, and report none
    for kwargs in ({"temperature": 0.0, "seed": 1}, {"temperature": 1.5, "top_k": 1}):
        greedy = client.complete(PROMPTS[2], NEW_TOKENS[2], **kwargs)
        assert (greedy.token_ids, greedy.seed) == (expected[2], None)


def test_a_stop_string_ends_the_text_exactly_before_it_and_is_never_streamed(
    smollm, expected, client
):
    tokenizer = smollm[1]
    full = tokenizer.decode([t for t in expected[0] if t not in tokenizer.eos_token_ids])
    stop = full[len(full) // 2 : len(full) // 2 + 4]  # a string the greedy text reaches
    assert len(stop.strip()) >= 2, full
    *tokens, last = client.generate(PROMPTS[0], NEW_TOKENS[0], stop=["NEVER", stop])
    done = last.done
    streamed = "".join(m.token.text for m in tokens)
    assert done.text == streamed == full[: full.index(stop)]
    assert (done.stats.finish_reason, done.held_text) == ("stop", "")
    out = list(done.token_ids)
    assert out == [m.token.id for m in tokens] == expected[0][: len(out)]
    assert stop in tokenizer.decode(out) and stop not in tokenizer.decode(out[:-1])
    assert done.usage.output_tokens == len(out)


def test_held_back_text_is_released_at_the_end_and_stop_ids_end_the_output(
    smollm, expected, client
):
    tokenizer = smollm[1]
    full = tokenizer.decode([t for t in expected[1] if t not in tokenizer.eos_token_ids])
    never = full[-2:] + "\x00"  # the text ends with a start of this stop string
    *tokens, last = client.generate(PROMPTS[1], NEW_TOKENS[1], stop=[never])
    done = last.done
    assert done.held_text == full[-2:] and done.text == full
    assert "".join(m.token.text for m in tokens) + done.held_text == full
    assert done.stats.finish_reason in ("stop", "length")
    third = expected[1][2]
    ended = client.complete(PROMPTS[1], NEW_TOKENS[1], stop_token_ids=[third])
    assert ended.token_ids == expected[1][: expected[1].index(third) + 1]
    assert ended.stats.finish_reason == "stop"


def test_icecache_generate_passes_the_sampling_flags_and_reports_the_seed(
    smollm, server, client, capsys
):
    argv = ["generate", "--server", f"127.0.0.1:{server.port}", "--prompt", PROMPTS[2]]
    argv += ["--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "40"]
    assert cli.main([*argv, "--sample-seed", "11", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = client.complete(PROMPTS[2], 6, **SAMPLED, seed=11)
    assert (printed["token_ids"], printed["seed"]) == (want.token_ids, 11)
    stop = want.text[2:5]
    assert cli.main([*argv, "--sample-seed", "11", "--stop", stop]) == 0
    assert capsys.readouterr().out == want.text[: want.text.index(stop)] + "\n"
    assert cli.main([*argv, "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err


def test_a_resumed_request_continues_the_stream_it_would_have_been(smollm, expected, client):
    """In process there is no cache service to take the sequence over from: the worker
    rebuilds it (prefill + replay) and the stream goes on at token k with the same text."""
    full = list(client.generate(PROMPTS[0], NEW_TOKENS[0], resumable=True))
    started = full[0].started
    assert (started.replica, started.epoch, started.HasField("seed")) == ("in-process", 0, False)
    tokens = [m.token for m in full[1:-1]]
    assert [t.id for t in tokens] == expected[0]
    k = 4
    request = generate_request(PROMPTS[0], NEW_TOKENS[0], resumable=True)
    request.resume.seq_id, request.resume.replica = started.seq_id, started.replica
    request.resume.tokens.extend(t.id for t in tokens[:k])
    resumed = list(client.stream(request))
    assert resumed[0].HasField("started")
    more = [m.token for m in resumed[1:-1]]
    done = resumed[-1].done
    assert [t.index for t in more] == list(range(k, len(expected[0])))
    assert [t.id for t in tokens[:k] + more] == list(done.token_ids) == expected[0]
    text = "".join(t.text for t in tokens[:k] + more) + done.held_text
    assert text == done.text == full[-1].done.text
    assert (done.stats.resumed, done.stats.replayed_tokens) == ("rebuilt", k)
    # a client that has every token already gets its done at once
    request.resume.tokens.extend(t.id for t in tokens[k:])
    (last,) = client.stream(request)
    assert last.done.stats.resumed == "finished" and list(last.done.token_ids) == expected[0]


def test_resuming_a_sampled_request_needs_its_seed(client):
    request = generate_request(PROMPTS[2], 6, temperature=0.8)
    request.resume.tokens.extend([1, 2])
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Started.seed" in err.value.details()


def test_icecache_generate_goes_on_to_the_next_listed_worker(smollm, expected, server, capsys):
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    argv = ["generate", "--server", f"{dead},127.0.0.1:{server.port}", "--prompt", PROMPTS[0]]
    assert cli.main([*argv, "--max-new-tokens", str(NEW_TOKENS[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected[0]
