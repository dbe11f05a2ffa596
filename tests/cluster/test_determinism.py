"""Live workers with tiny device caches: each request's tokens are those of its prompt alone.

One cache service (the compose file's ``cache-0``) and two ``python -m worker`` processes
sharing it. Worker 0 has a 1 MiB device page cache (128 pages: one dense layer of one
sequence, so each layer of each step evicts most of it) and decodes one sequence at a time,
the others of its concurrent requests waiting; worker 1 batches three sequences with several
policies in a 4 MiB cache (512 pages; a step touches ~2,000). Requests go to both at once;
each output must equal the in-process engine's on that prompt alone with a cache that never
evicts.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import DOC_BUDGET, DOC_NEW_TOKENS
from worker.client import WorkerClient, check_health
from worker.launcher import LocalCluster

from .test_compose_cluster import _free_ports

ROOT = Path(__file__).resolve().parents[2]
# worker -> (device cache MiB, --max-batch)
WORKERS = ((1, 1), (4, 16))
# (worker, prompt, policy): three requests on each worker at once
REQUESTS = [
    (0, 0, "icecache"), (0, 1, "icecache"), (0, 2, "quest"),
    (1, 2, "icecache"), (1, 0, "icecache-r"), (1, 1, "icecache"),
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_service(tmp_path_factory):
    ports = _free_ports(2)
    overrides = {
        "ICECACHE_CACHE0_PORT": str(ports[0]),
        "ICECACHE_CACHE0_METRICS_PORT": str(ports[1]),
        "ICECACHE_CACHE_MEMORY": "1G",
    }
    logs = tmp_path_factory.mktemp("determinism-logs")
    cluster = LocalCluster.from_compose(overrides=overrides, names=["cache-0"], log_dir=logs)
    cluster.start(timeout=120)
    try:
        yield cluster.address("cache-0")
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def launched(cache_service, tmp_path_factory):
    """Two worker processes on the one cache service, started (not yet ready): yields
    (processes, addresses, log directory)."""
    logs = tmp_path_factory.mktemp("worker-logs")
    processes, addresses = [], []
    try:
        for i, ((cache_mb, batch), port) in enumerate(zip(WORKERS, _free_ports(2), strict=True)):
            command = [
                sys.executable, "-m", "worker", "--port", str(port),
                "--cache-service", cache_service, "--policy", "icecache",
                "--budget", str(DOC_BUDGET), "--device-cache-mb", str(cache_mb),
                "--max-batch", str(batch), "--log-format", "text",
            ]  # fmt: skip
            with open(logs / f"worker-{i}.log", "wb") as out:
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "OMP_NUM_THREADS": "1"},
                    )  # fmt: skip
                )
            addresses.append(f"127.0.0.1:{port}")
        yield processes, addresses, logs
    finally:
        for process in processes:
            process.kill()
            process.wait(30)


@pytest.fixture(scope="module")
def references(launched, request):
    """(doc_prompts, doc_outputs), computed (where no test did before) while the workers
    load. Asked for here, not by the test: pytest sets up a test's session fixtures before
    its module ones, so the workers would only start once these were done."""
    return request.getfixturevalue("doc_prompts"), request.getfixturevalue("doc_outputs")


@pytest.fixture(scope="module")
def workers(launched, references):
    """The two workers, ready: their addresses."""
    processes, addresses, logs = launched
    deadline = time.monotonic() + 180
    for i, (address, process) in enumerate(zip(addresses, processes, strict=True)):
        while not check_health(address, service="icecache.v1.Worker"):
            assert process.poll() is None, (logs / f"worker-{i}.log").read_text()
            assert time.monotonic() < deadline, "a worker did not start in 180 s"
            time.sleep(0.2)
    return addresses


def test_two_workers_on_one_cache_service_give_each_prompt_its_tokens_alone(workers, references):
    doc_prompts, doc_outputs = references
    results: list[list[int] | BaseException | None] = [None] * len(REQUESTS)
    stats = [None] * len(REQUESTS)

    def run(i: int) -> None:
        worker, prompt, policy = REQUESTS[i]
        try:
            with WorkerClient(workers[worker]) as client:
                done = list(
                    client.generate(
                        doc_prompts[prompt],
                        DOC_NEW_TOKENS,
                        chat=False,
                        ignore_eos=True,
                        policy=policy,
                        budget=DOC_BUDGET,
                    )  # fmt: skip
                )[-1].done
                results[i], stats[i] = list(done.token_ids), done.stats
        except BaseException as error:  # reported below, with the others
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    want = [doc_outputs[policy][prompt] for _, prompt, policy in REQUESTS]
    assert results == want
    assert [s.policy for s in stats] == [policy for _, _, policy in REQUESTS]
    for worker, (cache_mb, batch) in enumerate(WORKERS):
        mine = [s for (w, _, _), s in zip(REQUESTS, stats, strict=True) if w == worker]
        if batch == 1:
            assert all(s.mean_batch == 1 for s in mine)  # one at a time, the others waiting
        else:
            assert max(s.mean_batch for s in mine) > 1  # its requests shared decode steps
        assert sum(s.pages_moved for s in mine) > cache_mb * 128  # so it evicted
