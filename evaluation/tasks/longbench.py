"""LongBench on user-provided data: official prompts, truncation, lengths and metrics."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evaluation.corpus import Corpus
from evaluation.longbench import (
    MAX_NEW_TOKENS,
    LongBenchSample,
    available_datasets,
    base_dataset,
    prompt_ids,
    read_dataset,
)
from evaluation.longbench_metrics import score_prediction
from evaluation.tasks.base import Task, TaskOptions
from evaluation.types import AnswerDetail, Measure, Outcome, Prompt

if TYPE_CHECKING:
    from evaluation.session import Session
    from worker.engine import Engine


class LongBenchTask(Task):
    """One variant per dataset; the score is LongBench's (100 x mean of the best metric)."""

    name = "longbench"

    def __init__(
        self, corpus: Corpus, options: TaskOptions, data_dir: Path, datasets: list[str] | None
    ) -> None:
        super().__init__(corpus, options)
        self.data_dir = data_dir
        names = datasets or available_datasets(data_dir)
        for name in names:
            base_dataset(name)
        self.variants = tuple(names)  # type: ignore[misc]

    def prompts(self, variant: str, context_len: int) -> list[Prompt]:
        samples = read_dataset(self.data_dir, variant)
        if self.options.samples < len(samples):
            rng = np.random.default_rng(self.options.seed)
            keep = sorted(rng.choice(len(samples), self.options.samples, replace=False))
            samples = [samples[i] for i in keep]
        return [self._prompt(i, s, context_len) for i, s in enumerate(samples)]

    def _prompt(self, index: int, sample: LongBenchSample, context_len: int) -> Prompt:
        tok = self.corpus.tokenizer
        dataset = base_dataset(sample.dataset)
        stop = set(tok.eos_token_ids)
        if dataset == "samsum":  # pred.py also stops samsum at a newline
            stop.add(tok.encode("\n")[-1])
        ids = prompt_ids(tok, sample, context_len)
        return Prompt(
            index=index,
            seed=self.options.seed,
            ids=tuple(ids),
            variant=sample.dataset,
            description=f"{sample.dataset}.jsonl line {sample.line} (_id {sample.sample_id})",
            answers=sample.answers,
            classes=sample.all_classes,
            max_new_tokens=MAX_NEW_TOKENS[dataset],
            stop_ids=frozenset(stop),
        )

    def run(
        self, session: Session, engine: Engine, prompt: Prompt, reference: Outcome | None
    ) -> Outcome:
        started = time.perf_counter()
        tokens = session.greedy(engine, list(prompt.ids), prompt.max_new_tokens, prompt.stop_ids)
        text = session.tokenizer.decode(tokens, skip_special_tokens=True)
        score = score_prediction(base_dataset(prompt.variant), text, prompt.answers, prompt.classes)
        return Outcome(
            engine.config.policy,
            engine.config.budget,
            score,
            text,
            AnswerDetail(prompt.answers, ()),
            time.perf_counter() - started,
        )

    def measures(self, outcomes: list[Outcome]) -> list[Measure]:
        return [Measure("LongBench score", 100 * float(np.mean([o.score for o in outcomes])))]
