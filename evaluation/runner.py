"""Runs a task's cells: every sample under ``full`` first, then each (policy, budget)."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from cache_service.types import SequenceSpec, check_policy
from evaluation.journal import Journal
from evaluation.metrics import ratio_to_full
from evaluation.session import Session
from evaluation.tasks import Task
from evaluation.types import Measure, Outcome, Row, SampleRecord

log = logging.getLogger(__name__)

Key = tuple[str, int | None]


@dataclass(frozen=True)
class EvalPlan:
    """Which cells to run: variants x context lengths, each under every (policy, budget)."""

    variants: tuple[str, ...]
    context_lens: tuple[int, ...]
    policies: tuple[str, ...]
    """Policies compared with ``full`` (``full`` itself always runs and need not be listed)."""
    budgets: tuple[int, ...]

    def pairs(self) -> list[Key]:
        """``full`` then every other policy at every budget."""
        others = [p for p in self.policies if p != "full"]
        return [("full", None)] + [(p, b) for p in others for b in self.budgets]


@dataclass
class EvalResult:
    """Summary rows and every sample of a run."""

    rows: list[Row] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)
    seconds: float = 0.0

    def extend(self, other: EvalResult) -> None:
        self.rows += other.rows
        self.samples += other.samples
        self.seconds += other.seconds


def check_plan(task: Task, plan: EvalPlan, max_positions: int, page_size: int) -> None:
    """Raise ``ValueError`` naming the first bad variant, policy, length or budget."""
    for variant in plan.variants:
        if variant not in task.variants:
            raise ValueError(
                f"task {task.name} has no variant {variant!r}; choose from "
                f"{', '.join(task.variants)}"
            )
    for policy in plan.policies:
        check_policy(policy)
    for n in plan.context_lens:
        need = n + max(task.extra_tokens(v) for v in plan.variants)
        if need > max_positions:
            raise ValueError(
                f"--context-len {n} needs {need} positions with the generated tokens, but the "
                f"model supports {max_positions}; lower it (or, to measure recall or "
                "fidelity past the trained context, pass --allow-extrapolation)"
            )
    for budget in plan.budgets:
        _check_budget(budget, min(plan.context_lens), page_size)


def _check_budget(budget: int, context_len: int, page_size: int) -> None:
    spec = SequenceSpec(1, 1, 1, 1, policy="streaming", budget=budget)
    try:
        spec.validate(page_size)
    except ValueError as err:
        raise ValueError(f"--budget {budget} is out of range: {err}") from None
    if budget >= context_len:
        raise ValueError(
            f"--budget {budget} is out of range: it is not below the context length "
            f"{context_len}, so every policy would attend to everything"
        )


@dataclass(frozen=True)
class Resume:
    """Where finished samples are kept (and found again) and under what signature."""

    journal: Journal
    signature: str
    """What besides the cell and seed decides a sample's numbers (corpus, options, model)."""


def run_plan(
    session: Session, task: Task, plan: EvalPlan, resume: Resume | None = None
) -> EvalResult:
    """Every cell of ``plan``; ``full`` runs once per sample, as the reference. With
    ``resume``, samples already in its journal are read back instead of run, and each new
    one is appended to it as soon as it finishes."""
    check_plan(task, plan, session.max_positions, session.kv.page_size)
    result = EvalResult()
    started = time.perf_counter()
    for n in plan.context_lens:
        for variant in plan.variants:
            cell = run_cell(session, task, plan, variant, n, resume)
            result.samples += cell
            result.rows += summarize(task, variant, n, cell, plan.pairs())
    result.seconds = time.perf_counter() - started
    return result


def run_cell(
    session: Session,
    task: Task,
    plan: EvalPlan,
    variant: str,
    context_len: int,
    resume: Resume | None = None,
) -> list[SampleRecord]:
    """All samples of one (variant, context length) under every (policy, budget)."""
    prompts = task.prompts(variant, context_len)
    pairs = plan.pairs()
    bar = tqdm(
        total=len(prompts) * len(pairs),
        desc=f"{task.name} {variant} {context_len}",
        unit="run",
        disable=not sys.stderr.isatty(),
    )
    records = []
    max_len = max(len(p.ids) + p.max_new_tokens + 1 for p in prompts)
    for prompt in prompts:
        kept: dict[Key, Outcome] = {}
        if resume is not None:
            key = (resume.signature, task.name, variant, context_len, prompt.seed)
            done = resume.journal.get(*key, pairs)
            if done is not None:
                records.append(done)
                bar.update(len(pairs))
                continue
            kept = resume.journal.outcomes(*key)
        outcomes: list[Outcome] = []
        for policy, budget in pairs:
            # A sample finished under fewer pairs (a policy added or dropped to be run
            # again) runs only the rest, and full, the reference of the others.
            if (policy, budget) in kept and outcomes:
                outcomes.append(kept[(policy, budget)])
            else:
                engine = session.engine(policy, budget, max_len)
                reference = outcomes[0] if outcomes else None
                outcomes.append(task.run(session, engine, prompt, reference))
                bar.set_postfix_str(f"{policy}@{budget or 'all'}")
            bar.update()
        session.forget()
        record = SampleRecord(
            task.name,
            variant,
            context_len,
            prompt.seed,
            prompt.index,
            prompt.description,
            len(prompt.ids),
            prompt.answers,
            outcomes,
        )
        records.append(record)
        if resume is not None:
            resume.journal.add(resume.signature, record)
        log.info(
            "%s %s %d sample %d: %s",
            task.name,
            variant,
            context_len,
            prompt.index,
            ", ".join(f"{o.policy}@{o.budget or 'all'}={o.score:.3g}" for o in outcomes),
        )
    bar.close()
    return records


def summarize(
    task: Task, variant: str, context_len: int, records: list[SampleRecord], pairs: list[Key]
) -> list[Row]:
    """One row per (measure, policy, budget), each against ``full``'s value.

    A task's ``compared`` measures (paired with full's and oracle's outcomes on the same
    samples) follow its own; a measure full does not have gets no ratio.
    """
    by_key: dict[Key, list[Outcome]] = {key: [] for key in pairs}
    for record in records:
        for outcome in record.outcomes:
            by_key[(outcome.policy, outcome.budget)].append(outcome)
    full = {m.name: m for m in _measures(task, ("full", None), by_key)}
    rows = []
    for key, outcomes in by_key.items():
        for measure in _measures(task, key, by_key):
            ref = full.get(measure.name)
            rows.append(
                Row(
                    task.name,
                    variant,
                    measure.name,
                    key[0],
                    key[1],
                    context_len,
                    measure.value,
                    None if ref is None else _ratio(measure, ref),
                    len(outcomes) if measure.samples is None else measure.samples,
                    measure.higher_is_better,
                    measure.interval,
                    measure.paired,
                )
            )
    return rows


def _measures(task: Task, key: Key, by_key: dict[Key, list[Outcome]]) -> list[Measure]:
    policy, budget = key
    oracle = None if policy in ("full", "oracle") else by_key.get(("oracle", budget))
    outcomes = by_key[key]
    return task.measures(outcomes) + task.compared(outcomes, by_key[("full", None)], oracle)


def _ratio(measure: Measure, ref: Measure) -> float | None:
    if not measure.ratio or math.isnan(measure.value) or math.isnan(ref.value):
        return None
    return ratio_to_full(measure.value, ref.value, measure.higher_is_better)
