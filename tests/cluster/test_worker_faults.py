"""A worker process that dies leaves nothing behind in the cache service, and its client's
stream goes on on another worker; one that works hard keeps its lease. Real processes:
``python -m cache_service`` with a 1 s lease TTL and 1 s grace, ``python -m worker`` against
it, SIGKILL in the middle of a generation."""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from worker.client import WorkerClient, check_health
from worker.engine import Engine, EngineConfig
from worker.kv.remote import RemoteKVClient
from worker.kv_client import LocalKVClient
from worker.resuming import ResumingClient
from worker.sampling import SamplingParams

from .test_compose_cluster import _free_ports

ROOT = Path(__file__).resolve().parents[2]
TTL, GRACE = 1.0, 1.0
LONG = "Summarise: " + " ".join(f"crate {i} holds {i * 7 % 13} kg of flour" for i in range(60))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def cache(tmp_path):
    port, metrics = _free_ports(2)
    command = [
        sys.executable, "-m", "cache_service", "--port", str(port), "--metrics-port", str(metrics),
        "--max-memory", "256M", "--lease-ttl-s", str(TTL), "--lease-grace-s", str(GRACE),
        "--log-format", "text",
    ]  # fmt: skip
    log = open(tmp_path / "cache.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        _wait(lambda: check_health(address), timeout=60)
        with RemoteKVClient.connect(address) as observer:  # no lease: only looks
            yield address, metrics, observer, tmp_path / "cache.log"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _worker(cache_address, tmp_path, name="worker"):
    (port,) = _free_ports(1)
    command = [
        sys.executable, "-m", "worker", "--port", str(port), "--cache-service", cache_address,
        "--policy", "icecache", "--budget", "48", "--lease-renew-s", "0.3",
        "--log-format", "text",
    ]  # fmt: skip
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - the caller's process owns it
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    _wait(lambda: check_health(address, service="icecache.v1.Worker"), timeout=180)
    return proc, address


def _metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_a_busy_worker_keeps_its_lease_and_a_clean_stop_releases_at_once(cache, tmp_path):
    address, metrics, observer, _ = cache
    proc, worker = _worker(address, tmp_path)
    results = []
    try:
        with WorkerClient(worker) as client:

            def run(i):
                results.append(client.complete(f"{LONG} Request {i}.", 24, ignore_eos=True))

            threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            # prefills of ~600 tokens and batched decoding kept the worker busy for seconds
            assert [len(r.token_ids) for r in results] == [24, 24, 24]
            assert all(r.stats.recoveries == 0 for r in results)
            assert _metric(metrics, "icecache_leases_expired_total") == 0
            stream = client.generate(LONG, 10, ignore_eos=True)
            assert next(stream).HasField("token")
            proc.send_signal(signal.SIGTERM)  # drains (the stream finishes), then closes
            list(stream)
        assert proc.wait(120) == 0
        assert observer.stats().sequences == 0  # right away, not after TTL + grace
        assert _metric(metrics, "icecache_leases") == 0
        assert _metric(metrics, "icecache_leases_expired_total") == 0
    finally:
        if proc.poll() is None:
            proc.kill()


SAMPLED = {"temperature": 0.9, "top_k": 50}
NEW = 24


def _reference(smollm, seed):
    model, tokenizer = smollm
    kv = LocalKVClient.with_capacity(2**27, 16, model.config.head_dim)
    engine = Engine(model, kv, EngineConfig(policy="icecache", budget=48))
    ids = tokenizer.chat_prompt_ids(LONG)
    return engine.generate(ids, NEW, sampling=SamplingParams(**SAMPLED, seed=seed)), len(ids)


@pytest.mark.parametrize("released", [False, True], ids=["adopted", "rebuilt"])
def test_a_stream_broken_by_a_worker_kill_goes_on_on_another_worker(
    cache, tmp_path, smollm, released
):
    """Killed after 5 tokens: the client resumes on the second worker, which takes the
    sequence over (no prefill) or, once the cache service released it (TTL + grace: the
    dead worker leaves nothing behind), rebuilds it; the sampled tokens are the unbroken
    run's either way."""
    address, metrics, observer, cache_log = cache
    first, a1 = _worker(address, tmp_path, "w1")
    second, a2 = _worker(address, tmp_path, "w2")
    try:
        before = observer.stats()
        with ResumingClient([a1, a2]) as client:
            stream = client.generate(LONG, NEW, ignore_eos=True, **SAMPLED)  # unseeded
            got = [next(stream).token.id for _ in range(5)]
            held = observer.stats()
            assert held.sequences == 1 and held.pages_used > before.pages_used
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            killed = time.monotonic()
            if released:  # nothing left behind once the dead worker's lease ran out
                _wait(lambda: observer.stats().sequences == 0, timeout=TTL + GRACE + 10)
                assert time.monotonic() - killed < TTL + GRACE + 3
                assert observer.stats().pages_used == before.pages_used
                assert _metric(metrics, "icecache_leases_expired_total") == 1
                assert _metric(metrics, "icecache_lease_bytes_reclaimed_total") == (
                    (held.pages_used - before.pages_used) * held.page_bytes
                )
                text = cache_log.read_text()
                assert "expired (not renewed for 1 s)" in text
                assert "released the 1 sequence(s)" in text
            rest = list(stream)
            assert client.resumes == 1
        done = rest[-1].done
        got += [m.token.id for m in rest[:-1]]
        want, prompt_tokens = _reference(smollm, done.seed)
        assert got == list(done.token_ids) == want
        assert [m.token.index for m in rest[:-1]] == list(range(5, NEW))
        stats = done.stats
        if released:
            assert (stats.resumed, stats.prefill_tokens, stats.replayed_tokens) == (
                "rebuilt", prompt_tokens, 5,
            )  # fmt: skip
        else:
            assert (stats.resumed, stats.prefill_tokens) == ("adopted", 0)
        _wait(lambda: observer.stats().sequences == 0, timeout=TTL + GRACE + 10)
        assert _metric(metrics, "icecache_lease_sequences_reclaimed_total") == int(released)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
