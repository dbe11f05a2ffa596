"""The documented accuracy run: every policy against full KV on the embedded model.

    .venv/bin/python bench/accuracy.py            # writes bench/results/accuracy.{md,png,json}

Covers pass key and NIAH (single, multi-key, multi-value) at 2k and 4k tokens, teacher-forced
perplexity and greedy agreement at 8k, budgets 64/128/256 and every policy, in one process
(one model load, one store, full run once per input). It is ``icecache eval`` run over these
cells; the same numbers come from, e.g.,
``icecache eval --task niah --context-len 2048,4096 --samples 2``.
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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cache_service.types import POLICIES  # noqa: E402
from worker.eval.corpus import Corpus, default_text  # noqa: E402
from worker.eval.report import markdown_tables, plot, text_table, write_json  # noqa: E402
from worker.eval.runner import EvalPlan, EvalResult, run_plan  # noqa: E402
from worker.eval.session import Session, SessionConfig  # noqa: E402
from worker.eval.tasks import TaskOptions, make_task  # noqa: E402
from worker.eval.types import Interval, PairedTest, Row  # noqa: E402

log = logging.getLogger("bench.accuracy")

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (64, 128, 256)
RETRIEVAL = ("passkey", "niah")


@dataclass(frozen=True)
class Suite:
    task: str
    variants: tuple[str, ...]
    context_lens: tuple[int, ...]
    fidelity: bool = False
    """Samples come from ``--fidelity-samples`` (else ``--retrieval-samples``)."""
    process: int = 0
    """Which of the two worker processes runs it (they take about as long)."""


SUITES = (
    Suite("passkey", ("single",), (2048, 4096)),
    Suite("niah", ("single", "multikey", "multivalue"), (2048, 4096)),
    Suite("ppl", ("teacher-forced",), (8192,), fidelity=True),
    Suite("agreement", ("greedy",), (8192,), fidelity=True, process=1),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--retrieval-samples", type=int, default=1, help="samples per retrieval cell")
    p.add_argument("--fidelity-samples", type=int, default=1, help="samples per ppl/agreement cell")
    p.add_argument("--span", type=int, default=64, help="ppl: scored tokens per sample")
    p.add_argument("--gen-tokens", type=int, default=256, help="agreement: generated tokens")
    p.add_argument("--tasks", default=",".join(s.task for s in SUITES), help="subset of suites")
    p.add_argument(
        "--context-lens", help="subset of the suites' context lengths, e.g. 2048 (default: all)"
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="run nothing: write one result from the accuracy.json of several partial runs",
    )
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="local HF checkpoint directory (default: embedded SmolLM2)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        default=2,
        help="processes: agreement beside the other suites",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace, session: Session, suites: tuple[Suite, ...]) -> EvalResult:
    corpus = Corpus(default_text(), session.tokenizer)
    policies = tuple(dict.fromkeys(("full", *args.policies.split(","))))
    result = EvalResult()
    wanted = {int(n) for n in args.context_lens.split(",")} if args.context_lens else None
    for suite in suites:
        lens = tuple(n for n in suite.context_lens if wanted is None or n in wanted)
        if not lens:
            continue
        samples = args.fidelity_samples if suite.fidelity else args.retrieval_samples
        options = TaskOptions(samples, args.seed, args.span, args.gen_tokens)
        task = make_task(suite.task, corpus, options)
        plan = EvalPlan(suite.variants, lens, policies, BUDGETS)
        started = time.perf_counter()
        result.extend(run_plan(session, task, plan))
        log.info("%s done in %.0f s", suite.task, time.perf_counter() - started)
    return result


def run_group(args: argparse.Namespace, suites: tuple[Suite, ...], threads: int) -> EvalResult:
    """One worker process: its own model, store and torch threads."""
    import torch

    from worker.eval.command import open_session

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    session = open_session(args.model, "auto", SessionConfig(seed=args.seed))
    return run(args, session, suites)


def run_all(args: argparse.Namespace) -> EvalResult:
    """The suites, split over two processes with ``--jobs 2`` (``Suite.process``).

    Decoding is dominated by per-step Python work, so two single-threaded processes finish
    the run sooner on two cores than one process with two torch threads.
    """
    chosen = tuple(s for s in SUITES if s.task in args.tasks.split(","))
    groups = [g for g in (tuple(s for s in chosen if s.process == p) for p in (0, 1)) if g]
    started = time.perf_counter()
    result = EvalResult()
    if args.jobs == 1 or len(groups) == 1:
        for group in groups:
            result.extend(run_group(args, group, max(1, _cpus())))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
            futures = [pool.submit(run_group, args, g, 1) for g in groups]
            for future in futures:
                result.extend(future.result())
    result.seconds = time.perf_counter() - started
    return result


def _ratio(rows: list[Row], task: str, policy: str, budget: int) -> list[Row]:
    return [r for r in rows if r.task == task and r.policy == policy and r.budget == budget]


def goals(rows: list[Row]) -> list[str]:
    """The issue's goals, each PASS or MISS with its numbers."""
    out = []

    def check(name: str, cells: list[Row], floor: float) -> None:
        misses = [r for r in cells if r.ratio_to_full is None or r.ratio_to_full < floor]
        shown = "; ".join(f"{_cell(r)} {_pct(r.ratio_to_full)}" for r in cells) or (
            "not measured (no icecache rows in this run)"
        )
        out.append(f"- {'PASS' if cells and not misses else 'MISS'}: {name} — {shown}")

    retrieval = [
        r
        for r in rows
        if r.task in RETRIEVAL and r.policy == "icecache" and r.measure == "accuracy"
    ]
    check(
        "icecache@256 ≥ 99% of full on retrieval", [r for r in retrieval if r.budget == 256], 0.99
    )
    check(
        "icecache@256 perplexity at most 2% above full's",
        _ratio(rows, "ppl", "icecache", 256),
        1 / 1.02,
    )
    check(
        "icecache@64 ≥ 97% of full (retrieval and perplexity)",
        [r for r in retrieval if r.budget == 64] + _ratio(rows, "ppl", "icecache", 64),
        0.97,
    )
    out += _ahead(rows)
    return out


def _ahead(rows: list[Row]) -> list[str]:
    """icecache against every non-oracle policy at equal budget, cell by cell."""
    behind = []
    cells = 0
    for r in rows:
        if r.policy != "icecache" or r.ratio_to_full is None:
            continue
        for other in rows:
            same = (other.task, other.variant, other.measure, other.context_len, other.budget)
            if same != (r.task, r.variant, r.measure, r.context_len, r.budget):
                continue
            if other.policy in ("icecache", "full", "oracle"):
                continue
            cells += 1
            if other.ratio_to_full is not None and other.ratio_to_full > r.ratio_to_full:
                behind.append(
                    f"{_cell(r)} {other.policy} {_pct(other.ratio_to_full)} > "
                    f"icecache {_pct(r.ratio_to_full)}"
                )
    status = "PASS" if cells and not behind else "MISS"
    detail = "; ".join(behind) if behind else f"ahead or tied in all {cells} comparisons"
    return [f"- {status}: icecache ahead of every non-oracle policy at equal budget — {detail}"]


def _cell(r: Row) -> str:
    return f"{r.task}/{r.variant} {r.measure} @{r.context_len} b{r.budget}"


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{100 * ratio:.1f}%"


def markdown(args: argparse.Namespace, result: EvalResult) -> str:
    minutes, machine = f"{result.seconds / 60:.0f} min", f"{platform.machine()}, {_cpus()} cores"
    if args.merge:
        parts = ", ".join(f"`{p}`" for p in args.merge)
        produced = (
            f"Merged by `.venv/bin/python bench/accuracy.py --merge` from partial runs ({parts};\n"
            "each run's `--tasks`/`--context-lens` are in `accuracy.json`'s `parts`), "
            f"{minutes}\nof wall in all on {machine}, no GPU."
        )
    else:
        produced = (
            f"Produced by `.venv/bin/python bench/accuracy.py` ({minutes} wall on {machine},\n"
            f"no GPU, suites split over {args.jobs} process(es); sample counts are sized to fit\n"
            "about 40 minutes there)."
        )
    head = f"""# Accuracy: policies against full KV

{produced}

- Model: embedded SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, 8k context),
  float32, 2 dense layers. Corpus: Python's `pydoc_data.topics`.
- Samples per cell: {args.retrieval_samples} for pass key / NIAH (needle depths spread
  evenly), {args.fidelity_samples} for perplexity / agreement.
- Perplexity scores the last {args.span} tokens of each 8k window, each decoded with the
  policy's sparse attention; agreement generates {args.gen_tokens} greedy tokens.
- Each cell: score (ratio to full; 1.0 = as good as full; where full itself scores 0, a
  policy that also scores 0 shows 100%, which says nothing). Every number of every sample
  is in `accuracy.json`.

## Goals

"""
    goal_lines = "\n".join(goals(result.rows))
    return f"{head}{goal_lines}\n\n## Results\n\n{markdown_tables(result.rows)}"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def merge(parts: list[Path], out_dir: Path) -> EvalResult:
    """Join partial runs (``--tasks``/``--context-lens`` subsets) into ``out_dir``'s files.

    Rows are read back from each part's ``accuracy.json``; the samples are copied as they
    are, with each part's config, into the merged ``accuracy.json``.
    """
    loaded = [json.loads((part / "accuracy.json").read_text()) for part in parts]
    result = EvalResult(seconds=sum(d["seconds"] for d in loaded))
    result.rows = [_row(r) for d in loaded for r in d["summary"]]
    merged = {
        "parts": [
            {"dir": str(part), "config": data["config"]}
            for part, data in zip(parts, loaded, strict=True)
        ],
        "seconds": result.seconds,
        "summary": [r for d in loaded for r in d["summary"]],
        "samples": [s for d in loaded for s in d["samples"]],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "accuracy.json").write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    return result


def _row(data: dict) -> Row:
    interval = data.pop("interval", None)
    paired = data.pop("paired", None)
    return Row(
        **data,
        interval=Interval(**interval) if interval else None,
        paired=PairedTest(**paired) if paired else None,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.merge:
        result = merge(args.merge, args.out_dir)
    else:
        result = run_all(args)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            args.out_dir / "accuracy.json",
            result,
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        )
    (args.out_dir / "accuracy.md").write_text(markdown(args, result), encoding="utf-8")
    plot(args.out_dir / "accuracy.png", result.rows)
    print(text_table(result.rows))
    print("\n".join(goals(result.rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
