"""What a sequence costs the cache service, as process memory, under each policy.

Writes ``bench/results/memory.md``. One prompt (a window of Python's ``pydoc_data``
documentation) is prefilled once in-process (dense, recorded) and replayed into a fresh
``python -m cache_service`` process per policy (loopback gRPC, shared-memory pool, prefix
reuse off so nothing is kept beside the sequence); then ``--new-tokens`` tokens are decoded
greedily through the worker's engine, and the service's memory is read from
``/proc/<pid>/status`` while the sequence is held:

- *process memory*: growth of ``VmRSS`` (anonymous + pool pages touched) from the idle
  service to the end of decoding: the whole cost of the sequence, index included, plus
  whatever the allocator keeps;
- *pool* and *index*: what the service counts (``Stats``: pages in use × page bytes, and
  ``index_bytes``, the indexes' own arrays), i.e. what ``--max-memory`` and
  ``icecache_memory_used_bytes`` see;
- *tokens per pool page*: the sequence's tokens over its pages (16 = every page full).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.memory [--context 8192] [--new-tokens 40]

Target (issue 15): the process memory for ``icecache`` at most 1.3x that for ``full``.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.corpus import Corpus, default_text
from worker.engine import Engine, EngineConfig, PrefillRecord
from worker.kv.remote import RemoteKVClient
from worker.kv_client import LocalKVClient
from worker.loader import load_model
from worker.model import LlamaModel

from .offload import start_service

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "memory.md"
POLICIES = ("full", "quest", "streaming", "icecache", "icecache-r", "icecache-tokens", "kmeans")


@dataclass
class Row:
    policy: str
    rss_mib: float  # growth of VmRSS while the sequence is held
    anon_mib: float
    shmem_mib: float
    pool_mib: float  # Stats: pages in use x page bytes
    index_mib: float  # Stats: index_bytes
    pages: int
    tokens: int
    seconds: float


def status_kib(pid: int) -> dict[str, int]:
    """``/proc/<pid>/status`` memory lines in KiB (``VmRSS``, ``RssAnon``, ``RssShmem``)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssShmem"):
            out[name] = int(value.split()[0])
    return out


def measure(
    model: LlamaModel, policy: str, budget: int, ids: list[int], record: PrefillRecord, new: int
) -> Row:
    """One fresh service, one sequence of ``policy``: replay, decode, read memory."""
    proc, address = start_service("4G")
    kv = RemoteKVClient.connect(address)
    try:
        time.sleep(0.5)
        before = status_kib(proc.pid)
        started = time.perf_counter()
        engine = Engine(model, kv, EngineConfig(policy=policy, budget=budget, prefix_reuse=False))
        seq, _ = engine.start(ids, f"memory-{policy}", replay=record)
        token = int(torch.argmax(record.logits))
        for _ in range(new):
            logits = engine.decode_step([seq], [token])
            token = int(torch.argmax(logits[0]))
        seconds = time.perf_counter() - started
        after = status_kib(proc.pid)
        stats = kv.stats()
        tokens = len(ids) + new
        kv.release(seq.seq_id)
    finally:
        kv.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    mib = 1 / 1024
    return Row(
        policy,
        (after["VmRSS"] - before["VmRSS"]) * mib,
        (after["RssAnon"] - before["RssAnon"]) * mib,
        (after["RssShmem"] - before["RssShmem"]) * mib,
        stats.pages_used * stats.page_bytes / 2**20,
        stats.index_bytes / 2**20,
        stats.pages_used,
        tokens,
        seconds,
    )


def markdown(rows: list[Row], args: argparse.Namespace, layers: int, kv_heads: int) -> str:
    full = next(r for r in rows if r.policy == "full")
    lines = [
        "# Cache-service memory per sequence, by policy",
        "",
        "    OMP_NUM_THREADS=1 .venv/bin/python -m bench.memory "
        f"--context {args.context} --new-tokens {args.new_tokens} --budget {args.budget}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"{os.cpu_count()} cores. One sequence of {args.context} tokens "
        f"({args.context - args.new_tokens - 1} prompt tokens replayed from one recorded "
        f"dense prefill, {args.new_tokens} decoded), SmolLM2-135M "
        f"({layers} layers x {kv_heads} KV heads, head_dim 64, float32 pool), a fresh "
        "service per policy, prefix reuse off. *Process* = growth of the service's VmRSS "
        "(anonymous + shared-memory pool pages touched) while the sequence is held; *pool* "
        "and *index* = what the service counts against `--max-memory` (`Stats`).",
        "",
        "| policy | process MiB | x full | anon / pool shm MiB | counted: pool + index MiB "
        "| index / pool | tokens per pool page | replay + decode s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        # Pages per (layer, KV head) hold the sequence's tokens once each.
        per_page = r.tokens * layers * kv_heads / max(r.pages, 1)
        lines.append(
            f"| {r.policy} | {r.rss_mib:.0f} | {r.rss_mib / full.rss_mib:.2f} "
            f"| {r.anon_mib:.0f} / {r.shmem_mib:.0f} | {r.pool_mib:.0f} + {r.index_mib:.0f} "
            f"| {r.index_mib / max(r.pool_mib, 1e-9):.2f} | {per_page:.1f} | {r.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--context", type=int, default=8192, help="tokens at the end")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load_model()
    prompt = args.context - args.new_tokens - 1  # the context reaches ``context`` at the end
    ids = Corpus(default_text(), tokenizer).window_ids(prompt, np.random.default_rng(0))
    local = LocalKVClient.with_capacity(4 * 2**30, 16, model.config.head_dim)
    record = Engine(model, local, EngineConfig(policy="full")).record_prefill(ids)
    rows = []
    for policy in args.policies.split(","):
        rows.append(measure(model, policy, args.budget, ids, record, args.new_tokens))
        print(rows[-1], flush=True)
    if not any(r.policy == "full" for r in rows):
        raise SystemExit("--policies must include full (the reference)")
    text = markdown(rows, args, model.config.num_layers, model.config.num_kv_heads)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
