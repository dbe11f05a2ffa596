"""``icecache eval``: accuracy of every policy against ``full`` on identical inputs.

    icecache eval --task TASK --context-len N[,N...] --budget B[,B...] --policy P[,P...]
        [--variant V[,V...]] [--samples K] [--seed S] [--text-file F] [--json OUT]
        [--plot OUT.png] [--model PATH] [--data-dir DIR --datasets a,b] [--steps N]
        [--prefill-cache [DIR]] [--allow-extrapolation]

``register(subparsers)`` adds the subcommand to ``worker.cli``'s parser.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_service import settings
from cache_service.types import POLICIES, check_policy
from evaluation.capture import PrefillStore, default_root, model_digest
from evaluation.corpus import Corpus, default_text, read_text_file
from evaluation.report import plot, text_table, write_json
from evaluation.runner import EvalPlan, EvalResult, run_plan
from evaluation.session import Session, SessionConfig
from evaluation.tasks import TASKS, Task, TaskOptions, make_task
from worker.factory import LoadConfig

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (64, 128, 256)


def int_list(text: str) -> tuple[int, ...]:
    """``"2048,4096"`` -> ``(2048, 4096)``; positive integers only."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    parser.add_argument(
        "--variant",
        type=name_list,
        default=(),
        help="task variants, comma-separated (niah: single,multikey,multivalue)",
    )
    parser.add_argument(
        "--context-len",
        type=int_list,
        required=True,
        help="context lengths in tokens, comma-separated",
    )
    parser.add_argument(
        "--budget",
        type=int_list,
        default=DEFAULT_BUDGETS,
        help="token budgets, comma-separated (default 64,128,256)",
    )
    parser.add_argument(
        "--policy",
        type=name_list,
        default=tuple(POLICIES),
        help="policies, comma-separated; full always runs (default: all)",
    )
    parser.add_argument("--samples", type=int, default=4, help="samples per cell")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the samples and of the clustering"
    )
    parser.add_argument("--text-file", help="UTF-8 text replacing the default corpus")
    parser.add_argument("--json", dest="json_out", help="write the results here")
    parser.add_argument("--plot", dest="plot_out", help="draw score against budget here (.png)")
    settings.add_arguments(parser, LoadConfig)
    settings.add_arguments(parser, SessionConfig, skip=("seed",))  # --seed: samples' too
    parser.add_argument("--span", type=int, default=256, help="ppl: scored tokens per sample")
    parser.add_argument(
        "--gen-tokens", type=int, default=256, help="agreement: greedy tokens per sample"
    )
    parser.add_argument("--probes", type=int, default=16, help="recall: decode steps probed")
    parser.add_argument(
        "--steps",
        type=int,
        default=64,
        help="fidelity: true tokens fed one by one after the prefill (default 64)",
    )
    parser.add_argument(
        "--prefill-cache",
        nargs="?",
        type=Path,
        const=default_root(),
        help="keep dense prefills on disk (float16) and replay them in later runs "
        "(default DIR: $ICECACHE_CACHE_DIR/prefills)",
    )
    parser.add_argument("--data-dir", type=Path, help="longbench: directory of JSONL files")
    parser.add_argument(
        "--datasets",
        type=name_list,
        default=(),
        help="longbench: datasets, comma-separated (default: all in --data-dir)",
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``icecache``'s subparsers."""
    parser = subparsers.add_parser(
        "eval",
        help="accuracy of the policies against full KV",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_args(parser)
    parser.set_defaults(func=run_command)
    return parser


@dataclass(frozen=True)
class EvalArgs:
    """The validated command line."""

    task: str
    plan: EvalPlan
    options: TaskOptions
    text_file: str | None
    data_dir: Path | None
    datasets: tuple[str, ...]


def validate(args: argparse.Namespace) -> EvalArgs:
    """Checks that need no model; ``ValueError`` naming the problem."""
    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    for policy in args.policy:
        check_policy(policy)
    if args.samples <= 0:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    text = None
    if args.text_file is not None:
        read_text_file(args.text_file)  # fail before loading the model
        text = args.text_file
    if args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    options = TaskOptions(
        args.samples, args.seed, args.span, args.gen_tokens, args.probes, args.steps
    )
    policies = tuple(dict.fromkeys(("full", *args.policy)))
    plan = EvalPlan(tuple(args.variant), tuple(args.context_len), policies, tuple(args.budget))
    return EvalArgs(args.task, plan, options, text, args.data_dir, tuple(args.datasets))


def open_session(
    model_path: str | None,
    device: str,
    config: SessionConfig,
    prefill_cache: Path | None = None,
) -> Session:
    """Load the model once and open the in-process store (and the prefill captures under
    ``prefill_cache``, if given)."""
    from worker.factory import LoadConfig, load, open_local

    model, tokenizer = load(LoadConfig(model_path, device))
    session = Session(model, tokenizer, open_local(model), config)
    if prefill_cache is not None:
        session.prefills = PrefillStore(prefill_cache, model_digest(model, model.config))
    return session


def extrapolation_note(session: Session, context_lens: tuple[int, ...]) -> str | None:
    """What a run past the trained context must say about itself (``None`` if it is not)."""
    trained = session.trained_positions
    past = [n for n in context_lens if n >= trained]
    if not past:
        return None
    return (
        f"NOTE: the model was trained to {trained} positions; the contexts "
        f"{', '.join(map(str, past))} run with RoPE extrapolated past them "
        "(--allow-extrapolation). Selection recall there measures the index on real keys; "
        "the model's own answers are not trustworthy."
    )


def build_task(session: Session, parsed: EvalArgs) -> Task:
    text = default_text() if parsed.text_file is None else read_text_file(parsed.text_file)
    corpus = Corpus(text, session.tokenizer)
    datasets = list(parsed.datasets) or None
    return make_task(parsed.task, corpus, parsed.options, parsed.data_dir, datasets)


def evaluate(session: Session, parsed: EvalArgs) -> EvalResult:
    """Run the validated command line on an open session."""
    task = build_task(session, parsed)
    plan = parsed.plan
    if not plan.variants:
        plan = EvalPlan(task.variants, plan.context_lens, plan.policies, plan.budgets)
    return run_plan(session, task, plan)


def run_command(args: argparse.Namespace) -> int:
    """``icecache eval``: run, print the table, write the JSON and the plot."""
    parsed = validate(args)
    session_config = SessionConfig(
        args.dense_layers, args.seed, args.allow_extrapolation, args.index_blocks
    )
    session = open_session(args.model, args.device, session_config, args.prefill_cache)
    note = extrapolation_note(session, parsed.plan.context_lens)
    if note:
        print(note, flush=True)
    result = evaluate(session, parsed)
    if note:
        print(note)
    print(text_table(result.rows))
    config = run_config(args)
    if note:
        config["note"] = note
    if args.json_out:
        write_json(args.json_out, result, config)
    if args.plot_out:
        plot(args.plot_out, result.rows)
    return 0


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as JSON-friendly values, for the results file."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key == "func":
            continue
        out[key] = (
            list(value)
            if isinstance(value, tuple)
            else (str(value) if isinstance(value, Path) else value)
        )
    return out
