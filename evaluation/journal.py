"""Finished samples of a long accuracy run, one JSON line each, so a rerun skips them.

One sample of every policy and budget costs minutes here, so a run that is killed, or that
is grown across sessions, must not pay again for what it finished. Each line is a sample
with every (policy, budget) outcome, under a ``signature``: the things besides the cell and
the seed that decide its numbers (corpus, task options, model, dense layers). A sample is
done when the journal holds it under the same signature with every pair the run asks for.
Lines are appended with one ``write`` each and flushed, so a killed run leaves at most one
torn last line, which is skipped (and reported) on reading.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from evaluation.types import (
    AgreementDetail,
    AnswerDetail,
    Detail,
    FidelityDetail,
    Outcome,
    PerplexityDetail,
    RecallDetail,
    SampleRecord,
)

log = logging.getLogger(__name__)

_DETAILS: tuple[type, ...] = (
    AnswerDetail,
    PerplexityDetail,
    AgreementDetail,
    RecallDetail,
    FidelityDetail,
)

SampleKey = tuple[str, str, str, int, int]
"""signature, task, variant, context length, seed."""

Pair = tuple[str, int | None]


def detail_from_json(data: dict[str, Any]) -> Detail:
    """The detail dataclass whose fields are exactly ``data``'s keys."""
    for kind in _DETAILS:
        names = {f.name for f in fields(kind)}
        if names == set(data):
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
            return kind(**values)  # type: ignore[no-any-return]
    raise ValueError(f"no outcome detail has the fields {sorted(data)}")


def record_from_json(data: dict[str, Any]) -> SampleRecord:
    """A ``SampleRecord`` from its ``asdict`` form."""
    outcomes = [
        Outcome(
            o["policy"],
            o["budget"],
            o["score"],
            o["output"],
            detail_from_json(o["detail"]),
            o.get("seconds", 0.0),
        )
        for o in data["outcomes"]
    ]
    return SampleRecord(
        data["task"],
        data["variant"],
        data["context_len"],
        data["seed"],
        data["index"],
        data["description"],
        data["prompt_tokens"],
        tuple(data["answers"]),
        outcomes,
    )


class Journal:
    """The samples finished so far, read from ``path`` and appended to it as they finish."""

    def __init__(self, path: Path, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = meta or {}
        """Written with every new line (e.g. the commit that ran it)."""
        self._records: dict[SampleKey, SampleRecord] = {}
        self._meta: dict[SampleKey, dict[str, Any]] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        with self.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    record = record_from_json(data["sample"])
                except (ValueError, KeyError, TypeError) as err:
                    log.warning(
                        "%s line %d skipped (torn or unreadable): %s", self.path, number, err
                    )
                    continue
                key = self.key(data["signature"], record)
                self._records[key] = record
                self._meta[key] = data.get("meta", {})

    @staticmethod
    def key(signature: str, record: SampleRecord) -> SampleKey:
        return (signature, record.task, record.variant, record.context_len, record.seed)

    def get(
        self,
        signature: str,
        task: str,
        variant: str,
        context_len: int,
        seed: int,
        pairs: list[Pair],
    ) -> SampleRecord | None:
        """The finished sample with every one of ``pairs`` (only those, in that order)."""
        record = self._records.get((signature, task, variant, context_len, seed))
        if record is None:
            return None
        by_pair = {(o.policy, o.budget): o for o in record.outcomes}
        if any(pair not in by_pair for pair in pairs):
            return None
        return SampleRecord(
            record.task,
            record.variant,
            record.context_len,
            record.seed,
            record.index,
            record.description,
            record.prompt_tokens,
            record.answers,
            [by_pair[pair] for pair in pairs],
        )

    def outcomes(
        self, signature: str, task: str, variant: str, context_len: int, seed: int
    ) -> dict[Pair, Outcome]:
        """The outcomes a sample has so far, by (policy, budget) (empty when none)."""
        record = self._records.get((signature, task, variant, context_len, seed))
        return {} if record is None else {(o.policy, o.budget): o for o in record.outcomes}

    def add(self, signature: str, record: SampleRecord) -> None:
        """Keep ``record`` (replacing an earlier one of the same sample) and append it."""
        key = self.key(signature, record)
        self._records[key] = record
        self._meta[key] = self.meta
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = {"signature": signature, "meta": self.meta, "sample": asdict(record)}
        text = json.dumps(line) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()

    def items(self) -> list[tuple[SampleKey, SampleRecord]]:
        """Every finished sample with its key, in key order."""
        return sorted(self._records.items(), key=lambda item: item[0])

    def meta_of(self, key: SampleKey) -> dict[str, Any]:
        """What was written with a sample's line (empty for lines without it)."""
        return self._meta.get(key, {})

    def records(self, signature: str) -> list[SampleRecord]:
        """Every finished sample under ``signature``."""
        return [r for k, r in self._records.items() if k[0] == signature]

    def __len__(self) -> int:
        return len(self._records)
