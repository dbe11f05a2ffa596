"""The documented accuracy run: every policy against full KV on the embedded model, resumable.

    .venv/bin/python bench/accuracy.py [--samples N] [--text-file F] [--max-minutes M]
    .venv/bin/python bench/accuracy.py --report-only   # rewrite the report from the journal

Cells (budgets 64/128/256, every policy): per-step fidelity at 2k/4k/8k, selection recall at
2k/8k/16k/32k (past the model's trained 8k with RoPE extrapolated: recall measures the index
on real keys, not the model's answers), pass key and NIAH (single, multi-key) at 2k/4k. It is
``icecache eval`` run over these cells; e.g. ``icecache eval --task fidelity --context-len
2048 --samples 2`` gives the same numbers for its cells.

One sample of every policy and budget costs minutes per cell here, so the run is resumable:
each finished sample is appended to ``bench/results/accuracy.jsonl`` (committed) and a rerun
skips what is there, growing every cell to ``--samples`` one round at a time (sample 0 of
every cell, then sample 1, ...), so a run stopped by ``--max-minutes`` leaves the cells even.
Dense prefills are kept in ``$ICECACHE_CACHE_DIR/prefills`` (float16) and replayed.
The report (``accuracy.md``, ``accuracy.json``, one PNG per corpus) is rewritten from the
whole journal after every run, with n per cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cache_service.types import POLICIES  # noqa: E402
from evaluation.capture import default_root  # noqa: E402
from evaluation.corpus import Corpus, default_text, read_text_file  # noqa: E402
from evaluation.journal import Journal  # noqa: E402
from evaluation.report import markdown_tables, plot  # noqa: E402
from evaluation.runner import EvalPlan, Resume, run_plan, summarize  # noqa: E402
from evaluation.session import SessionConfig  # noqa: E402
from evaluation.tasks import TaskOptions, make_task  # noqa: E402
from evaluation.types import Row, SampleRecord  # noqa: E402

log = logging.getLogger("bench.accuracy")

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (64, 128, 256)
RETRIEVAL = ("passkey", "niah")
TRAINED = 8192
"""The embedded model's trained context."""


@dataclass(frozen=True)
class Suite:
    task: str
    variants: tuple[str, ...]
    context_lens: tuple[int, ...]
    process: int = 0
    """Which of the two worker processes runs it (they take about as long)."""


SUITES = (
    Suite("fidelity", ("teacher-forced",), (2048, 4096, 8192)),
    Suite("recall", ("selection",), (2048, 8192, 16384, 32768)),
    Suite("passkey", ("single",), (2048, 4096), process=1),
    Suite("niah", ("single", "multikey"), (2048, 4096), process=1),
)
OPTIONAL = (
    Suite("ppl", ("teacher-forced",), (8192,)),
    Suite("agreement", ("greedy",), (8192,), process=1),
)
"""Run only when named in ``--tasks``: perplexity and greedy agreement say little about a
135M model (see the README), but stay reproducible."""

PRIMARY = {
    "fidelity": "KL(full||policy)",
    "recall": "attention mass recall",
    "passkey": "accuracy",
    "niah": "accuracy",
    "ppl": "perplexity",
    "agreement": "token agreement",
}
"""The measure each task's panel in the plot shows."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=1, help="grow every cell to N samples")
    p.add_argument("--steps", type=int, default=32, help="fidelity: true tokens fed per sample")
    p.add_argument("--probes", type=int, default=8, help="recall: decode steps probed")
    p.add_argument("--span", type=int, default=64, help="ppl: scored tokens per sample")
    p.add_argument("--gen-tokens", type=int, default=256, help="agreement: generated tokens")
    p.add_argument(
        "--tasks",
        default=",".join(s.task for s in SUITES),
        help=f"suites to run (also: {', '.join(s.task for s in OPTIONAL)})",
    )
    p.add_argument("--context-lens", help="subset of the suites' context lengths, e.g. 2048")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument(
        "--text-file",
        type=Path,
        help="corpus (default: Python's pydoc_data.topics); its file stem names it in the report",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="local HF checkpoint directory (default: embedded SmolLM2)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--prefill-cache", type=Path, default=None, help="default: $ICECACHE_CACHE_DIR")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new sample after this long (finished ones are kept)",
    )
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite the report")
    p.add_argument(
        "--jobs", type=int, choices=(1, 2), default=2, help="processes (suites split in two)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (decoding is dominated by per-step Python work)",
    )
    return p.parse_args(argv)


def corpus_name(args: argparse.Namespace) -> str:
    return "pydoc" if args.text_file is None else args.text_file.stem


def signature(args: argparse.Namespace, task: str) -> str:
    """What besides the cell and seed decides a sample's numbers."""
    option = {"fidelity": f"steps={args.steps}", "recall": f"probes={args.probes}"}
    option |= {"ppl": f"span={args.span}", "agreement": f"gen={args.gen_tokens}"}
    model = args.model or "smollm2-135m-instruct"
    return f"{corpus_name(args)}|{model}|dense=2|seed={args.seed}|{option.get(task, '')}"


def chosen_suites(args: argparse.Namespace) -> tuple[Suite, ...]:
    names = args.tasks.split(",")
    known = {s.task for s in SUITES + OPTIONAL}
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown suite {name!r}; choose from {', '.join(sorted(known))}")
    wanted = {int(n) for n in args.context_lens.split(",")} if args.context_lens else None
    out = []
    for suite in SUITES + OPTIONAL:
        if suite.task in names:
            lens = tuple(n for n in suite.context_lens if wanted is None or n in wanted)
            if lens:
                out.append(Suite(suite.task, suite.variants, lens, suite.process))
    return tuple(out)


def task_options(args: argparse.Namespace, samples: int) -> TaskOptions:
    return TaskOptions(samples, args.seed, args.span, args.gen_tokens, args.probes, args.steps)


def run_group(args: argparse.Namespace, suites: tuple[Suite, ...], threads: int) -> None:
    """One worker process: its own model, store and torch threads; samples go to the journal."""
    import torch

    from evaluation.command import open_session

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    config = SessionConfig(seed=args.seed, allow_extrapolation=True)
    cache = args.prefill_cache or default_root()
    session = open_session(args.model, "auto", config, cache)
    text = default_text() if args.text_file is None else read_text_file(args.text_file)
    corpus = Corpus(text, session.tokenizer)
    policies = tuple(dict.fromkeys(("full", *args.policies.split(","))))
    journal = Journal(args.out_dir / "accuracy.jsonl", {"commit": _commit()})
    for round_ in range(args.samples):  # sample 0 of every cell, then sample 1, ...
        for suite in suites:
            task = make_task(suite.task, corpus, task_options(args, round_ + 1))
            resume = Resume(journal, signature(args, suite.task))
            for n in suite.context_lens:
                if deadline is not None and time.monotonic() > deadline:
                    log.info("--max-minutes reached; stopping before %s %d", suite.task, n)
                    return
                started = time.perf_counter()
                run_plan(session, task, EvalPlan(suite.variants, (n,), policies, BUDGETS), resume)
                log.info(
                    "%s %d round %d: %.0f s", suite.task, n, round_, time.perf_counter() - started
                )


def run_all(args: argparse.Namespace) -> float:
    """The suites, split over two processes with ``--jobs 2`` (``Suite.process``)."""
    chosen = chosen_suites(args)
    groups = [g for g in (tuple(s for s in chosen if s.process == p) for p in (0, 1)) if g]
    started = time.perf_counter()
    if args.jobs == 1 or len(groups) == 1:
        for group in groups:
            run_group(args, group, args.threads)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
            for future in [pool.submit(run_group, args, g, args.threads) for g in groups]:
                future.result()
    return time.perf_counter() - started


# ---- the report, from the whole journal -------------------------------------------------------
class _NoText(Corpus):
    """The corpus of a task built only to aggregate finished samples (it draws no prompt)."""

    def __init__(self) -> None:
        self.text = ""


_NO_TEXT = _NoText()


def journal_rows(journal: Journal) -> dict[str, list[Row]]:
    """Summary rows per corpus, every cell the journal holds, with n per cell."""
    by_corpus: dict[str, list[Row]] = {}
    cells: dict[tuple[str, str, str, int], list[SampleRecord]] = {}
    for (sig, name, variant, n, _seed), record in journal.items():
        cells.setdefault((sig, name, variant, n), []).append(record)
    order = {s.task: i for i, s in enumerate(SUITES + OPTIONAL)}
    for (sig, task_name, variant, n), records in sorted(
        cells.items(), key=lambda kv: (kv[0][0].split("|")[0], order.get(kv[0][1], 99), kv[0][3])
    ):
        task = make_task(task_name, _NO_TEXT, TaskOptions())  # its measures read no text
        held = [{(o.policy, o.budget) for o in r.outcomes} for r in records]
        common = [(o.policy, o.budget) for o in records[0].outcomes]
        common = [pair for pair in common if all(pair in h for h in held)]
        trimmed = [_only(r, common) for r in records]
        corpus = sig.split("|")[0]
        by_corpus.setdefault(corpus, []).extend(summarize(task, variant, n, trimmed, common))
    return by_corpus


def _only(record: SampleRecord, pairs: list[tuple[str, int | None]]) -> SampleRecord:
    """``record`` with only the outcomes of ``pairs``, in that order."""
    by_pair = {(o.policy, o.budget): o for o in record.outcomes}
    return replace(record, outcomes=[by_pair[p] for p in pairs])


def _gap(row: Row) -> float:
    """How far a fidelity row is from full's (0 = identical)."""
    return 1.0 - row.score if row.higher_is_better else row.score


def fidelity_goals(rows: list[Row], policy: str = "icecache") -> list[str]:
    """``policy``'s gap to full within 1.25x oracle's, and below every non-oracle
    baseline's."""
    fid = [r for r in rows if r.task == "fidelity" and r.budget is not None]
    keys = sorted({(r.context_len, r.budget, r.measure) for r in fid})
    within, ahead, total = [], [], 0
    for n, budget, measure in keys:
        cell = {
            r.policy: r for r in fid if (r.context_len, r.budget, r.measure) == (n, budget, measure)
        }
        if policy not in cell or "oracle" not in cell:
            continue
        total += 1
        ours, oracle = _gap(cell[policy]), _gap(cell["oracle"])
        where = f"{measure} @{n} b{budget}"
        if ours > 1.25 * oracle + 1e-12:
            within.append(f"{where}: {policy} {ours:.3g} vs oracle {oracle:.3g}")
        for other in ("quest", "kmeans", "streaming"):
            if other in cell and _gap(cell[other]) <= ours:
                ahead.append(f"{where}: {other} {_gap(cell[other]):.3g} <= {policy} {ours:.3g}")
    if not total:
        return [
            f"- MISS: {policy}'s fidelity goals — not measured (no fidelity cells with "
            f"{policy} and oracle)"
        ]
    return [
        _line(f"{policy}'s fidelity gap ≤ 1.25× oracle's", within, total),
        _line(f"{policy}'s fidelity gap below quest's, kmeans' and streaming's", ahead, total),
    ]


def retrieval_goals(rows: list[Row]) -> list[str]:
    """The method's retrieval claim (≥ 99% of full at 256) and the index issue's pass key."""
    out = []
    acc = [r for r in rows if r.task in RETRIEVAL and r.measure == "accuracy"]
    ice = [r for r in acc if r.policy == "icecache" and r.budget == 256]
    misses = [
        f"{r.task}/{r.variant} @{r.context_len}: {_pct(r.ratio_to_full)} (n={r.samples})"
        for r in ice
        if r.ratio_to_full is None or r.ratio_to_full < 0.99
    ]
    out.append(_line("icecache@256 ≥ 99% of full on pass key and NIAH", misses, len(ice)))
    answered: dict[str, int] = {}
    for policy in ("oracle", "icecache", "icecache-r", "quest"):
        answered[policy] = sum(
            round(r.score * r.samples)
            for r in acc
            if r.task == "passkey" and r.policy == policy and r.budget == 256
        )
    n = sum(r.samples for r in acc if r.task == "passkey" and r.policy == "full")
    share = answered["icecache"] / answered["oracle"] if answered["oracle"] else float("nan")
    status = "PASS" if n >= 30 and share >= 0.97 else "MISS"
    out.append(
        f"- {status}: pass key (≥ 30 samples) icecache@256 answers ≥ 97% of what oracle answers"
        f" — {answered['icecache']} of oracle's {answered['oracle']} over {n} samples"
    )
    status = "PASS" if n >= 30 and answered["icecache-r"] >= answered["quest"] else "MISS"
    out.append(
        f"- {status}: pass key icecache-r@256 ≥ quest — {answered['icecache-r']} vs "
        f"{answered['quest']} over {n} samples"
    )
    return out


def recall_goals(rows: list[Row], policy: str = "icecache") -> list[str]:
    """``policy``'s recall at budget 256 ≥ 0.97× oracle on real keys at 8k, 16k and 32k."""
    rec = [r for r in rows if r.task == "recall" and r.measure == "attention mass recall"]
    misses, total = [], 0
    for n in sorted({r.context_len for r in rec if r.context_len >= 8192}):
        cell = {r.policy: r for r in rec if r.context_len == n and r.budget == 256}
        if policy in cell and "oracle" in cell:
            total += 1
            ratio = cell[policy].score / cell["oracle"].score
            if ratio < 0.97:
                misses.append(f"@{n}: {ratio:.3f}× oracle")
    name = f"{policy} recall@256 ≥ 0.97× oracle on real keys at 8k/16k/32k"
    return [_line(name, misses, total)]


def _line(name: str, misses: list[str], total: int) -> str:
    if not total:
        return f"- MISS: {name} — not measured"
    if misses:
        return f"- MISS: {name} — {len(misses)} of {total} cells: " + "; ".join(misses)
    return f"- PASS: {name} — all {total} cells"


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{100 * ratio:.1f}%"


def _commit() -> str:
    """The checkout's commit (with ``+dirty`` if code has uncommitted changes; the results
    this bench itself rewrites do not count)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return head + ("+dirty" if changed else "")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def counts(journal: Journal) -> str:
    """A table of n per (corpus, task, variant, context length)."""
    cells: dict[tuple[str, str, str, int], int] = {}
    for (sig, task, variant, n, _), _record in journal.items():
        key = (sig.split("|")[0], task, variant, n)
        cells[key] = cells.get(key, 0) + 1
    commits: dict[tuple[str, str, str, int], set[str]] = {}
    for sample, _record in journal.items():
        cell = (sample[0].split("|")[0], sample[1], sample[2], sample[3])
        commits.setdefault(cell, set()).add(str(journal.meta_of(sample).get("commit", "?")))
    lines = [
        "| corpus | task | variant | context | samples | run on commit |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {t} | {v} | {n} | {k} | {', '.join(sorted(commits[(c, t, v, n)]))} |"
        for (c, t, v, n), k in sorted(cells.items())
    ]
    return "\n".join(lines)


def markdown(by_corpus: dict[str, list[Row]], journal: Journal, seconds: float | None) -> str:
    machine = f"{platform.machine()}, {_cpus()} cores, no GPU"
    ran = "" if seconds is None else f" The last run took {seconds / 60:.0f} min."
    head = f"""# Accuracy: policies against full KV

Produced by `.venv/bin/python bench/accuracy.py` (resumable: every finished sample is in
`accuracy.jsonl`; a rerun with a larger `--samples` grows every cell) on {machine}.{ran}

- Model: embedded SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, **trained to
  {TRAINED} positions**), float32, 2 dense layers. Recall at 16k and 32k runs with RoPE
  extrapolated past that (`--allow-extrapolation`): it measures the index on the model's real
  keys; the model's answers there would not be trustworthy, so no task past 8k scores them.
- Corpora: `pydoc` (Python's `pydoc_data.topics`) and `shakespeare`
  (`bench/data/shakespeare.txt`, via `--text-file`).
- Fidelity: after a dense prefill, 32 true tokens fed one by one under each policy and under
  full; top-1 agreement with full's argmax, KL(full‖policy) and relative L2 of the final
  normed hidden state, means over samples with 95% bootstrap intervals (with n = 1 the
  interval is the point). Recall: 8 decode steps probed; share of the exact softmax mass on
  the selected tokens, and top-k hit rate (k = budget). Pass key / NIAH: accuracy and
  conditional accuracy with Wilson 95% intervals, and the paired exact McNemar test
  against oracle.
- Prefill K/V are replayed from float16 captures, so every policy, full included, decodes
  over the same rounded K/V.

## Samples per cell

{counts(journal)}

## Goals
"""
    out = [head]
    for corpus, rows in by_corpus.items():
        out.append(f"\n### {corpus}\n")
        for policy in ("icecache", "icecache-tokens"):
            out += fidelity_goals(rows, policy) + recall_goals(rows, policy)
        out += retrieval_goals(rows)
    for corpus, rows in by_corpus.items():
        out.append(f"\n## Results: {corpus}\n\n![{corpus}](accuracy-{corpus}.png)\n")
        out.append(markdown_tables(rows))
    return "\n".join(out) + "\n"


def write_report(args: argparse.Namespace, seconds: float | None) -> None:
    journal = Journal(args.out_dir / "accuracy.jsonl")
    by_corpus = journal_rows(journal)
    (args.out_dir / "accuracy.md").write_text(
        markdown(by_corpus, journal, seconds), encoding="utf-8"
    )
    summary = {c: [asdict(r) for r in rows] for c, rows in by_corpus.items()}
    doc = {"seconds_last_run": seconds, "summary": summary}
    (args.out_dir / "accuracy.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    for old in args.out_dir.glob("accuracy*.png"):
        old.unlink()
    for corpus, rows in by_corpus.items():
        primary = [r for r in rows if PRIMARY.get(r.task) == r.measure]
        if primary:
            plot(args.out_dir / f"accuracy-{corpus}.png", primary)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    seconds = None if args.report_only else run_all(args)
    write_report(args, seconds)
    print((args.out_dir / "accuracy.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
