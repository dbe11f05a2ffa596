"""A worker process that dies leaves nothing behind in the cache service, and its client's
stream goes on on another worker; one that works hard keeps its lease. Real processes:
``python -m cache_service`` with a 1 s lease TTL and 1 s grace, ``python -m worker`` against
it, SIGKILL in the middle of a generation.

The module shares one cache service and a pool of workers (each takes ~10 s to load the
model): a test gets exactly as many live workers as it needs, reused from the test before
where that one left them alive, started (side by side, or while the test before ends) where
not. Every test kills or stops one, so the kill tests run first and the busy test takes the
one they leave. Each test starts on a quiet service (no sequences; a killed worker's lease
expired and its grace ended), and counts the service's counters and reads its log from its
own start.
"""

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
CRATES = " ".join(f"crate {i} holds {i * 7 % 13} kg of flour" for i in range(60))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COUNTERS = (
    "icecache_leases_expired_total",
    "icecache_lease_sequences_reclaimed_total",
    "icecache_lease_bytes_reclaimed_total",
)


# Each test's long prompt begins with a word of its own: on the shared cache service no test's
# prompt starts as another's did, so nothing one test left there (a prompt prefix kept for
# reuse, say) can shorten another's prefill. Each is 697 tokens in the chat template, as the
# one prompt they replace: the kill tests count the pages held 5 tokens in, just before the
# kill, and the next decode steps start no new page (704 is the next multiple of 16).
VERBS = {"adopted": "Summarise", "rebuilt": "Summarize", "busy": "Paraphrase"}


def _long(test):
    return f"{VERBS[test]}: {CRATES}"


def _wait(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    logs = tmp_path_factory.mktemp("worker-faults")
    port, metrics = _free_ports(2)
    command = [
        sys.executable, "-m", "cache_service", "--port", str(port), "--metrics-port", str(metrics),
        "--max-memory", "1G", "--lease-ttl-s", str(TTL), "--lease-grace-s", str(GRACE),
        "--log-format", "text",
    ]  # fmt: skip
    log = open(logs / "cache.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    pool = None
    try:
        _wait(lambda: check_health(address), timeout=60)
        with RemoteKVClient.connect(address) as observer:  # no lease: only looks
            pool = _Pool(address, metrics, observer, logs)
            yield pool
    finally:
        if pool is not None:
            pool.stop_all()
        proc.terminate()
        proc.wait(30)
        log.close()


class _Pool:
    """The module's cache service, and its worker processes."""

    def __init__(self, address, metrics, observer, logs):
        self.address, self.metrics, self.observer, self.logs = address, metrics, observer, logs
        self.log = logs / "cache.log"
        self.alive = []  # (process, address), oldest first
        self.starting = []  # (process, address, log path), not serving yet
        self.started = 0

    def take(self, n):
        """Exactly ``n`` live workers, oldest first: any beyond ``n`` stopped (as a test of
        its own would have no others), the missing ones started side by side."""
        self._prune()
        while len(self.alive) + len(self.starting) > n:
            _stop((self.starting or self.alive).pop()[0])
        for _ in range(n - len(self.alive) - len(self.starting)):
            self.launch()
        self._ready()
        return list(self.alive)

    def launch(self):
        """Start one more worker now; the next ``take`` or ``settle`` waits until it serves."""
        self.starting.append(self._launch())

    def _ready(self):
        for proc, address, log in self.starting:

            def ready(proc=proc, address=address, log=log):
                assert proc.poll() is None, log.read_text()
                return check_health(address, service="icecache.v1.Worker")  # its lease is open

            _wait(ready, timeout=180)
        self.alive += [(proc, address) for proc, address, _ in self.starting]
        self.starting = []

    def _prune(self):
        self.alive = [(proc, address) for proc, address in self.alive if proc.poll() is None]

    def _launch(self):
        (port,) = _free_ports(1)
        self.started += 1
        name = f"w{self.started}"
        command = [
            sys.executable, "-m", "worker", "--port", str(port), "--cache-service", self.address,
            "--policy", "icecache", "--budget", "48", "--lease-renew-s", "0.3",
            "--log-format", "text",
        ]  # fmt: skip
        path = self.logs / f"{name}.log"
        with open(path, "wb") as out:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT
            )
        return proc, f"127.0.0.1:{port}", path

    def settle(self):
        """Wait until the service is as a fresh one would be for the live workers: no
        sequences, one live lease per live worker, every expired lease's grace over."""

        def quiet():
            text = self.log.read_text()
            return (
                self.observer.stats().sequences == 0
                and _metric(self.metrics, "icecache_leases") == len(self.alive)
                and text.count(" expired (not renewed for ") == text.count("released the ")
            )

        self._ready()
        self._prune()
        _wait(quiet, timeout=TTL + GRACE + 10)

    def stop_all(self):
        while self.starting or self.alive:
            _stop((self.starting or self.alive).pop()[0])


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()  # drains and closes its lease: nothing left to expire
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


class _Since:
    """The service's counters and log since a test started."""

    def __init__(self, pool):
        self.pool = pool
        self.base = {name: _metric(pool.metrics, name) for name in COUNTERS}
        self.log_start = pool.log.stat().st_size

    def count(self, name):
        return _metric(self.pool.metrics, name) - self.base[name]

    def log(self):
        with open(self.pool.log, "rb") as log:
            log.seek(self.log_start)
            return log.read().decode()


@pytest.fixture
def cache(service, request):
    """The shared service, quiet, with this test's counters; on a failure every worker is
    stopped, so that the next test starts with fresh ones."""
    service.settle()
    failed = request.session.testsfailed
    yield service, _Since(service)
    if request.session.testsfailed > failed:
        service.stop_all()


def _metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


SAMPLED = {"temperature": 0.9, "top_k": 50}
NEW = 24


def _reference(smollm, prompt, seed):
    model, tokenizer = smollm
    kv = LocalKVClient.with_capacity(2**30, 16, model.config.head_dim)
    engine = Engine(model, kv, EngineConfig(policy="icecache", budget=48))
    ids = tokenizer.chat_prompt_ids(prompt)
    return engine.generate(ids, NEW, sampling=SamplingParams(**SAMPLED, seed=seed)), len(ids)


@pytest.mark.parametrize("released", [False, True], ids=["adopted", "rebuilt"])
def test_a_stream_broken_by_a_worker_kill_goes_on_on_another_worker(cache, smollm, released):
    """Killed after 5 tokens: the client resumes on the second worker, which takes the
    sequence over (no prefill) or, once the cache service released it (TTL + grace: the
    dead worker leaves nothing behind), rebuilds it; the sampled tokens are the unbroken
    run's either way."""
    pool, since = cache
    observer = pool.observer
    (first, a1), (second, a2) = pool.take(2)
    prompt = _long("rebuilt" if released else "adopted")
    try:
        before = observer.stats()
        with ResumingClient([a1, a2]) as client:
            stream = client.generate(prompt, NEW, ignore_eos=True, **SAMPLED)  # unseeded
            got = [next(stream).token.id for _ in range(5)]
            held = observer.stats()
            assert held.sequences == 1 and held.pages_used > before.pages_used
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            killed = time.monotonic()
            if not released:  # the next test takes two: one loads while this one ends
                pool.launch()
            if released:  # nothing left behind once the dead worker's lease ran out
                _wait(lambda: observer.stats().sequences == 0, timeout=TTL + GRACE + 10)
                assert time.monotonic() - killed < TTL + GRACE + 3
                after = observer.stats()
                # what stays is the prompt's two whole 256-token blocks, kept by the service
                # for reuse (no lease's), with the index built over them (28 sparse layers x
                # 3 KV heads, its leaf pages), and nothing of the sequence
                kept = after.prefix.pages - before.prefix.pages
                assert kept > 2 * 16 * 30 * 3 and after.pages_used == before.pages_used + kept
                assert after.prefix.indexes - before.prefix.indexes == 28 * 3
                assert since.count("icecache_leases_expired_total") == 1
                assert since.count("icecache_lease_bytes_reclaimed_total") == (
                    (held.pages_used - after.pages_used) * held.page_bytes
                )
                text = since.log()
                assert "expired (not renewed for 1 s)" in text
                assert "released the 1 sequence(s)" in text
            rest = list(stream)
            assert client.resumes == 1
        done = rest[-1].done
        got += [m.token.id for m in rest[:-1]]
        want, prompt_tokens = _reference(smollm, prompt, done.seed)
        assert got == list(done.token_ids) == want
        assert [m.token.index for m in rest[:-1]] == list(range(5, NEW))
        stats = done.stats
        if released:
            # the rebuild starts from the blocks the dead worker's prefill left
            assert (stats.resumed, stats.reused_tokens, stats.replayed_tokens) == (
                "rebuilt", 512, 5,
            )  # fmt: skip
            assert stats.prefill_tokens == prompt_tokens - 512
        else:
            assert (stats.resumed, stats.prefill_tokens) == ("adopted", 0)
        _wait(lambda: observer.stats().sequences == 0, timeout=TTL + GRACE + 10)
        assert since.count("icecache_lease_sequences_reclaimed_total") == int(released)
    finally:
        if first.poll() is None:
            first.kill()


def test_a_busy_worker_keeps_its_lease_and_a_clean_stop_releases_at_once(cache):
    pool, since = cache
    ((proc, worker),) = pool.take(1)
    long = _long("busy")
    results = []
    try:
        with WorkerClient(worker) as client:

            def run(i):
                results.append(client.complete(f"{long} Request {i}.", 24, ignore_eos=True))

            threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            # prefills of ~600 tokens and batched decoding kept the worker busy for seconds
            assert [len(r.token_ids) for r in results] == [24, 24, 24]
            assert all(r.stats.recoveries == 0 for r in results)
            assert since.count("icecache_leases_expired_total") == 0
            stream = client.generate(long, 10, ignore_eos=True)
            assert next(stream).HasField("token")
            proc.send_signal(signal.SIGTERM)  # drains (the stream finishes), then closes
            list(stream)
        assert proc.wait(120) == 0
        assert pool.observer.stats().sequences == 0  # right away, not after TTL + grace
        assert _metric(pool.metrics, "icecache_leases") == 0
        assert since.count("icecache_leases_expired_total") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
