"""Offloading cost: the cache service over gRPC against the in-process store.

Writes ``bench/results/offload.md``. A ``python -m cache_service`` process is started on
loopback; for each context length one prompt (a window of Python's ``pydoc_data``
documentation) is prefilled once in-process, and the recorded K/V are replayed into the
service, so every store holds the same cache. Then the engines decode greedily in
lock-step, one step each in turn (the order rotates), so a noisy machine slows them alike:

- ``in-process``: ``LocalKVClient``;
- ``remote shm``: ``RemoteKVClient`` as a same-host worker gets it: decode steps on a local
  stream (``OpenLocalStream``, a Unix socket), pages copied from the service's shared memory;
- ``remote shm, gRPC stream``: the same with decode steps on a gRPC ``DecodeStream``;
- ``remote shm, unary``: the same with one unary ``Decode`` call per layer and step;
- ``remote rpc``: ``RemoteKVClient`` forced to get pages by RPC (as on another host):
  decode steps on a gRPC ``DecodeStream`` whose responses carry the pages the client lacks
  (``push_pages``).

Per decode step it reports bytes moved into the device page cache and what would move
without it (every selected page, every step), the cache hit rate, the per-layer ``Decode``
call latency (p50/p99; the in-process row times ``Store.decode``), ms per token, and whether
the greedy outputs agree. The first decode step (index build) is left out of timings.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.offload [--contexts 4096,8192] [--new-tokens 16]

(One OpenMP thread per process: on two cores, spinning OpenMP threads of the worker and of
the service slow each other down.)
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache_service.types import PrefixKeys, Selection, SequenceSpec
from evaluation.corpus import Corpus, default_text
from worker.engine import Engine, EngineConfig, Sequence, StepTimings
from worker.kv.remote import RemoteKVClient
from worker.kv_client import KVClient, LocalKVClient
from worker.loader import load_model
from worker.model import LlamaModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "offload.md"


@dataclass
class Probe(KVClient):
    """A ``KVClient`` that passes calls through and records what crossed it."""

    kv: KVClient
    page_bytes: int
    dense_layers: int
    decode_s: list[float] = field(default_factory=list)
    selected: dict[str, int] = field(default_factory=lambda: {"all": 0, "sparse": 0})
    moved: dict[str, int] = field(default_factory=lambda: {"all": 0, "sparse": 0})
    timing: bool = False
    _layer: int = 0

    def __post_init__(self) -> None:
        self.page_size = self.kv.page_size
        self.dtype = self.kv.dtype

    def create(self, seq_id: str, spec: SequenceSpec, prefix: PrefixKeys | None = None) -> int:
        return self.kv.create(seq_id, spec, prefix)

    def share_prefix(self, seq_id: str, prefix: PrefixKeys) -> int:
        return self.kv.share_prefix(seq_id, prefix)

    def positional_pages(self, seq_id: str, layer: int) -> np.ndarray:
        return self.kv.positional_pages(seq_id, layer)

    def append(self, seq_id: str, layer: int, keys, values, positions) -> None:  # noqa: ANN001
        self.kv.append(seq_id, layer, keys, values, positions)

    def decode(self, layer, seq_ids, keys, values, positions, queries) -> list[Selection]:  # noqa: ANN001
        started = time.perf_counter()
        sels = self.kv.decode(layer, seq_ids, keys, values, positions, queries)
        if self.timing:
            self.decode_s.append(time.perf_counter() - started)
            self._count(self.selected, layer, sum(s.pages.size for s in sels))
        self._layer = layer
        return sels

    def append_step(self, layer, seq_ids, keys, values, positions) -> None:  # noqa: ANN001
        started = time.perf_counter()
        self.kv.append_step(layer, seq_ids, keys, values, positions)
        if self.timing:
            self.decode_s.append(time.perf_counter() - started)
        self._layer = layer

    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        return self.kv.retrieve(seq_id, layer, queries)

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        if self.timing:
            self._count(self.moved, self._layer, pages.size)
        return self.kv.read_pages(pages, versions)

    def release(self, seq_id: str) -> None:
        self.kv.release(seq_id)

    def _count(self, into: dict[str, int], layer: int, pages: int) -> None:
        into["all"] += pages * self.page_bytes
        if layer >= self.dense_layers:
            into["sparse"] += pages * self.page_bytes


@dataclass
class Run:
    """One engine decoding one sequence, and its per-step wall times."""

    name: str
    probe: Probe
    engine: Engine
    seq: Sequence | None = None
    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def start_service(max_memory: str) -> tuple[subprocess.Popen, str]:
    """``python -m cache_service`` on a free loopback port; returns it once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "cache_service", "--port", str(port)]
    command += ["--max-memory", max_memory, "--log-level", "WARNING"]
    proc = subprocess.Popen(command, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    RemoteKVClient.connect(address, connect_timeout=60).close()
    return proc, address


def make_runs(model: LlamaModel, address: str, config: EngineConfig) -> list[Run]:
    head_dim = model.config.head_dim
    local = LocalKVClient.with_capacity(4 * 2**30, 16, head_dim)
    clients: list[tuple[str, KVClient]] = [
        ("in-process", local),
        ("remote shm", RemoteKVClient.connect(address, transport="shm")),
        ("remote shm, gRPC stream", RemoteKVClient.connect(address, decode="stream")),
        ("remote shm, unary", RemoteKVClient.connect(address, transport="shm", decode="unary")),
        ("remote rpc", RemoteKVClient.connect(address, transport="rpc")),
    ]
    page_bytes = local.store.pool.page_bytes
    runs = []
    for name, kv in clients:
        probe = Probe(kv, page_bytes, config.dense_layers)
        runs.append(Run(name, probe, Engine(model, probe, config)))
    return runs


def prefill(runs: list[Run], ids: list[int], seq_id: str) -> int:
    """Prefill once in-process (``Engine.record_prefill``) and replay it into every store
    (the remotes share one service, so each sequence gets its own id); returns the first
    token."""
    record = runs[0].engine.record_prefill(ids)
    for i, run in enumerate(runs):
        run.seq, _ = run.engine.start(ids, f"{seq_id}-{i}", replay=record)
    return int(torch.argmax(record.logits))


def decode(runs: list[Run], token: int, new_tokens: int) -> None:
    """Lock-step greedy decoding; each run follows its own argmax."""
    nexts = {run.name: token for run in runs}
    for step in range(new_tokens):
        order = runs[step % len(runs) :] + runs[: step % len(runs)]
        for run in order:
            assert run.seq is not None
            run.probe.timing = step > 0
            started = time.perf_counter()
            logits = run.engine.decode_step([run.seq], [nexts[run.name]])
            if step > 0:
                run.step_s.append(time.perf_counter() - started)
            else:
                run.engine.timings = StepTimings()  # leave the index build out
            run.tokens.append(nexts[run.name])
            nexts[run.name] = int(torch.argmax(logits[0]))


def report(runs: list[Run], context: int) -> list[str]:
    base = runs[0]
    lines = [
        f"## {context} tokens of context",
        "",
        "| store | decode ms/token (median) | vs in-process | store / load ms per token "
        "| Decode call p50 / p99 ms "
        "| KiB moved/step | KiB/step without page cache | reduction | sparse layers: moved / "
        "without | hit rate | greedy tokens equal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base_ms = 1000 * float(np.median(base.step_s))
    for run in runs:
        p, steps = run.probe, len(run.step_s)
        ms = 1000 * float(np.median(run.step_s))
        lat = 1000 * np.percentile(p.decode_s, [50, 99])
        t = run.engine.timings
        parts = f"{1000 * t.store / t.steps:.1f} / {1000 * t.load / t.steps:.1f}"
        moved, without = p.moved["all"] / steps / 1024, p.selected["all"] / steps / 1024
        sparse = (
            f"{p.moved['sparse'] / steps / 1024:.0f} / {p.selected['sparse'] / steps / 1024:.0f}"
        )
        same = "yes" if run.tokens == base.tokens else f"no ({_agree(run.tokens, base.tokens)})"
        lines.append(
            f"| {run.name} | {ms:.1f} | {ms / base_ms:.2f} | {parts} | {lat[0]:.2f} / {lat[1]:.2f} "
            f"| {moved:.0f} | {without:.0f} | {without / max(moved, 1e-9):.1f}x | {sparse} "
            f"| {run.engine.cache.stats.hit_rate:.2f} | {same} |"
        )
    return lines + [""]


def round_trip_floor(address: str, calls: int = 300, compute_ms: float = 3.0) -> list[str]:
    """p50 of a bare unary call (``Stats``: lock-free, no tensors) back to back, and after
    ``compute_ms`` of single-threaded matrix work, as a worker computes between layers."""
    weight, x = torch.randn(576, 1536), torch.randn(1, 576)  # an MLP matrix of the model

    def compute() -> None:
        until = time.perf_counter() + compute_ms / 1000
        while time.perf_counter() < until:
            torch.mm(x, weight)

    p50 = {}
    with RemoteKVClient.connect(address) as client:
        for name, between in (("back to back", None), ("after compute", compute)):
            times = []
            for _ in range(calls):
                if between is not None:
                    between()
                started = time.perf_counter()
                client.stats()
                times.append(time.perf_counter() - started)
            p50[name] = 1000 * float(np.median(times))
    return [
        f"Bare round trip on this machine (a `Stats` call, p50 of {calls}): "
        f"{p50['back to back']:.2f} ms back to back, {p50['after compute']:.2f} ms after "
        f"{compute_ms:g} ms of single-threaded compute (the server's idle threads wake "
        "slower). A decode step makes 30 such round trips, one per layer.",
        "",
    ]


def _agree(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"first {same} of {len(a)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="4096,8192")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--policy", default="icecache")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model, tokenizer = load_model()
    corpus = Corpus(default_text(), tokenizer)
    config = EngineConfig(policy=args.policy, budget=args.budget)
    # four remote sequences at once: under icecache each holds its prefill about twice
    # (leaf pages about half full) and, while it builds, up to three times
    proc, address = start_service("6G")
    lines = _header(args)
    try:
        lines += round_trip_floor(address)
        print("\n".join(lines[-3:]), flush=True)
        for context in (int(x) for x in args.contexts.split(",")):
            runs = make_runs(model, address, config)
            prompt = context - args.new_tokens - 1  # the context reaches ``context`` at the end
            ids = corpus.window_ids(prompt, np.random.default_rng(context))
            decode(runs, prefill(runs, ids, f"bench-{context}"), args.new_tokens)
            for run in runs:
                assert run.seq is not None
                run.probe.release(run.seq.seq_id)
                run.probe.kv.close()
            lines += report(runs, context)
            print("\n".join(lines[-6:]), flush=True)
            args.out.write_text("\n".join(lines))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _omp() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={threads} " if threads else ""


def _header(args: argparse.Namespace) -> list[str]:
    return [
        "# Offloading: cache service over gRPC vs the in-process store",
        "",
        f"Command: `{_omp()}.venv/bin/python -m bench.offload --contexts {args.contexts} "
        f"--new-tokens {args.new_tokens}`; embedded SmolLM2-135M-Instruct on CPU, policy "
        f"`{args.policy}`, budget {args.budget} tokens per layer and KV head, first 2 layers "
        f"dense; {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads; cache service on 127.0.0.1 in its own process; written "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "Each row decodes the same prompt; steps of the five stores are interleaved. "
        "*Decode call* is one layer's `decode` (store new K/V + select pages) as the engine "
        "sees it: a `Store.decode` call in-process, remotely a request and its response "
        "(encode, loopback, server, decode) on a local stream (*remote shm*: the same-host "
        "default, a Unix socket), on a gRPC `DecodeStream` (*gRPC stream*; *remote rpc*, whose "
        "responses also carry the pages it lacks), "
        "or as a unary `Decode` RPC (*unary*). *Moved* is what the device page cache loaded; "
        "*without page cache* is "
        "every selected page, every step. On this CPU the 2 dense layers attend over the "
        "worker's contiguous copy and select nothing (append-only steps, whose calls are "
        "among the decode calls), so both byte columns are the sparse layers'. The first "
        "step (index build) is excluded. The "
        "prompt is `context - new_tokens - 1` tokens, so decoding ends at the context length.",
        "",
    ]


if __name__ == "__main__":
    main()
