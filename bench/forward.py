"""Our forward against transformers' on the same weights, threads and prompt (CPU).

Writes ``bench/results/forward.md``. Per context length one prompt (the start of Python's
``pydoc_data`` documentation) is prefilled by transformers (``AutoModelForCausalLM`` on our
converted checkpoint, its default attention, ``logits_to_keep=1`` as its ``generate`` does)
and by our engine (``Engine.start`` with the ``full`` policy over an in-process store, K/V
handed to the store included); then both decode greedily with their KV caches, one step each
in turn. Repeats alternate which side goes first, so a noisy machine slows both alike.
Prefill is the median over repeats, decode the median over every step after the first (our
first step fills the device page cache). Our store lives across the repeats, as a worker's
does, with prefix reuse off so that every repeat computes the whole prompt; an untimed
first prefill of each side warms both up (the OS backs a new pool's pages on first write,
~0.1-0.5 s at 2k tokens; the report gives that first prefill's time apart).

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.forward [--contexts 2048,8000]
        [--new-tokens 16] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import pydoc_data.topics
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from worker.engine import Engine, EngineConfig
from worker.kv_client import LocalKVClient
from worker.loader import embedded_checkpoint_dir, load_model
from worker.model import LlamaModel

OUT = Path(__file__).parent / "results" / "forward.md"
STORE_BYTES = 4 * 2**30  # pages and the indexes' own memory (the OS backs what is used)
"""Pool of the in-process store; the OS backs only the pages written."""


@dataclass
class Side:
    """One implementation's timings at one context length, in seconds."""

    prefill_s: list[float] = field(default_factory=list)
    first_s: float = 0.0  # the untimed warm-up prefill (ours: into a new pool)
    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def tokens_per_s(self, prompt: int) -> float:
        return prompt / statistics.median(self.prefill_s)

    def ms_per_token(self) -> float:
        return 1000 * statistics.median(self.step_s)


class HFRun:
    """transformers' greedy prefill + decode of one prompt with its own KV cache."""

    def __init__(self, hf: Any, ids: list[int]) -> None:
        self.hf, self.ids = hf, ids
        self.cache: Any = None
        self.token = -1

    @torch.inference_mode()
    def prefill(self) -> int:
        out = self.hf(torch.tensor([self.ids]), use_cache=True, logits_to_keep=1)
        self.cache, self.token = out.past_key_values, int(out.logits[0, -1].argmax())
        return self.token

    @torch.inference_mode()
    def step(self) -> int:
        out = self.hf(torch.tensor([[self.token]]), past_key_values=self.cache, use_cache=True)
        self.cache, self.token = out.past_key_values, int(out.logits[0, -1].argmax())
        return self.token


class OurRun:
    """Our engine's greedy prefill + decode of one prompt under the ``full`` policy."""

    def __init__(self, engine: Engine, ids: list[int]) -> None:
        self.engine = engine
        self.ids = ids
        self.seq: Any = None
        self.token = -1

    def prefill(self) -> int:
        self.seq, logits = self.engine.start(self.ids)
        self.token = int(torch.argmax(logits))
        return self.token

    def step(self) -> int:
        self.token = int(torch.argmax(self.engine.decode_step([self.seq], [self.token])[0]))
        return self.token

    def close(self) -> None:
        self.engine.finish(self.seq)


def _timed(fn: Any) -> tuple[float, int]:
    started = time.perf_counter()
    token = fn()
    return time.perf_counter() - started, token


def measure(
    model: LlamaModel, hf: Any, ids: list[int], new_tokens: int, repeats: int
) -> tuple[Side, Side]:
    """(transformers, ours) timings of ``repeats`` interleaved prefill + decode runs, after
    one warm-up prefill each."""
    kv = LocalKVClient.with_capacity(STORE_BYTES, 16, model.config.head_dim)
    engine = Engine(model, kv, EngineConfig(policy="full", prefix_reuse=False))
    theirs, ours = Side(), Side()
    for run, side in ((HFRun(hf, ids), theirs), (OurRun(engine, ids), ours)):
        side.first_s = _timed(run.prefill)[0]
        if isinstance(run, OurRun):
            run.close()
    for repeat in range(repeats):
        runs: list[tuple[Any, Side]] = [(HFRun(hf, ids), theirs), (OurRun(engine, ids), ours)]
        if repeat % 2:
            runs.reverse()
        tokens: list[list[int]] = [[], []]
        for (run, side), toks in zip(runs, tokens, strict=True):
            seconds, token = _timed(run.prefill)
            side.prefill_s.append(seconds)
            toks.append(token)
        for step in range(new_tokens - 1):
            for (run, side), toks in zip(runs, tokens, strict=True):
                seconds, token = _timed(run.step)
                if step > 0:
                    side.step_s.append(seconds)
                toks.append(token)
        for (run, side), toks in zip(runs, tokens, strict=True):
            side.tokens = toks
            if isinstance(run, OurRun):
                run.close()
    return theirs, ours


def prompt_ids(tokenizer: Any, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of Python's topic documentation."""
    topics = pydoc_data.topics.topics
    ids = tokenizer.encode(" ".join(topics[k] for k in sorted(topics)))
    if len(ids) < tokens:
        raise ValueError(f"the text has {len(ids)} tokens; ask for at most that many")
    return ids[:tokens]


def report(rows: list[tuple[int, Side, Side]], args: argparse.Namespace) -> list[str]:
    """The markdown of ``bench/results/forward.md``."""
    lines = _header(args) + [
        "| prompt | transformers prefill tok/s | ours | ratio | transformers decode ms/token "
        "| ours | ratio (theirs / ours) | greedy tokens equal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    met = []
    for prompt, theirs, ours in rows:
        pt, po = theirs.tokens_per_s(prompt), ours.tokens_per_s(prompt)
        dt, do = theirs.ms_per_token(), ours.ms_per_token()
        same = sum(1 for _ in _common_prefix(theirs.tokens, ours.tokens))
        lines.append(
            f"| {prompt} | {pt:.0f} | {po:.0f} | {po / pt:.2f}x | {dt:.1f} | {do:.1f} "
            f"| {dt / do:.2f}x | {same}/{len(ours.tokens)} |"
        )
        met.append(
            f"- {prompt} tokens: prefill {'met' if po >= pt else 'MISSED'} "
            f"({po / pt:.2f}x), decode {'met' if do <= dt else 'MISSED'} ({dt / do:.2f}x)"
        )
    firsts = ", ".join(
        f"{prompt} tokens: transformers {theirs.first_s:.2f} s, ours {ours.first_s:.2f} s"
        for prompt, theirs, ours in rows
    )
    return lines + [
        "",
        f"The untimed first prefill of each side (ours into a new pool): {firsts}.",
        "",
        "Targets (ours >= transformers' prefill tok/s; ours <= its decode ms/token):",
        "",
        *met,
        "",
    ]


def _common_prefix(a: list[int], b: list[int]) -> Any:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


def _header(args: argparse.Namespace) -> list[str]:
    cpu = _cpu_name()
    threads = os.environ.get("OMP_NUM_THREADS")
    omp = f"OMP_NUM_THREADS={threads} " if threads else ""
    return [
        "# Forward speed: our engine against transformers (embedded SmolLM2-135M, CPU)",
        "",
        f"Command: `{omp}.venv/bin/python -m bench.forward --contexts {args.contexts} "
        f"--new-tokens {args.new_tokens} --repeats {args.repeats} --threads {args.threads}`; "
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, float32; "
        f"torch {torch.__version__}, transformers {transformers.__version__}; written "
        f"{time.strftime('%Y-%m-%d')}; 1-minute load average at the start "
        f"{os.getloadavg()[0]:.1f} (other processes share the cores: the two sides run "
        "interleaved, so compare ratios, not absolute times).",
        "",
        "Prefill: median over repeats of the whole prompt's forward (transformers: "
        "`logits_to_keep=1`, as in its `generate`; ours: `Engine.start`, K/V handed to the "
        "in-process store included; the store lives across repeats, prefix reuse off, after one "
        "untimed prefill each). Decode: median ms per greedy step with the KV cache, the first "
        "step left out.",
        "",
    ]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="2048,8000", help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3 (the first decode step is left out)")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        embedded_checkpoint_dir(), dtype=torch.float32
    ).eval()
    rows = []
    for context in (int(x) for x in args.contexts.split(",")):
        ids = prompt_ids(tokenizer, context)
        theirs, ours = measure(model, hf, ids, args.new_tokens, args.repeats)
        rows.append((context, theirs, ours))
        lines = report(rows, args)
        print("\n".join(lines), flush=True)
        args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
