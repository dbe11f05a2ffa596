"""``bench/load.py``'s worker mode, small, against a real worker with its HTTP API on loopback:
both APIs' clients run, count the tokens, give the same text and render the report."""

import socket

import pytest

from bench import load
from worker.engine import EngineConfig
from worker.kv_client import LocalKVClient
from worker.serving.config import WorkerConfig
from worker.serving.server import serve


@pytest.fixture
def target(smollm):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        http_port = sock.getsockname()[1]
    config = WorkerConfig(
        cache_services=("in-process:0",), port=0, http_port=http_port,
        engine=EngineConfig(policy="icecache", budget=64),
    )  # fmt: skip
    kv = LocalKVClient.with_capacity(2**28, 16, smollm[0].config.head_dim)
    running = serve(config, loaded=smollm, kv=kv)
    yield load.Target(f"127.0.0.1:{running.port}", f"http://127.0.0.1:{http_port}/v1")
    running.stop(0)


def test_the_worker_phases_run_over_both_apis_with_the_same_tokens(target):
    args = load.parse_args(["--clients", "2", "--requests", "1", "--new-tokens", "3",
                            "--rounds", "1", "--time-limit", "120"])  # fmt: skip
    phases = load.worker_phases(target, args)
    assert [(p.transport, p.clients) for p in phases] == [
        ("gRPC", 1),
        ("HTTP", 1),
        ("HTTP", 2),
        ("gRPC", 2),
    ]
    assert all(p.errors == 0 and [s.tokens for s in p.ok] == [3] * p.clients for p in phases)
    assert all(s.first_token_s > 0 and s.text for p in phases for s in p.ok)
    assert load.same_tokens(phases) == (3, 0)
    assert len(load.http_vs_grpc(phases, 2)) == 1
    args.command, args.notes = "python -m bench.load", load.notes(phases, [])
    text = load.report(args, phases, {}, [])
    assert "HTTP against gRPC" in text and "| 1 | HTTP | 2 |" in text
