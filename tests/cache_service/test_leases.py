"""Leases: the table against a simple model (hypothesis, fake clock), then a real service on
loopback with clients in other processes that die (SIGKILL) or pause (SIGSTOP) while they
hold sequences."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cache_service.config import CacheServiceConfig
from cache_service.leases import LeaseTable
from cache_service.server import serve
from cache_service.types import AdoptionConflict, AdoptionRefused, LeaseLost, SequenceSpec
from worker.kv.remote import RemoteKVClient

ROOT = Path(__file__).resolve().parents[2]
TTL, GRACE = 10.0, 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_lives_while_renewed_then_expires_then_releases_after_the_grace():
    clock = Clock()
    table = LeaseTable(TTL, GRACE, clock)
    lease = table.open("worker-a")
    table.attach(lease.lease_id, "s1")
    for _ in range(5):  # renewed in time, again and again
        clock.now += TTL - 0.1
        table.check(lease.lease_id, ["s1"])
        assert table.reap().expired == []
    clock.now += TTL + 0.1
    found = table.reap()
    assert [x.lease_id for x in found.expired] == [lease.lease_id] and found.released == []
    with pytest.raises(LeaseLost, match="expired"):  # fenced from now on
        table.check(lease.lease_id, ["s1"])
    with pytest.raises(LeaseLost, match="held by lease"):  # nobody else may take it either
        table.check("", ["s1"])
    clock.now += GRACE + 0.01
    assert [(x.lease_id, seqs) for x, seqs in table.reap().released] == [(lease.lease_id, ["s1"])]
    assert table.owner("s1") is None and table.live() == 0
    table.check("", ["s1"])  # nobody's now


def test_close_hands_back_the_sequences_and_ids_are_never_reused():
    table = LeaseTable(TTL, GRACE, Clock())
    a, b = table.open("a"), table.open("b")
    assert b.epoch == a.epoch + 1 and a.lease_id != b.lease_id
    table.attach(a.lease_id, "x")
    table.attach(a.lease_id, "y")
    table.detach("y")
    with pytest.raises(LeaseLost, match="held by lease"):
        table.check(b.lease_id, ["x"])
    assert table.close(a.lease_id) == ["x"]
    assert table.close(a.lease_id) == []
    with pytest.raises(LeaseLost, match="unknown"):
        table.renew(a.lease_id)
    table.attach("", "free")  # created without a lease: nobody's
    assert table.owner("free") is None


class LeaseMachine(RuleBasedStateMachine):
    """The table against a model: a dict of leases with their last renewal and sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.table = LeaseTable(TTL, GRACE, self.clock)
        self.model: dict[str, dict] = {}  # lease -> {"renewed", "expired", "seqs"}
        self.next_seq = 0

    def _alive(self, lease):
        m = self.model.get(lease)
        return m is not None and m["expired"] is None

    @rule(holder=st.sampled_from(["a", "b", "c"]))
    def open(self, holder):
        lease = self.table.open(holder)
        self.model[lease.lease_id] = {"renewed": self.clock.now, "expired": None, "seqs": set()}

    @rule(dt=st.floats(0, 2 * TTL))
    def wait(self, dt):
        self.clock.now += dt

    @rule(data=st.data())
    def renew(self, data):
        if not self.model:
            return
        lease = data.draw(st.sampled_from(sorted(self.model)))
        if self._alive(lease):
            self.table.renew(lease)
            self.model[lease]["renewed"] = self.clock.now
        else:
            with pytest.raises(LeaseLost):
                self.table.renew(lease)

    @rule(data=st.data())
    def create(self, data):
        live = sorted(k for k in self.model if self._alive(k))
        if not live:
            return
        lease = data.draw(st.sampled_from(live))
        seq = f"s{self.next_seq}"
        self.next_seq += 1
        self.table.check(lease, [seq])
        self.table.attach(lease, seq)
        self.model[lease]["renewed"] = self.clock.now
        self.model[lease]["seqs"].add(seq)

    @rule(data=st.data())
    def close(self, data):
        if not self.model:
            return
        lease = data.draw(st.sampled_from(sorted(self.model)))
        want = sorted(self.model[lease]["seqs"]) if self._alive(lease) else []
        assert self.table.close(lease) == want
        if self._alive(lease):
            del self.model[lease]

    @rule()
    def reap(self):
        found = self.table.reap()
        now = self.clock.now
        expired, released = set(), {}
        for lease, m in list(self.model.items()):
            if m["expired"] is None and now - m["renewed"] > TTL:
                m["expired"] = now
                expired.add(lease)
            if m["expired"] is not None and now - m["expired"] >= GRACE:
                released[lease] = sorted(m["seqs"])
                del self.model[lease]
        assert {x.lease_id for x in found.expired} == expired
        assert {x.lease_id: seqs for x, seqs in found.released} == released

    @invariant()
    def owners_match(self):
        for lease, m in self.model.items():
            for seq in m["seqs"]:
                assert self.table.owner(seq) == lease
        assert self.table.live() == sum(m["expired"] is None for m in self.model.values())


TestLeaseMachine = LeaseMachine.TestCase
TestLeaseMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ---- a real service, clients in other processes ------------------------------------------------
SPEC = SequenceSpec(2, 2, 4, 64, policy="quest", budget=64, dense_layers=0)

HOLDER = textwrap.dedent(
    """
    import sys, numpy as np
    from cache_service.types import SequenceSpec
    from worker.kv.remote import RemoteKVClient
    kv = RemoteKVClient.connect(sys.argv[1], holder="doomed-worker", lease_renew_s=0.1)
    spec = SequenceSpec(2, 2, 4, 64, policy="quest", budget=64, dense_layers=0)
    kv.create("doomed", spec)
    x = np.ones((100, 2, 64), np.float32)
    for layer in range(2):
        kv.append("doomed", layer, x, x, np.arange(100))
    print("ready", flush=True)
    sys.stdin.readline()  # paused or killed meanwhile
    try:
        kv.append("doomed", 0, x[:1], x[:1], np.arange(100, 101))
        print("appended", flush=True)
    except Exception as err:
        print(type(err).__name__, err, flush=True)
    """
)


@pytest.fixture
def service():
    config = CacheServiceConfig(
        port=0, max_memory=64 * 2**20, workers=2, lease_ttl_s=1.0, lease_grace_s=1.5
    )
    server = serve(config)
    server.metrics_port = server.metrics.serve_http(0, "127.0.0.1")
    yield server
    server.stop(0)


def _holder(service):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, f"127.0.0.1:{service.port}"], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _metric(service, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics") as page:
        for line in page.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def _wait(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_killed_holders_sequences_are_released_after_ttl_and_grace(service):
    baseline = service.store.stats().pages_used
    proc = _holder(service)
    held = service.store.stats()
    assert held.sequences == 1 and held.pages_used > baseline
    time.sleep(2.0)  # past the TTL: the heartbeat keeps it
    assert service.store.stats().sequences == 1 and _metric(service, "icecache_leases") == 1
    killed = time.monotonic()
    proc.kill()
    proc.wait()
    _wait(lambda: service.store.stats().sequences == 0, timeout=10)
    took = time.monotonic() - killed
    assert 1.0 + 1.5 - 0.3 < took < 1.0 + 1.5 + 2.0  # ttl + grace (+ ticks)
    assert service.store.stats().pages_used == baseline
    assert _metric(service, "icecache_leases_expired_total") == 1
    assert _metric(service, "icecache_lease_sequences_reclaimed_total") == 1
    freed = (held.pages_used - baseline) * held.page_bytes
    assert _metric(service, "icecache_lease_bytes_reclaimed_total") == freed
    assert _metric(service, "icecache_leases") == 0


def test_a_paused_holder_is_fenced_when_it_wakes_and_loses_its_sequences(service):
    proc = _holder(service)
    proc.send_signal(signal.SIGSTOP)
    _wait(lambda: _metric(service, "icecache_leases_expired_total") == 1, timeout=10)
    length = service.store.length("doomed")
    proc.send_signal(signal.SIGCONT)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    answer = proc.stdout.readline()
    assert answer.startswith("LeaseLost"), answer
    with service.store.lock:  # nothing written after the expiry (unless released already)
        assert "doomed" not in service.store or service.store.length("doomed") == length
    proc.stdin.close()
    assert proc.wait(10) == 0
    _wait(lambda: service.store.stats().sequences == 0, timeout=10)


def test_a_clean_close_releases_at_once_and_leases_fence_each_other(service):
    address = f"127.0.0.1:{service.port}"
    x = np.ones((20, 2, 64), np.float32)
    with RemoteKVClient.connect(address, holder="a") as a:
        a.create("mine", SPEC)
        a.append("mine", 0, x, x, np.arange(20))
        with RemoteKVClient.connect(address, holder="b") as b, pytest.raises(LeaseLost):
            b.append("mine", 1, x, x, np.arange(20))
        with RemoteKVClient.connect(address) as anonymous:  # no lease
            with pytest.raises(LeaseLost, match="held by lease"):
                anonymous.release("mine")
            anonymous.create("nobodys", SPEC)
        assert service.store.stats().sequences == 2
    assert "mine" not in service.store  # the close released it, no TTL wait
    time.sleep(3.0)
    assert "nobodys" in service.store  # without a lease it lives until released


def test_adoption_is_a_compare_and_swap_on_the_holders_epoch(service):
    address = f"127.0.0.1:{service.port}"
    x = np.ones((7, 2, 64), np.float32)
    with (
        RemoteKVClient.connect(address, holder="dead") as dead,
        RemoteKVClient.connect(address, holder="b") as b,
        RemoteKVClient.connect(address, holder="c") as c,
    ):
        dead.create("s", SPEC)
        for layer in range(2):
            dead.append("s", layer, x, x, np.arange(7))
        epoch = dead.holder_epoch("s")
        with pytest.raises(AdoptionRefused, match="holds \\[7, 7\\] tokens"):
            b.adopt("s", address, epoch, 5, SPEC)
        other = SequenceSpec(2, 2, 4, 64, policy="streaming", budget=64, dense_layers=0)
        with pytest.raises(AdoptionRefused, match="another spec"):
            b.adopt("s", address, epoch, 7, other)
        barrier, outcome = threading.Barrier(2), {}

        def adopt(name, client):
            barrier.wait()
            try:
                outcome[name] = client.adopt("s", address, epoch, 7, SPEC)
            except AdoptionConflict as err:
                outcome[name] = err

        threads = [threading.Thread(target=adopt, args=p) for p in (("b", b), ("c", c))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        winner = next(n for n, v in outcome.items() if v == 0)
        loser = outcome["c" if winner == "b" else "b"]
        assert isinstance(loser, AdoptionConflict) and "took it over first" in str(loser)
        won = {"b": b, "c": c}[winner]
        with pytest.raises(LeaseLost, match="held by lease"):  # the old holder is fenced off
            dead.append("s", 0, x[:1], x[:1], np.arange(7, 8))
        won.append("s", 0, x[:1], x[:1], np.arange(7, 8))  # the first layer is one ahead
        assert won.adopt("s", address, won.holder_epoch("s"), 7, SPEC) == 1
        won.release("s")


def test_the_ahead_layers_must_be_the_first_ones(service):
    address = f"127.0.0.1:{service.port}"
    x = np.ones((7, 2, 64), np.float32)
    with (
        RemoteKVClient.connect(address, holder="a") as a,
        RemoteKVClient.connect(address, holder="b") as b,
    ):
        a.create("t", SPEC)
        a.append("t", 0, x[:5], x[:5], np.arange(5))
        a.append("t", 1, x[:6], x[:6], np.arange(6))  # the second layer ahead: not a step
        with pytest.raises(AdoptionRefused, match="holds \\[5, 6\\] tokens"):
            b.adopt("t", address, a.holder_epoch("t"), 5, SPEC)
