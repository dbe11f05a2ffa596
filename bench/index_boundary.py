"""What sharing an index costs in fidelity: built over the prompt's whole blocks, or over it all.

Writes ``bench/results/index_boundary.md``. A worker builds an indexed policy's index over
the tokens of the prompt's whole prefill blocks and inserts the tokens after them, so that
every prompt on the same blocks has the same index and can start from a kept copy (prefix
reuse, ``Store._flush``); the offline eval builds over the whole prompt. On the same samples
(the eval's ``fidelity`` task: ``--context-len`` corpus tokens prefilled, then ``--steps``
true tokens fed one by one), both builds run after one ``full`` reference, and the paired
differences of the eval's measures (top-1 agreement with ``full``, KL(full || policy),
relative L2 of the final hidden state) are reported with 95% bootstrap intervals over
samples.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.index_boundary [--context-len 2048,4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from evaluation.command import int_list
from evaluation.corpus import Corpus, default_text, read_text_file
from evaluation.session import Session, SessionConfig
from evaluation.stats import bootstrap_mean
from evaluation.tasks.base import TaskOptions
from evaluation.tasks.fidelity import FidelityTask, compare_steps
from evaluation.types import FidelityDetail

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "index_boundary.md"
MEASURES = (("top-1 agreement", "top1", True), ("KL(full ‖ policy)", "kl", False),
            ("hidden rel. L2", "l2", False))  # fmt: skip
BUILDS = {"whole prompt": False, "whole blocks": True}
"""Name -> ``SessionConfig.index_blocks``."""


def run(args: argparse.Namespace, session: Session) -> dict[int, list[dict[str, FidelityDetail]]]:
    """Per context length, per sample: the policy's fidelity under each build."""
    text = default_text() if args.text_file is None else read_text_file(args.text_file)
    options = TaskOptions(samples=args.samples, seed=args.seed, steps=args.steps)
    task = FidelityTask(Corpus(text, session.tokenizer), options)
    config = session.config
    out: dict[int, list[dict[str, FidelityDetail]]] = {}
    for length in args.context_len:
        full = session.engine("full", None, length + args.steps)
        engine = session.engine(args.policy, args.budget, length + args.steps)
        rows = []
        for prompt in task.prompts("teacher-forced", length):
            ids = list(prompt.ids)
            reference = session.teacher_forced_steps(full, ids, prompt.scored_from)
            row = {}
            for name, blocks in BUILDS.items():
                session.config = dataclasses.replace(config, index_blocks=blocks)
                steps = session.teacher_forced_steps(engine, ids, prompt.scored_from)
                row[name] = compare_steps(reference, steps)
            session.config = config
            session.forget()
            rows.append(row)
            print(f"{length} seed {prompt.seed}: " + ", ".join(
                f"{name} top1 {d.top1:.3f} kl {d.kl:.4f} l2 {d.l2:.4f}" for name, d in row.items()
            ), flush=True)  # fmt: skip
        out[length] = rows
    return out


def report(args: argparse.Namespace, results: dict[int, list[dict[str, FidelityDetail]]]) -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    corpus = "Python's docs (`pydoc_data`)" if args.text_file is None else f"`{args.text_file}`"
    lines = [
        "# The index built over the prompt's whole blocks against over all of it",
        "",
        f"Command: `{args.command}`; {platform.machine()}, {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={threads}; the embedded SmolLM2-135M, CPU; written "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"`{args.policy}` at budget {args.budget}, {corpus}, {args.samples} samples per "
        f"length, {args.steps} teacher-forced steps each (the eval's `fidelity` task). "
        "**whole prompt**: the index built over every prefilled token that left the recent "
        "window (the offline eval's default). **whole blocks**: built over the tokens of the "
        "prompt's whole 256-token prefill blocks, the later ones inserted: what a worker "
        "does, so that prompts on the same blocks share one kept index (prefix reuse). "
        "Difference = whole blocks − whole prompt, per sample, mean with a 95% bootstrap "
        "interval over samples.",
        "",
        "| context | measure | whole prompt | whole blocks | difference [95% CI] | "
        "blocks worse in |",
        "|---|---|---|---|---|---|",
    ]
    for length, rows in results.items():
        for label, attr, higher in MEASURES:
            a = np.array([getattr(r["whole prompt"], attr) for r in rows])
            b = np.array([getattr(r["whole blocks"], attr) for r in rows])
            diff = b - a
            ci = bootstrap_mean(diff.tolist())
            worse = int(np.sum(diff < 0)) if higher else int(np.sum(diff > 0))
            lines.append(
                f"| {length} | {label} | {a.mean():.4f} | {b.mean():.4f} | "
                f"{diff.mean():+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] | {worse} of {len(rows)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context-len", type=int_list, default=(2048, 4096))
    parser.add_argument("--policy", default="icecache")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-file")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.command = "python -m bench.index_boundary " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    from worker.factory import LoadConfig, load, open_local

    model, tokenizer = load(LoadConfig())
    session = Session(model, tokenizer, open_local(model), SessionConfig(seed=args.seed))
    results = run(args, session)
    args.out.write_text(report(args, results))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
