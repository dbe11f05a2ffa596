"""The OpenAI-compatible HTTP API, driven by the real ``openai`` client and by plain HTTP,
against a real worker (uvicorn on loopback) over an in-process store.

Answers are compared with the in-process engine on the same prompt ids and parameters, and
with the gRPC API of the same worker (they share ``Generations``).
"""

import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

import httpx2
import openai
import pytest

from cache_service.config import CacheServiceConfig
from cache_service.security import SecurityConfig
from cache_service.server import serve as serve_cache
from tests.worker.serving.test_security import _cert
from worker.__main__ import parse_config
from worker.client import WorkerClient
from worker.engine import Engine, EngineConfig
from worker.kv_client import LocalKVClient
from worker.sampling import SamplingParams
from worker.serving.config import WorkerConfig
from worker.serving.server import EMBEDDED_MODEL_NAME, serve

POLICY, BUDGET = "icecache", 64
MODEL = EMBEDDED_MODEL_NAME
TOKEN = "http-test-token"
CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Why is the sky blue?"},
]
NEW_TOKENS = 10


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(smollm, **kwargs):
    config = WorkerConfig(
        cache_services=("in-process:0",), port=0, http_port=_free_port(),
        engine=EngineConfig(policy=POLICY, budget=BUDGET), **kwargs,
    )  # fmt: skip
    kv = LocalKVClient.with_capacity(2**28, 16, smollm[0].config.head_dim)
    return serve(config, loaded=smollm, kv=kv)


@pytest.fixture(scope="module")
def worker(smollm):
    running = _serve(smollm)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def api(worker):
    url = f"http://127.0.0.1:{worker.http.port}/v1"
    with openai.OpenAI(api_key="unused", base_url=url, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def engine(smollm):
    kv = LocalKVClient.with_capacity(2**28, 16, smollm[0].config.head_dim)
    return Engine(smollm[0], kv, EngineConfig(policy=POLICY, budget=BUDGET))


def _text(tokenizer, ids):
    return tokenizer.decode([t for t in ids if t not in tokenizer.eos_token_ids])


def _post(worker, path, body, headers=None, raw=None):
    """(status, parsed JSON) of a plain HTTP POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{worker.http.port}{path}", data=data,
        headers={"content-type": "application/json", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_names_the_served_model_and_an_unknown_one_is_404(api):
    assert [m.id for m in api.models.list()] == [MODEL]
    assert api.models.retrieve(MODEL).max_model_len == 8192
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert err.value.code == "model_not_found" and MODEL in err.value.message


def test_a_greedy_completion_is_the_engines_output(smollm, api, engine):
    tokenizer = smollm[1]
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    want = engine.generate(ids, NEW_TOKENS, tokenizer.eos_token_ids)
    got = api.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    assert got.choices[0].text == _text(tokenizer, want)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want))
    assert got.choices[0].finish_reason == (
        "stop" if want[-1] in tokenizer.eos_token_ids else "length"
    )
    by_ids = api.completions.create(model=MODEL, prompt=ids, max_tokens=NEW_TOKENS, temperature=0)
    assert by_ids.choices[0].text == got.choices[0].text
    stats = got.model_extra["icecache"]
    assert (stats["policy"], stats["budget"], "seed" in stats) == (POLICY, BUDGET, False)
    default = api.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body={
        "ignore_eos": True})  # fmt: skip
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_chat_streamed_and_whole_give_the_engines_answer(smollm, api, engine):
    tokenizer = smollm[1]
    ids = tokenizer.chat_ids(CHAT)
    want = _text(tokenizer, engine.generate(ids, NEW_TOKENS, tokenizer.eos_token_ids))
    kwargs = {"model": MODEL, "messages": CHAT, "max_tokens": NEW_TOKENS, "temperature": 0}
    whole = api.chat.completions.create(**kwargs)
    assert whole.choices[0].message.content == want
    assert (whole.choices[0].message.role, whole.object) == ("assistant", "chat.completion")
    chunks = list(
        api.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    *_, last, usage = chunks
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == whole.usage
    assert {c.id for c in chunks} == {chunks[0].id}
    # max_completion_tokens, the newer name, and the default: as many as fit
    newer = api.chat.completions.create(**(kwargs | {"max_tokens": None}), max_completion_tokens=3)
    assert newer.usage.completion_tokens == 3


def test_sampling_follows_openais_defaults_and_a_seed_reproduces_over_both_apis(
    smollm, worker, api, engine
):
    tokenizer = smollm[1]
    ids = tokenizer.chat_ids(CHAT)
    kwargs = {"model": MODEL, "messages": CHAT, "max_tokens": NEW_TOKENS}
    first = api.chat.completions.create(**kwargs)  # temperature 1 by default: sampled
    seed = first.model_extra["icecache"]["seed"]
    again = api.chat.completions.create(**kwargs, seed=seed)
    assert again.choices[0].message.content == first.choices[0].message.content
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=7)
    want = engine.generate(ids, NEW_TOKENS, tokenizer.eos_token_ids, params)
    sampled = {"temperature": 0.7, "top_p": 0.9, "seed": 7}
    chunks = api.chat.completions.create(**kwargs, **sampled, extra_body={"top_k": 20}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == _text(tokenizer, want)
    with WorkerClient(f"127.0.0.1:{worker.port}") as grpc_client:
        over_grpc = grpc_client.complete(ids, NEW_TOKENS, chat=False, top_k=20, **sampled)
    assert over_grpc.token_ids == want


def test_a_stop_string_ends_the_text_just_before_it_streamed_or_not(smollm, api, engine):
    tokenizer = smollm[1]
    ids = tokenizer.chat_ids(CHAT)
    full = _text(tokenizer, engine.generate(ids, NEW_TOKENS, tokenizer.eos_token_ids))
    stop = full[6:9]
    kwargs = {"model": MODEL, "messages": CHAT, "max_tokens": NEW_TOKENS, "temperature": 0}
    whole = api.chat.completions.create(**kwargs, stop=[stop, "never said"])
    assert whole.choices[0].message.content == full[: full.index(stop)]
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(api.chat.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("endpoint", "field", "value"),
    [
        ("chat", "n", 2),
        ("chat", "logprobs", True),
        ("chat", "top_logprobs", 2),
        ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("chat", "response_format", {"type": "json_object"}),
        ("chat", "presence_penalty", 0.5),
        ("completions", "logprobs", 1),
        ("completions", "echo", True),
        ("completions", "best_of", 2),
        ("completions", "logit_bias", {"42": 5}),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(api, endpoint, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            messages = [{"role": "user", "content": "hi"}]
            api.chat.completions.create(model=MODEL, messages=messages, **{field: value})
        else:
            api.completions.create(model=MODEL, prompt="hi", **{field: value})
    assert err.value.param == field and f"`{field}`" in err.value.message


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": "hi", "max_tokenz": 3}, "max_tokenz", "Unrecognized request argument"),
        ({"max_tokens": 3}, "prompt", "Field required"),
        ({"prompt": ["one", "two"]}, "prompt", "one prompt per request"),
        ({"prompt": "hi", "max_tokens": 9000}, None, "(max_tokens over HTTP) is 9000"),
        ({"prompt": "hi", "seed": -1}, "seed", "`seed` cannot be -1"),
        ({"prompt": "hi", "policy": "magic"}, None, "unknown policy"),
        ({"prompt": "hi", "temperature": -1}, None, "temperature must be >= 0"),
        ({"prompt": "hi", "stop": [""]}, None, "stop strings must not be empty"),
        ({"prompt": []}, None, "the prompt is empty"),
    ],
)
def test_bad_bodies_get_a_400_error_object_that_says_what_to_fix(worker, body, param, says):
    status, answer = _post(worker, "/v1/completions", {"model": MODEL, **body})
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert says in error["message"], error["message"]


def test_bad_json_and_bad_chat_content_are_400(worker):
    status, answer = _post(worker, "/v1/chat/completions", None, raw=b'{"model": ')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    for messages, says in (
        ([{"role": "user", "content": image}], "only text parts"),
        ([{"role": "tool", "content": "42", "tool_call_id": "a"}], "tool calls"),
        ([], "at least 1 item"),
    ):
        status, answer = _post(
            worker, "/v1/chat/completions", {"model": MODEL, "messages": messages}
        )
        assert status == 400 and says in answer["error"]["message"], answer


def _wait(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _idle(worker):
    store = worker.scheduler.engine.kv.store
    calls = worker.servicer.generations
    return calls.inflight == 0 and worker.scheduler.active == 0 and store.stats().sequences == 0


def test_a_client_that_disconnects_cancels_its_request(worker):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 4000,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    # streamed: the connection closes after the first chunk
    conn = http.client.HTTPConnection("127.0.0.1", worker.http.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}),
                 {"content-type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")
    conn.close()
    _wait(lambda: _idle(worker))  # 4000 tokens would take minutes
    # whole answer: the connection closes while the worker decodes
    sock = socket.create_connection(("127.0.0.1", worker.http.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
    _wait(lambda: worker.scheduler.active == 1)
    sock.close()
    _wait(lambda: _idle(worker))


def test_http_and_grpc_share_the_request_limit_and_the_drain(smollm):
    running = _serve(smollm, max_requests=1, workers=3)
    try:
        url = f"http://127.0.0.1:{running.http.port}"
        with WorkerClient(f"127.0.0.1:{running.port}") as grpc_client:
            stream = grpc_client.generate("Tell me a long story.", 4000, ignore_eos=True)
            next(stream)  # decoding: the one allowed call is taken
            api = openai.OpenAI(api_key="x", base_url=url + "/v1", max_retries=0)
            with api, pytest.raises(openai.RateLimitError) as err:
                api.completions.create(model=MODEL, prompt="hi", max_tokens=1)
            assert "--max-requests" in err.value.message
            stream.cancel()
        _wait(lambda: running.servicer.generations.inflight == 0)
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "serving"}
        running.servicer.generations.draining.set()  # what stop() does first
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/health", timeout=10)
        assert err.value.code == 503
        status, answer = _post(running, "/v1/completions", {"model": MODEL, "prompt": "hi"})
        assert status == 503 and "shutting down" in answer["error"]["message"]
        codes = running.metrics.requests
        assert codes.labels("RESOURCE_EXHAUSTED")._value.get() == 1
    finally:
        running.stop(0)


def test_the_token_and_tls_of_grpc_guard_the_http_api(smollm, tmp_path):
    cert, key = _cert(tmp_path)
    running = _serve(smollm, security=SecurityConfig(auth_token=TOKEN, tls_cert=cert, tls_key=key))
    try:
        url = f"https://127.0.0.1:{running.http.port}"
        trusted = ssl.create_default_context(cafile=cert)

        def client(key):
            http = httpx2.Client(verify=trusted)
            return openai.OpenAI(api_key=key, base_url=url + "/v1", http_client=http, max_retries=0)

        with client(TOKEN) as api:
            answer = api.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
            assert answer.usage.completion_tokens == 2
        with client("not-it") as api, pytest.raises(openai.AuthenticationError) as err:
            api.models.list()
        assert err.value.code == "invalid_api_key" and "wrong token" in err.value.message
        request = urllib.request.Request(url + "/v1/models")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(request, timeout=10, context=trusted)
        assert missing.value.code == 401
        assert "no authorization header" in json.loads(missing.value.read())["error"]["message"]
        with urllib.request.urlopen(url + "/health", timeout=10, context=trusted) as response:
            assert response.status == 200  # open, for load balancers
        with pytest.raises(OSError):  # plain HTTP to the TLS port: no answer
            urllib.request.urlopen(url.replace("https", "http") + "/health", timeout=10)
    finally:
        running.stop(0)


def test_the_http_port_is_a_flag_and_a_variable_and_off_by_default():
    base = {"ICECACHE_CACHE_SERVICES": "a:1"}
    assert parse_config([], base).http_port == 0
    assert parse_config([], base | {"ICECACHE_HTTP_PORT": "8000"}).http_port == 8000
    assert parse_config(["--http-port", "8080"], base).http_port == 8080
    with pytest.raises(ValueError, match="ports must be in 0..65535"):
        WorkerConfig(cache_services=("a:1",), http_port=70000)


def _schedulers():
    return sum(t.name == "scheduler" and t.is_alive() for t in threading.enumerate())


def test_a_taken_http_port_fails_the_start_and_stops_the_rest(smollm):
    before = _schedulers()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = WorkerConfig(
            cache_services=("in-process:0",), port=0, http_port=taken.getsockname()[1],
            engine=EngineConfig(policy=POLICY, budget=BUDGET),
        )  # fmt: skip
        kv = LocalKVClient.with_capacity(2**26, 16, smollm[0].config.head_dim)
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1:.* for HTTP"):
            serve(config, loaded=smollm, kv=kv)
    assert _schedulers() == before


def test_health_is_503_while_no_cache_service_is_healthy(smollm):
    cache = serve_cache(CacheServiceConfig(port=0, max_memory=2**26, workers=2))
    config = WorkerConfig(
        cache_services=(f"127.0.0.1:{cache.port}",), port=0, http_port=_free_port(),
        engine=EngineConfig(policy=POLICY, budget=BUDGET), health_interval_s=0.2,
    )  # fmt: skip
    running = serve(config, loaded=smollm)
    url = f"http://127.0.0.1:{running.http.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert json.loads(response.read()) == {"status": "serving"}
        cache.stop(0)

        def unready():
            try:
                urllib.request.urlopen(url, timeout=10).close()
            except urllib.error.HTTPError as err:
                return err.code == 503 and b"no healthy cache service" in err.read()
            return False

        _wait(unready, timeout=20)
    finally:
        running.stop(0)
