"""Choosing tokens: greedy equalities, seeded reproducibility, filters, and batch independence."""

import numpy as np
import pytest
import torch

from worker.engine import Engine, EngineConfig
from worker.kv_client import LocalKVClient
from worker.sampling import SamplingParams, choose
from worker.scheduler import DoneEvent, Request, Scheduler

VOCAB = 50


def _logits(seed=0):
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [vocab]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"seed": -1}, "seed must be in"),
        ({"seed": 2**64}, "seed must be in"),
    ],
)
def test_bad_parameters_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.0, top_p=0.5, top_k=7, seed=3),
        SamplingParams(temperature=2.0, top_k=1, seed=3),
    ],
)
def test_temperature_zero_and_top_k_one_are_the_argmax(params):
    for i in range(20):
        logits = _logits(i)
        assert choose(logits, params, step=i) == int(torch.argmax(logits))


def test_a_fixed_seed_fixes_the_tokens_and_another_seed_changes_them():
    logits = torch.zeros(VOCAB)  # uniform: the choice is the noise's
    params = SamplingParams(temperature=1.0, seed=1234)
    first = [choose(logits, params, step) for step in range(40)]
    assert first == [choose(logits, params, step) for step in range(40)]
    other = SamplingParams(temperature=1.0, seed=1235)
    assert first != [choose(logits, other, step) for step in range(40)]
    assert len(set(first)) > 10  # the steps draw different noise


def test_frequencies_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    params = SamplingParams(temperature=1.0, seed=7)
    counts = np.bincount([choose(logits, params, s) for s in range(20_000)], minlength=5)
    want = torch.softmax(logits.double(), 0).numpy()
    assert np.allclose(counts / counts.sum(), want, atol=0.015), (counts, want)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([1.0, 0.0])
    p0 = [np.mean([_draw(logits, s, temperature=t) == 0 for s in range(4000)]) for t in (0.25, 4.0)]
    want = [1 / (1 + np.exp(-1 / t)) for t in (0.25, 4.0)]  # softmax of logits / t, token 0
    assert np.allclose(p0, want, atol=0.03), (p0, want)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert {_draw(logits, s, top_k=2) for s in range(500)} == {0, 1}
    # the mass before token 2 is 0.8: top_p 0.79 keeps {0, 1}, 0.81 keeps {0, 1, 2}
    assert {_draw(logits, s, top_p=0.79) for s in range(500)} == {0, 1}
    assert {_draw(logits, s, top_p=0.81) for s in range(500)} == {0, 1, 2}
    assert {_draw(logits, s, top_p=0.01) for s in range(50)} == {0}


def _draw(logits, step, temperature=1.0, **kwargs):
    return choose(logits, SamplingParams(temperature=temperature, seed=5, **kwargs), step)


def test_unseeded_parameters_get_a_seed():
    params = SamplingParams(temperature=1.0).seeded()
    assert params.seed is not None and params.seeded() == params


# ---- on the model ----------------------------------------------------------------------------
PROMPTS = ("Tell me a story about a cat.", "Name three colours.", "Why is the sky blue?")
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=42)


def _engine(model):
    kv = LocalKVClient.with_capacity(2**28, 16, model.config.head_dim)
    return Engine(model, kv, EngineConfig(policy="icecache", budget=64))


def test_a_seeded_request_gets_the_same_tokens_in_a_batch_as_alone(smollm):
    model, tokenizer = smollm
    ids = [tokenizer.chat_prompt_ids(p) for p in PROMPTS]
    engine = _engine(model)
    alone = engine.generate(ids[0], 12, sampling=SAMPLED)
    assert alone == engine.generate(ids[0], 12, sampling=SAMPLED)
    greedy = engine.generate(ids[0], 12)
    assert alone != greedy  # the sampler did something
    loop = Scheduler(_engine(model)).start()
    try:
        others = [
            loop.submit(Request(i, 12, sampling=SamplingParams(temperature=1.0, seed=n)))
            for n, i in enumerate(ids[1:])
        ]
        job = loop.submit(Request(ids[0], 12, sampling=SAMPLED))
        done = [_done(r) for r in [job, *others]]
    finally:
        loop.stop()
    assert done[0].token_ids == alone
    assert max(d.stats.mean_batch for d in done) > 1  # it was decoded in a batch


def test_the_scheduler_gives_an_unseeded_request_a_seed_that_reproduces_it(smollm):
    model, tokenizer = smollm
    ids = tokenizer.chat_prompt_ids(PROMPTS[1])
    loop = Scheduler(_engine(model)).start()
    try:
        job = loop.submit(Request(ids, 8, sampling=SamplingParams(temperature=1.0)))
        first = _done(job).token_ids
    finally:
        loop.stop()
    assert job.sampling.seed is not None
    assert _engine(model).generate(ids, 8, sampling=job.sampling) == first


def _done(request):
    while True:
        event = request.events.get(timeout=120)
        if isinstance(event, DoneEvent):
            return event
        assert not hasattr(event, "error"), event


# ---- one declaration: the wire, the CLI and the HTTP body follow SamplingParams ----------
def test_every_parameter_is_an_optional_field_of_generate_request():
    from google.protobuf.descriptor import FieldDescriptor as F

    from proto.icecache.v1 import worker_pb2 as pb

    fields = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    assert {n: (fields[n].type, fields[n].has_presence) for n in SamplingParams.names()} == {
        "temperature": (F.TYPE_DOUBLE, True),
        "top_p": (F.TYPE_DOUBLE, True),
        "top_k": (F.TYPE_INT32, True),
        "seed": (F.TYPE_UINT64, True),
    }


def test_from_message_reads_the_set_fields_and_defaults_the_rest():
    from proto.icecache.v1 import worker_pb2 as pb

    assert SamplingParams.from_message(pb.GenerateRequest()) == SamplingParams()
    message = pb.GenerateRequest(temperature=0.5, top_k=3, seed=2**64 - 1)
    assert SamplingParams.from_message(message) == SamplingParams(0.5, 1.0, 3, 2**64 - 1)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams.from_message(pb.GenerateRequest(top_p=0.0))


def test_the_client_sets_parameters_by_name_and_refuses_others():
    from worker.client import generate_request

    request = generate_request("hi", 4, temperature=0.7, top_p=None, seed=9)
    assert SamplingParams.from_message(request) == SamplingParams(temperature=0.7, seed=9)
    assert not request.HasField("top_p")
    with pytest.raises(TypeError, match="unknown sampling parameter.*temprature.*temperature"):
        generate_request("hi", 4, temprature=0.7)


def test_cli_flags_parse_into_the_parameters():
    import argparse

    from worker.sampling import add_flags, from_flags

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)  # the engine's, on the same parser
    add_flags(parser)
    args = parser.parse_args(["--seed", "4", "--temperature", "0.9", "--top-p", "0.8",
                              "--top-k", "12", "--sample-seed", "77"])  # fmt: skip
    assert from_flags(args) == SamplingParams(0.9, 0.8, 12, 77)
    assert args.seed == 4
    assert from_flags(parser.parse_args([])) == SamplingParams()
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        from_flags(parser.parse_args(["--temperature", "-1"]))


def test_http_body_takes_every_parameter_with_openais_defaults():
    from worker.serving.openai_schema import CompletionBody

    body = CompletionBody(model="m", prompt="x", temperature=0.3, top_p=0.6, top_k=5, seed=8)
    picked = {n: v for n, v in body.sampling().items() if n in SamplingParams.names()}
    assert picked == {"temperature": 0.3, "top_p": 0.6, "top_k": 5, "seed": 8}
    defaults = CompletionBody(model="m", prompt="x", top_k=-1).sampling()
    assert {n: v for n, v in defaults.items() if n in SamplingParams.names()} == {
        "temperature": 1.0  # OpenAI's default; top_k -1 is vLLM's "all"
    }
