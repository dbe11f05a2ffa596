"""Leaf packing: how full the index's leaves are against the attention mass it recalls.

Writes ``bench/results/leaf_packing.md``. A leaf is one physical page, so its fill decides
the pages a sequence holds, the bytes a selection moves and the index's key copy. Each
variant of ``IndexConfig`` indexes the same heads side by side in one run, on the cases of
``bench/selection.py``: real keys of the embedded model (every selecting layer x 3 KV heads,
from the eval's cached prefill) and the synthetic Llama-3.1-shaped generator (layers 2-4 x
KV heads 0-1). Each head's body (sinks and recent window left out as the engine splits a
budget) is built without its last ``--inserted`` tokens, which are then inserted a page at
a time (as decoding hands them over), so the fill is measured after splits; then every
probed query selects. Recall = attention mass of sinks + window + selected tokens
(``bench.selection.quality``), over the oracle's (exact top tokens) at the same budget;
for whole leaves (``search``, ``icecache``) and for single tokens (``search_tokens``,
``icecache-tokens``, whose leaves are not pages: fill only changes what its search scores).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.leaf_packing [--real 8192] [--synthetic 32768]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache_service.cluster_index import ClusterIndex, IndexConfig

from . import selection as sel

OUT = Path(__file__).resolve().parent / "results" / "leaf_packing.md"
VARIANTS = {
    "free (default: build_fill 0.75, no packing)": IndexConfig(),
    "packed, pack_push 0": IndexConfig(build_fill=1.0, pack_push=0.0),
    "packed, pack_push 0.05": IndexConfig(build_fill=1.0, pack_push=0.05),
    "packed, pack_push 0.1": IndexConfig(build_fill=1.0, pack_push=0.1),
}


@dataclass
class Cell:
    recall: list[float] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    token_recall: list[float] = field(default_factory=list)  # search_tokens (icecache-tokens)
    token_s: list[float] = field(default_factory=list)  # its wall time per search


@dataclass
class Variant:
    fill_built: list[float] = field(default_factory=list)
    fill_after: list[float] = field(default_factory=list)
    index_bytes: list[float] = field(default_factory=list)  # per token, after inserts
    build_s: float = 0.0
    insert_s: float = 0.0
    cells: dict[int, Cell] = field(default_factory=dict)


def fill(index: ClusterIndex) -> float:
    return index.num_tokens / max(index.num_leaves, 1) / index.config.page_size


def run_case(
    case: sel.HeadCase,
    budgets: list[sel.Budget],
    inserted: int,
    results: dict[str, Variant],
    oracle: dict[int, list[float]],
) -> None:
    scale = case.keys.shape[1] ** -0.5
    probs = [
        sel.softmax(q @ case.keys[:n].T * scale)
        for q, n in zip(case.queries, case.context, strict=True)
    ]
    for budget in budgets:
        start, end = budget.sinks, case.body_end - budget.window
        cut = end - inserted
        for name, config in VARIANTS.items():
            v = results[name]
            index = ClusterIndex(case.keys.shape[1], config)
            t0 = time.perf_counter()
            index.build(case.keys[start:cut], np.arange(start, cut))
            v.build_s += time.perf_counter() - t0
            if budget is budgets[-1]:
                v.fill_built.append(fill(index))
            t0 = time.perf_counter()
            for a in range(cut, end, config.page_size):
                b = min(a + config.page_size, end)
                index.insert(case.keys[a:b], np.arange(a, b))
            v.insert_s += time.perf_counter() - t0
            if budget is budgets[-1]:
                v.fill_after.append(fill(index))
                v.index_bytes.append(index.nbytes() / index.num_tokens)
            cell = v.cells.setdefault(budget.total, Cell())
            for s, q in enumerate(case.queries):
                fixed = np.r_[0 : budget.sinks, end : case.context[s]]
                leaves = index.search(q, budget.body)
                pos = sel.leaf_positions(index, leaves)
                got = sel.quality(probs[s], np.concatenate([fixed, pos]), budget.body)[0]
                cell.recall.append(got)
                cell.pages.append(len(leaves))
                t0 = time.perf_counter()
                tokens = index.search_tokens(q, budget.body)
                cell.token_s.append(time.perf_counter() - t0)
                got = sel.quality(probs[s], np.concatenate([fixed, tokens]), budget.body)[0]
                cell.token_recall.append(got)
        for s, q in enumerate(case.queries):
            fixed = np.r_[0 : budget.sinks, end : case.context[s]]
            scores = (q @ case.keys[start:end].T).max(axis=0)
            k = min(budget.body, len(scores))
            pos = start + np.argpartition(-scores, k - 1)[:k]
            got = sel.quality(probs[s], np.concatenate([fixed, pos]), budget.body)[0]
            oracle.setdefault(budget.total, []).append(got)


def table(title: str, heads: int, results: dict[str, Variant], oracle: dict[int, list[float]]):
    budgets = sorted(oracle)
    lines = [
        f"### {title} ({heads} heads)",
        "",
        "| variant | leaf fill built / after inserts | "
        + " | ".join(f"x oracle @{b}" for b in budgets)
        + f" | pages/step @{budgets[-1]} | "
        + " | ".join(f"tokens x oracle @{b}" for b in budgets)
        + f" | tokens search us @{budgets[-1]} | index B/token | build s | insert s |",
        "| --- | ---: | "
        + " | ".join("---:" for _ in budgets)
        + " | ---: | "
        + " | ".join("---:" for _ in budgets)
        + " | ---: | ---: | ---: | ---: |",
    ]
    for name, v in results.items():
        ratios = [np.mean(v.cells[b].recall) / np.mean(oracle[b]) for b in budgets]
        tokens = [np.mean(v.cells[b].token_recall) / np.mean(oracle[b]) for b in budgets]
        lines.append(
            f"| {name} | {np.mean(v.fill_built):.3f} / {np.mean(v.fill_after):.3f} | "
            + " | ".join(f"{r:.4f}" for r in ratios)
            + f" | {np.mean(v.cells[budgets[-1]].pages):.1f} | "
            + " | ".join(f"{r:.4f}" for r in tokens)
            + f" | {1e6 * np.median(v.cells[budgets[-1]].token_s):.0f}"
            + f" | {np.mean(v.index_bytes):.0f} "
            f"| {v.build_s:.1f} "
            f"| {v.insert_s:.1f} |"
        )
    samples = len(oracle[budgets[-1]])
    return lines + ["", f"{samples} (head, query step) samples per cell.", ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--real", type=sel.int_tuple, default=(8192, 16384), help="real-key contexts (0: none)"
    )
    p.add_argument("--synthetic", type=int, default=32768, help="synthetic context (0: none)")
    p.add_argument("--budgets", type=sel.int_tuple, default=(128, 256))
    p.add_argument("--steps", type=int, default=8, help="probed decode steps (real)")
    p.add_argument("--inserted", type=int, default=512, help="body tokens inserted after build")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    budgets = [sel.Budget.of(b) for b in args.budgets]
    reals = ",".join(map(str, args.real))
    oracle: dict[int, list[float]]
    lines = [
        "# Leaf packing: fill against recall",
        "",
        f"    OMP_NUM_THREADS=1 .venv/bin/python -m bench.leaf_packing --real {reals} "
        f"--synthetic {args.synthetic} --inserted {args.inserted}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. "
        "Fill = tokens per leaf / 16; *after inserts*: after the last "
        f"{args.inserted} body tokens were inserted a page at a time. Index B/token: "
        "`ClusterIndex.nbytes` over its tokens after the inserts (what the service counts; "
        "the K/V it indexes take 4 x 2 x head_dim B in float32). Build and insert s: "
        "summed over heads and budgets (two builds per head), wall clock.",
        "",
    ]
    for context in (n for n in args.real if n):
        cases, _ = sel.real_cases(context, args.steps, 0)
        cases = [c for c in cases if c.layer >= sel.DENSE_LAYERS]
        results = {name: Variant() for name in VARIANTS}
        oracle = {}
        for case in cases:
            run_case(case, budgets, args.inserted, results, oracle)
        lines += table(f"Real keys, SmolLM2-135M, {context}", len(cases), results, oracle)
        del cases
        print("\n".join(lines), flush=True)
    if args.synthetic:
        cases = list(sel.synthetic_cases(args.synthetic, (2, 3, 4), (0, 1), 4, 0))
        results = {name: Variant() for name in VARIANTS}
        oracle = {}
        for case in cases:
            run_case(case, budgets, args.inserted, results, oracle)
        lines += table(f"Synthetic keys, {args.synthetic}", len(cases), results, oracle)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
