"""Retries with exponential backoff and full jitter: the schedule, what is retried, and a
client that outlasts a worker which starts late (real server on loopback)."""

import random
import threading

import grpc
import pytest

from tests.cluster.test_compose_cluster import _free_ports
from worker.client import WorkerClient
from worker.engine import EngineConfig
from worker.kv_client import LocalKVClient
from worker.retry import Backoff, retry
from worker.serving.config import WorkerConfig
from worker.serving.server import serve


def test_waits_are_jittered_below_a_doubling_bound():
    backoff = Backoff(attempts=6, base_s=0.1, cap_s=1.0)
    delays = [round(d, 6) for d in backoff.delays(random.Random(0))]
    assert delays == [0.084442, 0.151591, 0.168229, 0.207133, 0.511275]  # seed 0
    bounds = [0.1, 0.2, 0.4, 0.8, 1.0]  # doubling, then capped
    draws = [list(backoff.delays(random.Random(seed))) for seed in range(200)]
    for n, bound in enumerate(bounds):
        column = [d[n] for d in draws]
        assert min(column) >= 0 and max(column) <= bound
        assert max(column) > 0.9 * bound and min(column) < 0.1 * bound  # full jitter


def test_transient_errors_are_retried_then_the_call_succeeds():
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("replica restarting")
        return 42

    backoff = Backoff(attempts=4, base_s=0.1, cap_s=1.0)
    assert retry(flaky, backoff, rng=random.Random(0), sleep=slept.append) == 42
    assert len(calls) == 3
    assert slept == list(backoff.delays(random.Random(0)))[:2]


def test_other_errors_and_exhausted_attempts_propagate():
    calls = []

    def bad():
        calls.append(1)
        raise ValueError("a caller's mistake")

    with pytest.raises(ValueError):
        retry(bad, Backoff(attempts=5), sleep=lambda s: None)
    assert len(calls) == 1

    def down():
        calls.append(1)
        raise ConnectionError(f"down ({len(calls)})")

    calls.clear()
    with pytest.raises(ConnectionError, match=r"down \(3\)"):
        retry(down, Backoff(attempts=3), sleep=lambda s: None)
    assert len(calls) == 3


def test_a_transient_error_the_predicate_refuses_propagates_at_once():
    calls = []

    def committed():
        calls.append(1)
        raise ConnectionError("failed after the first token")

    with pytest.raises(ConnectionError):
        retry(committed, Backoff(attempts=5), sleep=lambda s: None, retryable=lambda e: False)
    assert len(calls) == 1


def test_bad_backoff_settings_are_refused():
    with pytest.raises(ValueError, match="attempts >= 1"):
        Backoff(attempts=0)


def test_a_client_outlasts_a_worker_that_starts_late(smollm):
    (port,) = _free_ports(1)
    config = WorkerConfig(
        cache_services=("in-process:0",), port=port, engine=EngineConfig(budget=64)
    )
    kv = LocalKVClient.with_capacity(2**26, 16, smollm[0].config.head_dim)
    started: list = []
    timer = threading.Timer(1.0, lambda: started.append(serve(config, loaded=smollm, kv=kv)))
    timer.start()
    try:
        # Waits are drawn from [0, bound] (full jitter): 10 attempts gave ~3.7 s on average,
        # which a loaded CI machine's worker start-up outlasted; 40 give ~19 s.
        backoff = Backoff(attempts=40, base_s=0.2, cap_s=1.0)
        with WorkerClient(f"127.0.0.1:{port}", timeout=60, backoff=backoff) as client:
            result = client.complete("Say hi.", 2)
            assert len(result.token_ids) == 2
            assert client.retries >= 1  # the first calls found nobody listening
    finally:
        timer.join()
        for server in started:
            server.stop(0)


def test_a_client_gives_up_after_its_attempts(smollm):
    (port,) = _free_ports(1)
    backoff = Backoff(attempts=3, base_s=0.01, cap_s=0.02)
    with WorkerClient(f"127.0.0.1:{port}", timeout=5, backoff=backoff) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.complete("Say hi.", 2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.retries == 2
