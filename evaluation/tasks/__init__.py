"""The accuracy tasks, by name."""

from __future__ import annotations

from pathlib import Path

from evaluation.corpus import Corpus
from evaluation.tasks.agreement import AgreementTask
from evaluation.tasks.base import Task, TaskOptions
from evaluation.tasks.fidelity import FidelityTask
from evaluation.tasks.longbench import LongBenchTask
from evaluation.tasks.niah import NiahTask
from evaluation.tasks.passkey import PasskeyTask
from evaluation.tasks.ppl import PerplexityTask
from evaluation.tasks.recall import RecallTask

TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (
        PasskeyTask,
        NiahTask,
        PerplexityTask,
        AgreementTask,
        FidelityTask,
        RecallTask,
        LongBenchTask,
    )
}


def make_task(
    name: str,
    corpus: Corpus,
    options: TaskOptions,
    data_dir: Path | None = None,
    datasets: list[str] | None = None,
) -> Task:
    """The task called ``name``; ``longbench`` needs ``data_dir``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if name == LongBenchTask.name:
        if data_dir is None:
            raise ValueError("the longbench task needs --data-dir with the LongBench JSONL files")
        return LongBenchTask(corpus, options, data_dir, datasets)
    return TASKS[name](corpus, options)


__all__ = ["TASKS", "Task", "TaskOptions", "make_task"]
