"""Load test: concurrent clients against the worker, and retrieval against 1, 2, 4 replicas.

Writes ``bench/results/load.md``. Everything runs on 127.0.0.1, bounded in count (clients x
requests) and in time (``--time-limit`` per phase; requests not started by then are skipped).

- **worker**: the compose cluster (two cache services + a worker) is started from
  ``docker-compose.yml`` by ``worker.launcher`` (or ``--server``/``--http`` name a running
  worker). One client sends K requests one after the other (the baseline), then M clients
  send K requests each at once, over gRPC and over the OpenAI-compatible HTTP API (the
  ``openai`` client, streaming), back to back, for ``--rounds`` rounds. Each request samples
  exactly ``--new-tokens`` tokens (``ignore_eos``) with a seed of its own, the same on both
  APIs. Reported: tokens/s, HTTP / gRPC, latency and time to first token p50/p99, errors,
  the mean decode batch, on which replica each sequence lived, and whether both APIs gave
  the same text.
- **retrieval**: 1, 2 and 4 cache-service processes (the compose file's ``cache-0``
  service, each on its own port) hold the same synthetic sequences, placed by rendezvous
  hashing; M client threads send K ``Retrieve`` calls each (random sequence and layer).
  Reported: calls/s, latency p50/p99, errors, sequences per replica, and the throughput of
  2 and 4 replicas as a ratio to 1, measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.load [--clients 4] [--requests 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cache_service.types import SequenceSpec
from worker.client import WorkerClient
from worker.kv.sharded import ShardedKVClient
from worker.launcher import LocalCluster, load_compose

log = logging.getLogger("bench.load")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "load.md"
TOPICS = ("the tides", "a compiler", "photosynthesis", "a hash table", "volcanoes", "chess")


@dataclass
class Sample:
    """One request or call: how long it took and where it ran."""

    latency_s: float
    first_token_s: float = 0.0
    tokens: int = 0
    replica: str = ""
    mean_batch: float = 0.0
    error: str = ""
    text: str = ""
    key: tuple[int, int] = (0, 0)
    """(client, request): the same key gets the same prompt and seed on either API."""


@dataclass
class Phase:
    """One measured phase: its clients, wall time and samples."""

    name: str
    clients: int
    per_client: int
    transport: str = ""
    round: int = 0
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    spread: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds during the phase: ``clients`` (this process) and each metered server."""
    machine_busy: float = 0.0
    """Cores the whole machine kept busy during the phase (every process, others' too)."""

    @property
    def cores_busy(self) -> float:
        return sum(self.cpu.values()) / self.wall_s if self.wall_s else 0.0

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if not s.error]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    @property
    def rate(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.ok) / self.wall_s if self.wall_s else 0.0

    def pct(self, attr: str, q: float) -> float:
        values = [getattr(s, attr) for s in self.ok]
        return float(np.percentile(values, q)) if values else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy so far (Linux ``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_clients(
    phase: Phase,
    call: Callable[[int, int], Sample],
    time_limit: float,
    skip: int = 0,
    servers: dict[str, int] | None = None,
) -> Phase:
    """``phase.clients`` threads, each calling ``call(client, i)`` ``phase.per_client`` times
    (``skip`` first calls of each are warm-up, not kept); stops starting calls at the limit.
    Meters the CPU time of this process and of the ``servers`` (name -> pid)."""
    deadline = time.perf_counter() + time_limit
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(phase.per_client + skip):
            if time.perf_counter() > deadline:
                return
            sample = call(c, i)
            sample.key = (c, i)
            if i >= skip:
                with lock:
                    phase.samples.append(sample)

    servers = servers or {}
    threads = [threading.Thread(target=client, args=(c,)) for c in range(phase.clients)]
    cpu = {"clients": time.process_time(), **{n: cpu_seconds(p) for n, p in servers.items()}}
    machine_before = machine_busy_seconds()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.wall_s = time.perf_counter() - started
    phase.machine_busy = (machine_busy_seconds() - machine_before) / phase.wall_s
    phase.cpu = {"clients": time.process_time() - cpu["clients"]}
    phase.cpu.update({n: cpu_seconds(p) - cpu[n] for n, p in servers.items()})
    return phase


def _free_ports(n: int) -> list[str]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [str(sock.getsockname()[1]) for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def default_policy() -> str:
    """``icecache`` once its index exists, else ``quest``."""
    return "icecache" if importlib.util.find_spec("cache_service.cluster_index") else "quest"


# ---- worker mode ------------------------------------------------------------------------------
SAMPLING = {"temperature": 0.8, "top_p": 0.95}
"""Every request samples, seeded by (client, request): both APIs generate the same tokens."""
TRANSPORTS = ("gRPC", "HTTP")
HTTP_TARGET = 0.9
"""HTTP tokens/s at least this share of gRPC's at equal concurrency (the issue's target)."""


def port_overrides() -> dict[str, str]:
    """Free ports for every port variable of ``docker-compose.yml``'s CPU services."""
    names = ("CACHE0", "CACHE0_METRICS", "CACHE1", "CACHE1_METRICS", "WORKER", "WORKER_METRICS",
             "WORKER_HTTP")  # fmt: skip
    ports = _free_ports(len(names))
    return {f"ICECACHE_{n}_PORT": p for n, p in zip(names, ports, strict=True)}


def start_cluster(args: argparse.Namespace) -> LocalCluster:
    overrides = port_overrides()
    overrides.update(
        ICECACHE_POLICY=args.policy,
        ICECACHE_BUDGET=str(args.budget),
        ICECACHE_CACHE_MEMORY=args.cache_memory,
        ICECACHE_MAX_BATCH=str(max(args.clients, 1)),
    )
    log.info("starting the compose cluster as local processes")
    return LocalCluster.from_compose(overrides=overrides).start(timeout=300)


@dataclass
class Target:
    """Where the worker listens: gRPC ``HOST:PORT`` and the HTTP API's base URL."""

    grpc: str
    http: str


def _request(client: int, i: int) -> tuple[str, int]:
    """The prompt and the seed of a client's ``i``-th request."""
    return f"In two sentences, explain {TOPICS[(client + i) % len(TOPICS)]}.", 1000 * client + i


def grpc_call(target: Target, args: argparse.Namespace) -> Callable[[int, int], Sample]:
    """One streamed ``Generate`` per request, timed here as the client sees it."""

    def call(client: int, i: int) -> Sample:
        prompt, seed = _request(client, i)
        started = time.perf_counter()
        first, done = 0.0, None
        try:
            with WorkerClient(target.grpc, timeout=args.time_limit + 60) as worker:
                stream = worker.generate(prompt, args.new_tokens, ignore_eos=True, seed=seed,
                                         **SAMPLING)  # fmt: skip
                for message in stream:
                    if message.HasField("token"):
                        first = first or time.perf_counter() - started
                    else:
                        done = message.done
        except Exception as err:  # counted, not fatal: the load test reports errors
            return Sample(time.perf_counter() - started, error=f"{type(err).__name__}: {err}")
        assert done is not None
        s = done.stats
        return Sample(time.perf_counter() - started, first, len(done.token_ids), s.replica,
                      s.mean_batch, text=done.text)  # fmt: skip

    return call


def http_call(target: Target, args: argparse.Namespace) -> Callable[[int, int], Sample]:
    """One streamed chat completion per request through the ``openai`` client."""
    import openai

    with openai.OpenAI(base_url=target.http, api_key=args.api_key, max_retries=0) as api:
        model = api.models.list().data[0].id

    def call(client: int, i: int) -> Sample:
        prompt, seed = _request(client, i)
        started = time.perf_counter()
        first, tokens = 0.0, 0
        details: dict[str, Any] = {}
        text: list[str] = []
        try:
            with openai.OpenAI(base_url=target.http, api_key=args.api_key, max_retries=0,
                               timeout=args.time_limit + 60) as api:  # fmt: skip
                chunks = api.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}],
                    max_tokens=args.new_tokens, seed=seed, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                    temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"],
                )  # fmt: skip
                for chunk in chunks:
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece:
                        first = first or time.perf_counter() - started
                        text.append(piece)
                    details = (chunk.model_extra or {}).get("icecache", details)
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
        except Exception as err:  # counted, not fatal
            return Sample(time.perf_counter() - started, error=f"{type(err).__name__}: {err}")
        return Sample(time.perf_counter() - started, first, tokens, details.get("replica", ""),
                      details.get("mean_batch", 0.0), text="".join(text))  # fmt: skip

    return call


def worker_phases(
    target: Target, args: argparse.Namespace, servers: dict[str, int] | None = None
) -> list[Phase]:
    """1 client, then M clients, each over gRPC and over HTTP back to back (the order of the
    two alternates between rounds, so neither always runs on a warmer machine)."""
    calls = {"gRPC": grpc_call(target, args), "HTTP": http_call(target, args)}
    for call in calls.values():
        run_clients(Phase("warm-up", 1, 1), call, args.time_limit)
    phases = []
    for r in range(args.rounds):
        for clients in (1, args.clients):
            order = TRANSPORTS if (r + clients) % 2 else TRANSPORTS[::-1]
            for transport in order:
                phase = Phase(f"{transport} x{clients}", clients, args.requests, transport, r)
                run_clients(phase, calls[transport], args.time_limit, 0, servers)
                phase.spread = Counter(s.replica for s in phase.ok)
                phases.append(phase)
    return phases


# ---- retrieval mode ---------------------------------------------------------------------------
def cache_replicas(n: int, memory: str) -> LocalCluster:
    """``n`` copies of the compose file's ``cache-0`` service, each on its own ports."""
    specs = []
    for i in range(n):
        port, metrics = _free_ports(2)
        overrides = {
            "ICECACHE_CACHE0_PORT": port,
            "ICECACHE_CACHE0_METRICS_PORT": metrics,
            "ICECACHE_CACHE_MEMORY": memory,
        }
        specs.append(replace(load_compose(overrides=overrides)["cache-0"], name=f"cache-{i}"))
    return LocalCluster(specs)


def fill(kv: ShardedKVClient, args: argparse.Namespace, spec: SequenceSpec) -> list[str]:
    """Create the synthetic sequences (same data for every replica count)."""
    rng = np.random.default_rng(0)
    seqs = [f"load-{i}" for i in range(args.sequences)]
    shape = (args.context, spec.num_kv_heads, spec.head_dim)
    for seq in seqs:
        kv.create(seq, spec)
        for layer in range(spec.num_layers):
            keys, values = rng.standard_normal((2, *shape), dtype=np.float32)
            kv.append(seq, layer, keys, values, np.arange(args.context))
    return seqs


def retrieval_phase(n: int, args: argparse.Namespace) -> Phase:
    spec = SequenceSpec(args.layers, 3, 9, 64, policy=args.policy, budget=args.budget,
                        dense_layers=0)  # fmt: skip
    phase = Phase(f"{n} replica{'s' if n > 1 else ''}", args.retrieval_clients, args.calls)
    with cache_replicas(n, args.cache_memory).start(timeout=120) as cluster:
        kv = ShardedKVClient.connect([cluster.address(s.name) for s in cluster.services])
        try:
            seqs = fill(kv, args, spec)
            servers = {r.spec.name: r.process.pid for r in cluster.running.values()}
            call = retrieval_call(kv, seqs, spec)
            run_clients(phase, call, args.time_limit, skip=2, servers=servers)
            phase.spread = Counter({address: 0 for address in kv.shards})
            phase.spread.update(kv.replica_of(s) for s in seqs)
            for seq in seqs:
                kv.release(seq)
        finally:
            kv.close()
    return phase


def retrieval_call(
    kv: ShardedKVClient, seqs: list[str], spec: SequenceSpec
) -> Callable[[int, int], Sample]:
    def call(client: int, i: int) -> Sample:
        rng = np.random.default_rng(1000 * client + i)
        seq = seqs[int(rng.integers(len(seqs)))]
        layer = int(rng.integers(spec.num_layers))
        queries = rng.standard_normal((spec.num_q_heads, spec.head_dim), dtype=np.float32)
        started = time.perf_counter()
        try:
            kv.retrieve(seq, layer, queries)
        except Exception as err:  # counted, not fatal
            return Sample(time.perf_counter() - started, error=f"{type(err).__name__}: {err}")
        return Sample(time.perf_counter() - started, replica=kv.replica_of(seq))

    return call


# ---- report -----------------------------------------------------------------------------------
def _spread(phase: Phase, names: dict[str, str]) -> str:
    return ", ".join(f"{names.get(r, r)}: {c}" for r, c in sorted(phase.spread.items()))


def _servers_cpu(p: Phase) -> float:
    return sum(v for k, v in p.cpu.items() if k != "clients")


def _worker_cpu(p: Phase) -> str:
    if "worker" not in p.cpu:
        return "n/a"
    caches = _servers_cpu(p) - p.cpu["worker"]
    return f"{p.cpu['worker']:.1f} / {caches:.1f} / {p.cpu['clients']:.1f}"


def worker_table(phases: list[Phase], names: dict[str, str]) -> list[str]:
    rows = [
        "| round | API | clients | requests ok | errors | wall s | tokens/s | vs 1 client "
        "| HTTP / gRPC | latency p50 / p99 s | first token p50 / p99 s | mean decode batch "
        "| sequences per replica | CPU s: worker / caches / clients | cores busy: ours / machine |",
        "|" + " ---: |" * 12 + " --- | ---: | ---: |",
    ]
    for p in phases:
        one = _twin(phases, p, clients=1)
        grpc = _twin(phases, p, transport="gRPC")
        vs_one = p.tokens_per_s / one.tokens_per_s if one.tokens_per_s else float("nan")
        vs_grpc = f"{p.tokens_per_s / grpc.tokens_per_s:.2f}x" if p.transport == "HTTP" else ""
        batch = np.mean([s.mean_batch for s in p.ok]) if p.ok else float("nan")
        rows.append(
            f"| {p.round + 1} | {p.transport} | {p.clients} | {len(p.ok)} | {p.errors} "
            f"| {p.wall_s:.1f} | {p.tokens_per_s:.1f} | {vs_one:.2f}x | {vs_grpc} "
            f"| {p.pct('latency_s', 50):.2f} / {p.pct('latency_s', 99):.2f} "
            f"| {p.pct('first_token_s', 50):.2f} / {p.pct('first_token_s', 99):.2f} "
            f"| {batch:.2f} | {_spread(p, names)} | {_worker_cpu(p)} "
            f"| {p.cores_busy:.2f} / {p.machine_busy:.2f} |"
        )
    return rows


def _twin(phases: list[Phase], p: Phase, **same: object) -> Phase:
    """The phase of ``p``'s round that differs from it only in ``same``."""
    want = {"round": p.round, "transport": p.transport, "clients": p.clients, **same}
    return next(q for q in phases if all(getattr(q, k) == v for k, v in want.items()))


def http_vs_grpc(phases: list[Phase], clients: int) -> list[float]:
    """HTTP tokens/s over gRPC tokens/s at ``clients`` concurrent clients, per round."""
    return [
        p.tokens_per_s / _twin(phases, p, transport="gRPC").tokens_per_s
        for p in phases
        if p.transport == "HTTP" and p.clients == clients
    ]


def same_tokens(phases: list[Phase]) -> tuple[int, int]:
    """(requests compared, requests whose text differs) between the two APIs, per round."""
    compared = differ = 0
    for p in phases:
        if p.transport != "HTTP":
            continue
        grpc = {s.key: s.text for s in _twin(phases, p, transport="gRPC").ok}
        for s in p.ok:
            if s.key in grpc:
                compared += 1
                differ += s.text != grpc[s.key]
    return compared, differ


def retrieval_table(phases: list[Phase]) -> list[str]:
    base = phases[0].rate or float("nan")
    rows = [
        "| replicas | calls ok | errors | wall s | calls/s | vs 1 replica "
        "| latency p50 / p99 ms | sequences per replica | CPU s: replicas / clients "
        "| cores busy: ours / machine |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for n, p in zip((len(p.spread) for p in phases), phases, strict=True):
        counts = " / ".join(str(c) for _, c in sorted(p.spread.items()))
        rows.append(
            f"| {n} | {len(p.ok)} | {p.errors} | {p.wall_s:.1f} | {p.rate:.0f} "
            f"| {p.rate / base:.2f}x | {1000 * p.pct('latency_s', 50):.1f} / "
            f"{1000 * p.pct('latency_s', 99):.1f} | {counts} "
            f"| {_servers_cpu(p):.1f} / {p.cpu.get('clients', 0):.1f} "
            f"| {p.cores_busy:.2f} / {p.machine_busy:.2f} |"
        )
    return rows


def machine() -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    return f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}"


def report(
    args: argparse.Namespace, worker: list[Phase], names: dict[str, str], retr: list[Phase]
) -> str:
    lines = [
        "# Load: concurrent clients against the worker (gRPC and HTTP); retrieval against 1, 2, 4 "
        "replicas",
        "",
        f"Command: `{args.command}`; {machine()}; everything on 127.0.0.1; "
        f"policy `{args.policy}`, budget {args.budget}; written {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    if worker:
        lines += [
            "## Worker (generation through the compose cluster): gRPC and the HTTP API",
            "",
            f"The compose file's services as local processes (two cache services, one worker "
            f"on the embedded SmolLM2, CPU). Each request: a short chat prompt, exactly "
            f"{args.new_tokens} generated tokens, sampled (temperature "
            f"{SAMPLING['temperature']}, top-p {SAMPLING['top_p']}) with a seed per (client, "
            f"request), streamed. *gRPC*: `WorkerClient.generate`; *HTTP*: the `openai` "
            f"client's `chat.completions.create(stream=True)` against `--http-port`. Per round: "
            f"1 client x {args.requests} requests one after the other, then {args.clients} "
            f"clients x {args.requests} requests at once, each over both APIs back to back "
            f"(which goes first alternates). Times are the client's own (first token: the "
            f"first streamed text). *vs 1 client*: tokens/s against the same API's 1-client "
            f"row of the round; *HTTP / gRPC*: against the gRPC row of the same round and "
            f"concurrency.",
            "",
            *worker_table(worker, names),
            "",
        ]
    if retr:
        lines += [
            "## Retrieval only (straight against the cache services)",
            "",
            f"{args.sequences} synthetic sequences of {args.context} tokens x {args.layers} "
            f"layers x 3 KV heads x 64 dims, placed by rendezvous hashing; "
            f"{args.retrieval_clients} client threads x {args.calls} `Retrieve` calls "
            f"(9 query heads, random sequence and layer). *vs 1 replica* is calls/s against "
            f"the first row, same run.",
            "",
            *retrieval_table(retr),
            "",
        ]
    lines += ["## Reading it", "", *args.notes]
    return "\n".join(lines) + "\n"


def notes(worker: list[Phase], retr: list[Phase]) -> list[str]:
    """What the numbers say, and where this machine's cores cap them."""
    out = []
    if worker:
        out.append(_http_note(worker))
        one = next(p for p in worker if p.transport == "gRPC" and p.clients == 1)
        many = _twin(worker, one, clients=max(p.clients for p in worker))
        if one.tokens_per_s and many is not one:
            out.append(_worker_note(one, many))
    if len(retr) >= 2 and retr[0].rate:
        out.append(_replica_note(retr))
    out.append(
        "- **Placement.** Sequences spread by rendezvous hashing of their ids; with a few "
        "sequences the split is uneven by chance (it evens out over many: see "
        "`tests/worker/test_placement.py`). A replica's share of the load follows its share of "
        "the sequences."
    )
    out.append(
        "- Other engineers' jobs shared these cores during the run (*machine* vs *ours* in "
        "the cores-busy column): compare rows of the same run (the ratios), not absolute "
        "numbers across runs."
    )
    return out


def _http_note(worker: list[Phase]) -> str:
    clients = max(p.clients for p in worker)
    ratios = http_vs_grpc(worker, clients)
    mean = float(np.exp(np.mean(np.log(ratios)))) if ratios else float("nan")
    met = "met" if mean >= HTTP_TARGET else "**missed**"
    compared, differ = same_tokens(worker)
    singles = ", ".join(f"{r:.2f}x" for r in http_vs_grpc(worker, 1))
    return (
        f"- **HTTP against gRPC.** At {clients} concurrent clients the HTTP API streams "
        f"{', '.join(f'{r:.2f}x' for r in ratios)} of gRPC's tokens/s (round by round; "
        f"geometric mean {mean:.2f}x; target >= {HTTP_TARGET}x: {met}); at 1 client "
        f"{singles}. Both APIs go through the same admission, scheduler and decode steps; "
        "what HTTP adds per token is JSON and an SSE frame, and per request the thread hops "
        "between uvicorn's event loop and the generation (the decode step, tens of "
        "milliseconds, dominates either way). The same (client, request) got the same text "
        f"over both APIs in {compared - differ} of {compared} requests (same prompt and seed)."
    )


def _worker_note(one: Phase, many: Phase) -> str:
    gain = many.tokens_per_s / one.tokens_per_s
    batch = np.mean([s.mean_batch for s in many.ok]) if many.ok else float("nan")
    worker_cores = many.cpu.get("worker", float("nan")) / many.wall_s
    return (
        f"- **Batching.** {many.clients} concurrent clients get {gain:.2f}x the tokens/s of "
        f"one client (mean decode batch {batch:.2f}). A decode step reads every weight once "
        "and makes one decode request per layer and replica whatever the batch size, so those "
        "costs are shared; attention, page loads and the cache services' per-token selection "
        "grow with the batch. Prefill is not batched: a new request's prefill runs between "
        "two decode steps and stalls the running ones (the latency and first-token columns). "
        f"The cap here is the worker's one decode thread: it kept {worker_cores:.2f} cores "
        f"busy and the whole machine {many.machine_busy:.2f} of {os.cpu_count()}. The forward "
        "pass runs on one torch thread (OMP_NUM_THREADS=1) and waits for each layer's "
        "decode reply before the next layer, so the worker and the cache services take turns "
        "rather than run side by side, and the second core mostly idles; more torch threads "
        "or overlapping a layer's retrieval with other work would use it."
    )


def _replica_note(retr: list[Phase]) -> str:
    first, last = retr[0], retr[-1]
    ratios = ", ".join(f"{len(p.spread)}: {p.rate / first.rate:.2f}x" for p in retr[1:])
    calls = max(1, len(first.ok))
    server_ms = 1000 * _servers_cpu(first) / calls
    client_ms = 1000 * first.cpu.get("clients", 0.0) / calls
    cores = os.cpu_count() or 1
    ceiling = cores * 1000 / (server_ms + client_ms)
    per_call = ", ".join(
        f"{len(p.spread)} replicas {1000 * sum(p.cpu.values()) / max(1, len(p.ok)):.2f}"
        for p in retr
    )
    return (
        f"- **Replicas.** Retrieval calls/s against 1 replica, same run: {ratios}. With one "
        f"replica a call cost {server_ms:.2f} ms of replica CPU and {client_ms:.2f} ms of "
        f"client CPU, and the replica kept {_servers_cpu(first) / first.wall_s:.2f} cores "
        "busy: a cache service is one Python process whose request handling holds its GIL, so "
        "one replica serves at most about one core's worth. More replicas lift that limit "
        f"only if there are cores to run them: with {cores} cores for replicas and clients "
        f"together, no replica count can pass {cores} / ({server_ms:.2f} + {client_ms:.2f}) ms "
        f"= {ceiling:.0f} calls/s, {ceiling / first.rate:.2f}x the 1-replica rate. That "
        "ceiling, not the replica count, is what this machine measures; each extra process "
        f"also costs CPU (CPU ms per call, all our processes: {per_call}), and the clients "
        f"are one GIL-bound Python process too (at {len(last.spread)} replicas they kept "
        f"{last.cpu.get('clients', 0.0) / last.wall_s:.2f} cores busy while the machine ran "
        f"{last.machine_busy:.2f} of {cores}: the rest is GIL hand-offs and scheduling among "
        f"{len(last.spread) + 1} busy processes), {_against(retr, ceiling / first.rate)}. "
        "With a core per replica plus cores for the clients, calls/s should grow about "
        "linearly with replicas until the clients are the limit."
    )


def _against(retr: list[Phase], ceiling: float) -> str:
    """How the measured replica ratios compare with the CPU ceiling."""
    best = max(p.rate for p in retr[1:]) / retr[0].rate
    if best <= ceiling:
        return "so the measured ratios stay below it"
    return (
        f"yet this run measured up to {best:.2f}x: its 1-replica row ran slower than its CPU "
        "cost explains (other processes shared the cores then: see its machine column), so "
        "that row, and the ceiling computed from it, are low"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    add = parser.add_argument
    add("--mode", choices=("all", "worker", "retrieval"), default="all")
    add("--server", help="HOST:PORT of a running worker (default: start the compose cluster)")
    add("--http", help="base URL of that worker's HTTP API (e.g. http://127.0.0.1:8000/v1)")
    add("--api-key", default=os.environ.get("ICECACHE_AUTH_TOKEN") or "none",
        help="the worker's token (default: ICECACHE_AUTH_TOKEN)")  # fmt: skip
    add("--rounds", type=int, default=2, help="rounds of the worker phases")
    add("--clients", type=int, default=4, help="concurrent worker clients (M)")
    add("--requests", type=int, default=3, help="requests per client (K)")
    add("--new-tokens", type=int, default=16)
    add("--policy", default=default_policy())
    add("--budget", type=int, default=256)
    add("--replicas", default="1,2,4", help="replica counts of the retrieval mode")
    add("--retrieval-clients", type=int, default=8)
    add("--calls", type=int, default=200, help="Retrieve calls per retrieval client")
    add("--sequences", type=int, default=16)
    add("--context", type=int, default=2048, help="tokens per synthetic sequence")
    add("--layers", type=int, default=4, help="layers per synthetic sequence")
    add("--cache-memory", default="512M", help="page pool of each cache service")
    add("--time-limit", type=float, default=120.0, help="seconds per phase at most")
    add("--out", default=str(OUT))
    args = parser.parse_args(argv)
    args.notes = []
    return args


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    args.command = "python -m bench.load " + " ".join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    worker: list[Phase] = []
    names: dict[str, str] = {}
    retr: list[Phase] = []
    if args.mode in ("all", "worker"):
        worker, names = run_worker_mode(args)
    if args.mode in ("all", "retrieval"):
        retr = [retrieval_phase(int(n), args) for n in args.replicas.split(",")]
    args.notes = notes(worker, retr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report(args, worker, names, retr))
    log.info("wrote %s", args.out)
    return 0


def run_worker_mode(args: argparse.Namespace) -> tuple[list[Phase], dict[str, str]]:
    if args.server:
        if not args.http:
            raise SystemExit("--server needs --http, the base URL of the worker's HTTP API")
        return worker_phases(Target(args.server, args.http), args), {}
    with start_cluster(args) as cluster:
        names = {cluster.address(n): n for n in ("cache-0", "cache-1")}
        servers = {r.spec.name: r.process.pid for r in cluster.running.values()}
        (worker,) = (s for s in cluster.services if s.name == "worker")
        http = f"http://127.0.0.1:{worker.environment['ICECACHE_HTTP_PORT']}/v1"
        return worker_phases(Target(cluster.address("worker"), http), args, servers), names


if __name__ == "__main__":
    raise SystemExit(main())
