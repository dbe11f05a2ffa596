"""Selection quality against exact attention, per layer, on real text.

Each sample is a seeded window of ``context_len`` corpus tokens: all but the last
``probes + 1`` are prefilled, then ``probes`` true tokens are decoded. At every decode step
and layer the probe recomputes the exact softmax attention of each query head over all keys
stored so far (the prefill's keys and the decoded ones, as the store holds them) and reads
which token positions the policy's selected pages hold (``session.store.pool.positions``). It
reports, averaged over query heads and steps:

- attention-mass recall: the share of the exact softmax mass on the selected tokens;
- top-k hit rate: the share of the exact top-k tokens (k = budget) that were selected.

The cell's numbers average the layers that select (``layer >= dense_layers``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cache_service.page_pool import PagePool
from cache_service.types import Selection
from evaluation.tasks.base import Task
from evaluation.types import Measure, Outcome, Prompt, RecallDetail, details_of

if TYPE_CHECKING:
    from evaluation.session import Session
    from worker.engine import Engine


class RecallProbe:
    """Decode observer: exact attention vs the selected positions, per layer."""

    def __init__(
        self,
        pool: PagePool,
        prefill_keys: Callable[[], list[np.ndarray]],
        scale: float,
        top_k: int | None,
    ) -> None:
        self.pool = pool
        self.prefill_keys = prefill_keys
        self.scale = scale
        self.top_k = top_k
        self.keys: list[np.ndarray] | None = None
        self.mass: dict[int, list[float]] = {}
        self.hit: dict[int, list[float]] = {}

    def __call__(
        self, layer: int, keys: np.ndarray, queries: np.ndarray, sels: list[Selection]
    ) -> None:
        if self.keys is None:
            self.keys = self.prefill_keys()
        self.keys[layer] = np.concatenate([self.keys[layer], keys[:1].astype(np.float32)])
        all_keys = self.keys[layer]  # [T, Hkv, D]
        kv_heads = all_keys.shape[1]
        group = queries.shape[1] // kv_heads
        sel = sels[0]
        for h in range(kv_heads):
            chosen = self.positions(sel, h)
            q = queries[0, h * group : (h + 1) * group].astype(np.float32)  # [G, D]
            probs = _softmax(q @ all_keys[:, h].T * self.scale)  # [G, T]
            mass, hit = self.compare(probs, chosen)
            self.mass.setdefault(layer, []).append(mass)
            self.hit.setdefault(layer, []).append(hit)

    def positions(self, sel: Selection, head: int) -> np.ndarray:
        """Token positions held by the pages selected for one KV head."""
        pages = sel.pages[sel.indptr[head] : sel.indptr[head + 1]]
        lens = sel.lens[sel.indptr[head] : sel.indptr[head + 1]]
        slots = np.arange(self.pool.page_size)[None, :] < lens[:, None]
        positions = self.pool.positions[pages][slots]
        return np.unique(positions[positions >= 0])

    def compare(self, probs: np.ndarray, chosen: np.ndarray) -> tuple[float, float]:
        """(mass recall, top-k hit rate) of ``chosen`` positions, averaged over heads."""
        mass = float(probs[:, chosen].sum(axis=1).mean())
        k = probs.shape[1] if self.top_k is None else min(self.top_k, probs.shape[1])
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        hit = float(np.isin(top, chosen).mean())
        return mass, hit

    def detail(self, sparse_from: int) -> RecallDetail:
        layers = sorted(self.mass)
        return RecallDetail(
            tuple(float(np.mean(self.mass[i])) for i in layers),
            tuple(float(np.mean(self.hit[i])) for i in layers),
            sparse_from,
        )


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sparse_mean(values: tuple[float, ...], sparse_from: int) -> float:
    """Mean over the layers that select (all layers if none do)."""
    chosen = values[sparse_from:] or values
    return float(np.mean(chosen))


class RecallTask(Task):
    name = "recall"
    variants = ("selection",)

    def prompts(self, variant: str, context_len: int) -> list[Prompt]:
        probes = self.options.probes
        if not 0 < probes < context_len - 1:
            raise ValueError(f"--probes {probes} must be between 1 and the context length - 2")
        return self.windows(
            context_len,
            lambda seed: (
                f"{context_len} corpus tokens (window seed {seed}); {probes} decode steps probed"
            ),
            scored_from=context_len - probes - 1,
        )

    def run(
        self, session: Session, engine: Engine, prompt: Prompt, reference: Outcome | None
    ) -> Outcome:
        started = time.perf_counter()
        ids = list(prompt.ids)
        probe = RecallProbe(
            session.store.pool,
            lambda: session.prefill_keys(ids[: prompt.scored_from]),
            engine.scale,
            engine.config.budget,
        )
        with session.observing(probe):
            session.teacher_forced(engine, ids, prompt.scored_from)
        detail = probe.detail(engine.config.dense_layers)
        return Outcome(
            engine.config.policy,
            engine.config.budget,
            sparse_mean(detail.mass, detail.sparse_from),
            "",
            detail,
            time.perf_counter() - started,
        )

    def measures(self, outcomes: list[Outcome]) -> list[Measure]:
        details = details_of(outcomes, RecallDetail)
        hits = [sparse_mean(d.hit, d.sparse_from) for d in details]
        return [
            Measure("attention mass recall", float(np.mean([o.score for o in outcomes]))),
            Measure("top-k hit rate", float(np.mean(hits))),
        ]
