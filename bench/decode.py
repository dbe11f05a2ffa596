"""Decode speed of every policy at a few context lengths, in-process, on the embedded model.

Writes ``bench/results/decode.md``. Per context length one prompt (a window of Python's
``pydoc_data`` documentation) is prefilled once, densely; its K/V are replayed into a fresh
in-process store per policy, so every policy starts from the same cache and only the model's
prefill is shared. The policies then decode greedily in lock-step, one step each in turn
(the order rotates), so a noisy machine slows them alike. The first decode step (the index
build) is reported apart and left out of the per-token times. The prompt is
``context - new_tokens - 1`` tokens, so decoding ends at the context length.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.decode [--contexts 2048,4096,8192]
        [--new-tokens 16] [--policies full,quest,...] [--page-cache-too]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache_service.types import POLICIES
from evaluation.corpus import Corpus, default_text
from worker.engine import Engine, EngineConfig, PrefillRecord, Sequence, StepTimings
from worker.kv_client import LocalKVClient
from worker.loader import load_model
from worker.model import LlamaModel
from worker.page_cache import PageCacheStats

OUT = Path(__file__).parent / "results" / "decode.md"
STORE_BYTES = 4 * 2**30  # pages and the indexes' own memory (the OS backs what is used)
"""Pool of each policy's in-process store; the OS backs only the pages written."""


@dataclass
class Run:
    """One policy's engine decoding one sequence, and its per-step wall times."""

    policy: str
    engine: Engine
    name: str
    seq: Sequence
    ingest_s: float
    first_step_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def prefill(model: LlamaModel, ids: list[int]) -> tuple[PrefillRecord, int, float]:
    """Dense prefill of ``ids``, recorded; returns it, the first token and the seconds."""
    kv = LocalKVClient.with_capacity(STORE_BYTES, 16, model.config.head_dim)
    engine = Engine(model, kv, EngineConfig(policy="full"))
    started = time.perf_counter()
    record = engine.record_prefill(ids)
    return record, int(torch.argmax(record.logits)), time.perf_counter() - started


def make_run(
    model: LlamaModel, policy: str, budget: int, record: PrefillRecord, in_place: bool = True
) -> Run:
    """A fresh store and engine for ``policy`` holding the recorded prompt K/V; attention
    reads the selected pages in the store (``in_place``) or copies of them in the device
    page cache (the path a GPU takes)."""
    kv = LocalKVClient.with_capacity(STORE_BYTES, 16, model.config.head_dim)
    config = EngineConfig(policy=policy, budget=budget, pages_in_place=in_place)
    engine = Engine(model, kv, config)
    started = time.perf_counter()
    seq, _ = engine.start(list(record.ids), policy, replay=record)
    name = policy if in_place else f"{policy} (page cache)"
    return Run(policy, engine, name, seq, time.perf_counter() - started)


def decode(runs: list[Run], token: int, new_tokens: int) -> None:
    """Lock-step greedy decoding; each run follows its own argmax."""
    nexts = {run.name: token for run in runs}
    for step in range(new_tokens):
        for run in runs[step % len(runs) :] + runs[: step % len(runs)]:
            started = time.perf_counter()
            logits = run.engine.decode_step([run.seq], [nexts[run.name]])
            elapsed = time.perf_counter() - started
            if step == 0:
                run.first_step_s = elapsed
                run.engine.timings = StepTimings()  # leave the index build out
                run.engine.cache.stats = PageCacheStats()
            else:
                run.step_s.append(elapsed)
            run.tokens.append(nexts[run.name])
            nexts[run.name] = int(torch.argmax(logits[0]))


def report(runs: list[Run], context: int, prefill_s: float, prompt: int) -> list[str]:
    full = next((r for r in runs if r.policy == "full"), runs[0])
    full_ms = 1000 * float(np.median(full.step_s))
    lines = [
        f"## {context} tokens of context",
        "",
        f"Dense prefill of the {prompt}-token prompt: {prefill_s:.1f} s "
        f"({prompt / prefill_s:.0f} tokens/s).",
        "",
        "| policy | decode ms/token (median) | vs full | store | page load | model + attention "
        "| first step ms | K/V ingest s | KV tokens per layer·head | KiB moved/step | hit rate "
        f"| tokens equal to {full.policy} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        t, c = run.engine.timings, run.engine.model.config
        ms = 1000 * float(np.median(run.step_s))
        per = 1000 / t.steps
        rest = per * (t.total - t.store - t.load)
        kv_tokens = t.kv_tokens / (t.steps * c.num_layers * c.num_kv_heads)
        cache = run.engine.cache.stats
        moved, hits = f"{cache.bytes_moved / 1024 / t.steps:.0f}", f"{cache.hit_rate:.2f}"
        if run.engine.in_place is not None and run.policy != "full":
            moved, hits = "in place", "-"
        lines.append(
            f"| {run.name} | {ms:.1f} | {ms / full_ms:.2f} | {per * t.store:.1f} "
            f"| {per * t.load:.1f} | {rest:.1f} | {1000 * run.first_step_s:.0f} "
            f"| {run.ingest_s:.1f} | {kv_tokens:.0f} | {moved} "
            f"| {hits} | {_agree(run.tokens, full.tokens)} |"
        )
    return lines + [""]


def _agree(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"{same}/{len(a)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="2048,4096,8192")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument(
        "--page-cache-too",
        action="store_true",
        help="also run each sparse policy with its pages copied through the device page "
        "cache (the path a GPU takes), beside the run that reads them in the store",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first step is left out)")
    policies = args.policies.split(",")
    model, tokenizer = load_model()
    corpus = Corpus(default_text(), tokenizer)
    lines = _header(args)
    for context in (int(x) for x in args.contexts.split(",")):
        prompt = context - args.new_tokens - 1
        ids = corpus.window_ids(prompt, np.random.default_rng(context))
        rec, token, prefill_s = prefill(model, ids)
        runs = [make_run(model, p, args.budget, rec) for p in policies]
        if args.page_cache_too:
            copied = [p for p in policies if p != "full"]
            runs += [make_run(model, p, args.budget, rec, in_place=False) for p in copied]
        del rec
        decode(runs, token, args.new_tokens)
        for run in runs:
            run.engine.finish(run.seq)
        lines += report(runs, context, prefill_s, prompt)
        print("\n".join(lines[-len(runs) - 6 :]), flush=True)
        args.out.write_text("\n".join(lines))


def _header(args: argparse.Namespace) -> list[str]:
    threads = os.environ.get("OMP_NUM_THREADS")
    omp = f"OMP_NUM_THREADS={threads} " if threads else ""
    return [
        "# Decode speed per policy, in-process (embedded SmolLM2-135M-Instruct, CPU)",
        "",
        f"Command: `{omp}.venv/bin/python -m bench.decode --contexts {args.contexts} "
        f"--new-tokens {args.new_tokens} --policies {args.policies}"
        f"{' --page-cache-too' if args.page_cache_too else ''}`; {platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, float32; budget "
        f"{args.budget} tokens per layer and KV head (sinks and window included); first 2 "
        f"layers dense under every policy; written {time.strftime('%Y-%m-%d')}; 1-minute load "
        f"average at the start {os.getloadavg()[0]:.1f} (other processes share the cores: "
        "compare rows of one table, not absolute times across machines).",
        "",
        "Steps of the policies are interleaved. Per-token columns are means over the timed "
        "steps, in ms: *store* is the in-process store's `decode` (append the new K/V, select "
        "pages), *page load* the page table and, for a *(page cache)* run, the device page "
        "cache (resolve selected pages, copy the missing ones; the other runs attend over the "
        "store's pages in place, as a CPU engine does by default), *model + attention* "
        "everything else (projections, MLP, LM head, paged attention). *First step* "
        "includes the index build. *Tokens equal* counts the leading "
        "greedy tokens that agree with `full` (or with the first policy when `full` is not run).",
        "",
    ]


if __name__ == "__main__":
    main()
