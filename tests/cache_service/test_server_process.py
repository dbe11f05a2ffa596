"""``python -m cache_service`` as a process, serving ``icecache generate --cache-service``."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache_service.__main__ import parse_config
from cache_service.types import SequenceSpec
from tests.worker.kv.test_remote import BUDGET, NEW_TOKENS, POLICY, PROMPT, local_greedy
from worker.kv.remote import RemoteKVClient

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_serving(proc, address, timeout=60.0, channel=None):
    deadline = time.monotonic() + timeout
    with channel or grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"cache service exited: {proc.stderr.read()}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError(f"cache service at {address} not serving after {timeout} s")


@pytest.fixture
def service_process():
    port, metrics_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "cache_service", "--port", str(port), "--max-memory", "256M"]
    env = {**os.environ, "ICECACHE_METRICS_PORT": str(metrics_port)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    try:
        _wait_serving(proc, address)
        yield proc, address, metrics_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_command_generates_the_same_tokens_through_the_service(smollm, service_process):
    proc, address, metrics_port = service_process
    model, tokenizer = smollm
    worker = [
        sys.executable, "-m", "worker.cli", "generate", "--cache-service", address,
        "--policy", POLICY, "--budget", str(BUDGET), "--device", "cpu", "--json",
        "--max-new-tokens", str(NEW_TOKENS), "--prompt", PROMPT,
    ]  # fmt: skip
    with RemoteKVClient.connect(address) as client:
        segment = client.info.segment.name
        assert client.transport == "shm" and (SHM / segment).exists()
        run = subprocess.run(worker, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        remote = json.loads(run.stdout)["token_ids"]
        local = local_greedy(model, tuple(tokenizer.chat_prompt_ids(PROMPT)))
        assert remote == local[: len(remote)]
        assert len(remote) == NEW_TOKENS or remote[-1] in tokenizer.eos_token_ids
        assert client.stats().sequences == 0
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        # a same-host worker decodes on a local stream
        assert b'icecache_requests_total{code="OK",method="LocalStream"}' in scrape.read()
        # stop while this client still maps the segment: the service unlinks it anyway
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not (SHM / segment).exists()
    logs = [json.loads(line) for line in proc.stderr.read().splitlines()]
    serving = next(entry for entry in logs if entry["msg"].startswith("serving on"))
    assert serving["segment"] == segment
    assert any(entry["msg"] == "received SIGTERM, stopping" for entry in logs)


def test_even_a_killed_service_leaves_no_segment(service_process):
    proc, address, _ = service_process
    with RemoteKVClient.connect(address) as client:
        segment = client.info.segment.name
    assert (SHM / segment).exists()
    proc.kill()  # no chance to clean up: multiprocessing's resource tracker unlinks it
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (SHM / segment).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (SHM / segment).exists()


def test_flags_override_env_which_overrides_defaults():
    env = {"ICECACHE_PORT": "7000", "ICECACHE_MAX_MEMORY": "1G", "ICECACHE_SHARED_MEMORY": "no"}
    config = parse_config([], env)
    assert (config.port, config.max_memory, config.shared_memory) == (7000, 2**30, False)
    assert config.page_size == 16 and config.head_dim == 64
    config = parse_config(["--port", "7001", "--max-memory", "512MiB", "--page-size", "32"], env)
    assert (config.port, config.max_memory, config.page_size) == (7001, 2**29, 32)
    assert config.num_pages == 2**29 // (2 * 32 * 64 * 4)


BAD_FLAGS = [
    ["--max-memory", "lots"],
    ["--port", "70000"],
    ["--dtype", "int8"],
    ["--max-memory", "1"],
]


@pytest.mark.parametrize("argv", BAD_FLAGS)
def test_bad_settings_are_refused_with_a_message(argv, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv, {})
    assert "error:" in capsys.readouterr().err


def test_a_restarted_replica_reclaims_the_segment_of_a_killed_one():
    port = _free_port()
    address = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "cache_service", "--port", str(port), "--max-memory", "16M"]

    def start():
        proc = subprocess.Popen(
            command, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        _wait_serving(proc, address)
        return proc

    first = start()
    with RemoteKVClient.connect(address) as client:
        segment = client.info.segment.name
    assert segment.startswith(f"icecache_{port}_{first.pid}_")
    # a live process's segment on the same port must survive the sweep
    decoy = shared_memory.SharedMemory(f"icecache_{port}_{os.getpid()}_0dd", create=True, size=64)
    second = None
    try:
        os.killpg(first.pid, signal.SIGKILL)  # the service and its resource tracker
        first.wait(timeout=30)
        time.sleep(0.3)
        assert (SHM / segment).exists()  # nobody was left to clean up
        second = start()
        assert not (SHM / segment).exists()
        assert (SHM / decoy.name).exists()
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        logs = [json.loads(line) for line in second.stderr.read().splitlines()]
        reclaimed = [e for e in logs if e["msg"].startswith("reclaimed shared memory")]
        assert [(e["segment"], e["owner_pid"]) for e in reclaimed] == [(segment, first.pid)]
        assert not list(SHM.glob(f"icecache_{port}_{second.pid}_*"))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        decoy.close()
        decoy.unlink()


def test_sigterm_lets_the_call_in_flight_finish_and_refuses_new_ones(service_process):
    proc, address, _ = service_process
    spec = SequenceSpec(1, 3, 9, 64, policy="icecache", budget=256, dense_layers=0)
    rng = np.random.default_rng(0)
    tokens = 12_000
    with RemoteKVClient.connect(address) as client:
        client.create("drain", spec)
        keys, values = rng.standard_normal((2, tokens, 3, 64), np.float32)
        client.append("drain", 0, keys, values, np.arange(tokens))
        result: dict[str, object] = {}

        def retrieve():  # the first retrieval builds the index: seconds of work
            try:
                result["selection"] = client.retrieve("drain", 0, np.ones((9, 64), np.float32))
            except Exception as err:  # noqa: BLE001 - reported below
                result["error"] = err
            result["done"] = time.monotonic()

        worker = threading.Thread(target=retrieve)
        worker.start()
        time.sleep(0.2)  # the call reaches the service; its index build takes ~2 s here
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        with pytest.raises(ConnectionError):  # no new calls once stopping
            client.stats()
        worker.join(timeout=60)
        assert "error" not in result, result.get("error")
        assert result["done"] > signalled  # it really was in flight
        assert result["selection"].pages.size > 0
        assert proc.wait(timeout=30) == 0
