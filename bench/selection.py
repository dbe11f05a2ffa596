"""Selection benchmark: which tokens each policy attends, how good and how fast.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.selection     # writes bench/results/selection.*

Two cases, every policy at budgets 64/128/256 (sinks and recent window included, split as
``SequenceSpec`` splits them in the engine):

- ``synthetic``: structured keys of the Llama-3.1-8B shape (32 layers x 8 KV heads x 128
  dims, GQA group 4) at 8k/32k/128k tokens. Only a subset of (layer, KV head) pairs is
  measured (``--synthetic-layers`` x ``--synthetic-heads``); build and search times per head
  are scaled to all 256 heads, recall is the mean over the measured heads. The generator
  (``synthetic_head``) uses Llama-3.1's scaled RoPE (``rope_type: llama3``, factor 8), so
  sink keys keep their mass at long range as in the real model (plain theta=500000 rotated
  them away), carries recency (a component shared by keys and queries on the dimensions of
  RoPE wavelength 32..1024 tokens) and subtopics within topics (sub-runs of mean length
  12), so that a query's top tokens are a structure a clustering can co-locate, not noise.
- ``real``: keys and queries of the embedded SmolLM2-135M on ``pydoc_data.topics`` text,
  captured with the ``recall`` eval's session (prefill keys + decode observer): all 30
  layers x 3 KV heads, several decode steps; recall averages the selecting layers.

Per (policy, budget, context): index build time (all layers), selection time per decode
step (all layers), attention-mass recall, top-k hit rate (k = body budget) and body pages
per head and step.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cache_service.cluster_index import ClusterIndex, IndexConfig
from cache_service.kmeans_index import FlatKMeansIndex
from cache_service.policies.base import group_scores
from cache_service.policies.indexed import search_layout
from cache_service.types import SequenceSpec

log = logging.getLogger("bench.selection")

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = 16
DENSE_LAYERS = 2
REUSE_GROUP = 3
POLICIES = ("icecache", "icecache-r", "icecache-tokens", "kmeans", "quest", "oracle", "streaming")
INDEXED = {"icecache": ClusterIndex, "kmeans": FlatKMeansIndex}


# ---------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    """A token budget split as the engine splits it (``SequenceSpec``)."""

    total: int
    sinks: int
    window: int
    """Recent-window tokens (whole pages)."""

    @property
    def body(self) -> int:
        return self.total - self.sinks - self.window

    @staticmethod
    def of(total: int) -> Budget:
        spec = SequenceSpec(1, 1, 1, 1, policy="icecache", budget=total)
        spec.validate(PAGE)
        return Budget(total, spec.sinks(PAGE), spec.window_pages(PAGE) * PAGE)


# ---------------------------------------------------------------------------- cases
@dataclass
class HeadCase:
    """One (layer, KV head): its keys and the query group at a few decode steps.

    Step ``s`` attends to ``keys[:context[s]]``; the index body of a budget is
    ``keys[sinks : body_end - window]`` (the tokens the engine's window has let go).
    """

    layer: int
    head: int
    keys: np.ndarray  # [N, D] float32, post-RoPE
    queries: np.ndarray  # [S, G, D] float32, post-RoPE
    context: np.ndarray  # [S] int, keys visible at each step
    body_end: int  # prefill length: the window is counted back from here


@dataclass
class Cell:
    """Measurements of one (case, context, policy, budget), one entry per head or step."""

    mass: list[float] = field(default_factory=list)
    hit: list[float] = field(default_factory=list)
    pages: list[float] = field(default_factory=list)
    search_s: list[float] = field(default_factory=list)
    build_s: list[float] = field(default_factory=list)
    fill: list[float] = field(default_factory=list)
    index_bytes: list[float] = field(default_factory=list)


Key = tuple[str, int, str, int]  # case, context length, policy, budget


# ---------------------------------------------------------------------------- synthetic keys
def llama31_freqs(dim: int, theta: float = 500000.0) -> np.ndarray:
    """RoPE frequencies ``[D/2]`` of Llama-3.1 (``rope_type: llama3``: factor 8,
    low_freq_factor 1, high_freq_factor 4, original context 8192): wavelengths above 8192
    tokens turn 8x slower, below 2048 unchanged, smoothly in between."""
    half = dim // 2
    freqs = theta ** (-np.arange(half) / half)
    factor, low, high, original = 8.0, 1.0, 4.0, 8192.0
    wavelen = 2 * np.pi / freqs
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * freqs / factor + smooth * freqs


def rope(x: np.ndarray, positions: np.ndarray, theta: float = 500000.0) -> np.ndarray:
    """Llama-3.1 RoPE (rotate-half layout, scaled frequencies) of ``x [N, ..., D]`` at
    ``positions [N]``."""
    half = x.shape[-1] // 2
    freqs = llama31_freqs(x.shape[-1], theta)  # [D/2]
    angle = positions.astype(np.float64)[:, None] * freqs[None]  # [N, D/2]
    shape = (len(x),) + (1,) * (x.ndim - 2) + (half,)
    cos, sin = np.cos(angle).reshape(shape), np.sin(angle).reshape(shape)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(np.float32)


SUBTOPICS = 4
"""Subtopics per topic: a run of one topic moves between a few sub-subjects."""


def topic_runs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Topic and subtopic of each token ``[n]`` (a document's structure, shared by all
    layers and heads): runs of mean length 48 drawn from Zipf-weighted topics, and within
    them sub-runs of mean length 12, each on one of the topic's ``SUBTOPICS``."""
    topics = max(16, n // 128)
    weights = 1.0 / np.arange(1, topics + 1)
    lengths = rng.geometric(1 / 48, size=n // 8 + 16)
    labels = rng.choice(topics, size=len(lengths), p=weights / weights.sum())
    sub_lengths = rng.geometric(1 / 12, size=n // 2 + 16)
    subs = np.repeat(rng.integers(0, SUBTOPICS, len(sub_lengths)), sub_lengths)
    return np.repeat(labels, lengths)[:n], subs[:n]


def synthetic_head(
    layer: int,
    head: int,
    doc: tuple[np.ndarray, np.ndarray],
    steps: int,
    group: int,
    seed: int,
) -> HeadCase:
    """Structured keys and queries of one 128-dim head (see the results file for the model).

    Keys: ``mean + scale * (centroid[topic] + 0.8 sub[topic, subtopic] + 0.5 noise +
    0.8 near)``, with a large shared mean direction, per-dimension log-normal scales
    (larger on the slow RoPE dimensions) and four sink tokens with a key of their own.
    ``near`` lives on the dimensions whose RoPE wavelength is 32..1024 tokens: queries carry
    it too, so after RoPE it favours keys a few hundred tokens back (recency).
    Queries of a group aim at 3 (topic, subtopic) pairs (Zipf-weighted topics, each head
    its own mix), the sinks and ``near``, plus noise; then Llama-3.1 RoPE (scaled
    frequencies) at each side's position.
    """
    topics, subs = doc
    dim, n = 128, len(topics)
    rng = np.random.default_rng([seed, layer, head])
    slow = np.tile(np.linspace(0.5, 2.0, dim // 2), 2)  # slow-rotating dims carry more
    scale = slow * rng.lognormal(0.0, 0.5, dim)
    mean = rng.standard_normal(dim) * 2.0
    centroids = rng.standard_normal((topics.max() + 1, dim))
    sub = rng.standard_normal((topics.max() + 1, SUBTOPICS, dim))
    wavelen = np.tile(2 * np.pi / llama31_freqs(dim), 2)
    near = rng.standard_normal(dim) * ((wavelen >= 32) & (wavelen <= 1024))
    noise = rng.standard_normal((n, dim))
    keys = mean + scale * (centroids[topics] + 0.8 * sub[topics, subs] + 0.5 * noise + 0.8 * near)
    sink = rng.standard_normal(dim)
    keys[:4] = mean + scale * 3.0 * sink
    # queries: shared topics per step, reused across a layer cycle (a text's focus persists)
    focus_rng = np.random.default_rng([seed, (layer - DENSE_LAYERS) // REUSE_GROUP, head])
    present = np.unique(topics[4:])
    queries = np.empty((steps, group, dim))
    for s in range(steps):
        focus = focus_rng.choice(present, size=3, replace=False)
        part = focus_rng.integers(0, SUBTOPICS, 3)
        if rng.random() < 0.3:  # layers of a cycle disagree sometimes
            focus[rng.integers(3)] = rng.choice(present)
        for g in range(group):
            w = rng.dirichlet(np.ones(3))
            aim = (w[:, None] * (centroids[focus] + 0.8 * sub[focus, part])).sum(0)
            aim = aim + 0.5 * sink + 0.8 * near
            queries[s, g] = 0.55 * scale * aim + 0.3 * rng.standard_normal(dim)
    keys = rope(keys, np.arange(n))
    end = np.full(steps, n)
    queries = rope(queries.reshape(steps, group, dim), end)
    return HeadCase(layer, head, keys, queries, end, n)


def synthetic_cases(
    n: int, layers: tuple[int, ...], heads: tuple[int, ...], steps: int, seed: int
) -> Iterator[HeadCase]:
    """The measured heads of the synthetic Llama-3.1-8B shape at ``n`` tokens."""
    doc = topic_runs(n, np.random.default_rng(seed))
    for layer in layers:
        for head in heads:
            yield synthetic_head(layer, head, doc, steps, group=4, seed=seed)


# ---------------------------------------------------------------------------- real keys
def real_cases(context: int, steps: int, seed: int) -> tuple[list[HeadCase], float | None]:
    """Every (layer, KV head) of the embedded model on ``context`` corpus tokens, and the
    model's dense prefill time in s (``None`` when it was replayed from a capture).

    The prefill of the first ``context - steps - 1`` tokens comes from the eval's on-disk
    capture (``evaluation.capture``, float16 K/V, the same one the ``recall`` eval uses for
    this window; computed once, with RoPE extrapolated past the model's 8k when longer);
    the ``steps`` probed decode steps' keys and queries under ``full`` are kept beside it.
    """
    from evaluation.capture import default_root
    from evaluation.command import open_session
    from evaluation.corpus import Corpus, default_text
    from evaluation.session import SessionConfig

    config = SessionConfig(dense_layers=DENSE_LAYERS, seed=seed, allow_extrapolation=True)
    session = open_session(None, "cpu", config, default_root())
    store = session.prefills
    assert store is not None
    ids = Corpus(default_text(), session.tokenizer).window_ids(context, np.random.default_rng(seed))
    prefix = context - steps - 1
    name = f"selection-probes-{steps}"
    probes = store.load_extra(ids[:prefix], name)
    prefill_s = None
    if not probes:
        engine = session.engine("full", None, context)
        started = time.perf_counter()
        seq, _ = session.start(engine, ids[:prefix])
        if session.prefills_computed:
            prefill_s = time.perf_counter() - started
        engine.finish(seq)
        seen: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

        def observe(layer: int, keys: np.ndarray, queries: np.ndarray, _sels: object) -> None:
            seen.setdefault(layer, []).append((keys[0].copy(), queries[0].copy()))

        with session.observing(observe):
            session.teacher_forced(engine, ids, prefix)
        layers = sorted(seen)
        probes = {
            "keys": np.stack([np.stack([k for k, _ in seen[i]]) for i in layers]),  # [L,S,Hkv,D]
            "queries": np.stack([np.stack([q for _, q in seen[i]]) for i in layers]),  # [L,S,Hq,D]
        }
        store.save_extra(ids[:prefix], name, probes)
    capture = store.load(ids[:prefix])
    assert capture is not None
    cases = []
    for layer in range(capture.keys.shape[0]):
        prefill = np.asarray(capture.keys[layer], dtype=np.float32)  # [T, Hkv, D]
        keys = np.concatenate([prefill, probes["keys"][layer]])  # [N, Hkv, D]
        queries = probes["queries"][layer]  # [S, Hq, D]
        kv_heads = keys.shape[1]
        group = queries.shape[1] // kv_heads
        context_at = prefix + 1 + np.arange(queries.shape[0])
        for h in range(kv_heads):
            q = queries[:, h * group : (h + 1) * group].astype(np.float32)
            cases.append(HeadCase(layer, h, keys[:, h].astype(np.float32), q, context_at, prefix))
    return cases, prefill_s


# ---------------------------------------------------------------------------- policies
@dataclass
class Bodies:
    """Per-head structures built over one body span ``[start, end)`` of positions."""

    start: int
    end: int
    indexes: dict[str, ClusterIndex]
    quest_min: np.ndarray  # [pages, D]
    quest_max: np.ndarray
    build_s: dict[str, float]
    memory: dict[str, tuple[float, float]]
    """Per structure: (tokens per page / page size, its own bytes per token)."""


def build_bodies(case: HeadCase, start: int, end: int, seed: int) -> Bodies:
    """Index the body ``keys[start:end]`` for every policy that needs a structure; timed."""
    body = case.keys[start:end]
    ids = np.arange(start, end)
    indexes, build_s, memory = {}, {}, {}
    for name, kind in INDEXED.items():
        t0 = time.perf_counter()
        # Keys read from where the body keeps them, as the cache service's indexes do.
        index = kind(body.shape[1], IndexConfig(seed=seed), key_source=case.keys.__getitem__)
        index.build(body, ids)
        build_s[name] = time.perf_counter() - t0
        indexes[name] = index
        fill = index.num_tokens / max(index.num_leaves, 1) / PAGE
        memory[name] = (fill, index.nbytes() / max(len(body), 1))
    t0 = time.perf_counter()
    pad = -len(body) % PAGE
    padded = np.concatenate([body, np.repeat(body[-1:], pad, axis=0)])  # last page repeats
    pages = padded.reshape(-1, PAGE, body.shape[1])
    qmin, qmax = pages.min(axis=1), pages.max(axis=1)
    build_s["quest"] = time.perf_counter() - t0
    memory["quest"] = (len(body) / (len(pages) * PAGE), (qmin.nbytes + qmax.nbytes) / len(body))
    return Bodies(start, end, indexes, qmin, qmax, build_s, memory)


def leaf_positions(index: ClusterIndex, leaves: np.ndarray) -> np.ndarray:
    """Token positions held by ``leaves`` (token ids are positions here)."""
    toks = index.tokens[leaves]
    return toks[toks >= 0]


def select(
    policy: str, bodies: Bodies, case: HeadCase, q: np.ndarray, body_budget: int
) -> tuple[np.ndarray, int]:
    """Body positions attended by ``policy`` for query group ``q [G, D]`` and the pages they
    occupy (leaves, positional pages, the scratch pages ``icecache-tokens`` gathers into or,
    for the oracle, the source pages it gathers from)."""
    start, end = bodies.start, bodies.end
    if policy == "icecache-tokens":
        pos = bodies.indexes["icecache"].search_tokens(q, body_budget)
        return pos, math.ceil(len(pos) / PAGE)
    if policy in INDEXED:
        index = bodies.indexes[policy]
        leaves = index.search(q, body_budget)
        return leaf_positions(index, leaves), len(leaves)
    if policy == "quest":
        bound = np.maximum(q[:, None] * bodies.quest_min[None], q[:, None] * bodies.quest_max[None])
        order = np.argsort(-bound.sum(-1).max(axis=0), kind="stable")
        take = order[: body_budget // PAGE]
        pos = (start + take[:, None] * PAGE + np.arange(PAGE)[None]).ravel()
        return pos[pos < end], len(take)
    if policy == "oracle":
        scores = group_scores(q, case.keys[start:end]).max(axis=0)
        count = min(body_budget, len(scores))
        pos = start + np.argpartition(-scores, count - 1)[:count]
        return pos, len(np.unique((pos - start) // PAGE))
    assert policy == "streaming", policy
    pos = np.arange(max(start, end - body_budget), end)
    return pos, math.ceil(len(pos) / PAGE)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def quality(probs: np.ndarray, attended: np.ndarray, k: int) -> tuple[float, float]:
    """(attention-mass recall, top-k hit rate) of ``attended`` positions, mean over the
    group's heads; ``probs [G, T]`` is the exact softmax."""
    mask = np.zeros(probs.shape[1], dtype=bool)
    mask[attended] = True
    mass = float((probs * mask).sum(axis=1).mean())
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return mass, float(mask[top].mean())


# ---------------------------------------------------------------------------- measuring
class Measurer:
    """Runs every policy and budget over head cases; accumulates ``Cell``\\ s."""

    def __init__(self, budgets: tuple[int, ...], seed: int) -> None:
        self.budgets = [Budget.of(b) for b in budgets]
        self.seed = seed
        self.cells: dict[Key, Cell] = {}
        self.leaders: dict[tuple[int, int, int, int], ClusterIndex] = {}
        """icecache-r: the leader layer's index by (head, body start, body end, layer)."""

    def cell(self, key: Key) -> Cell:
        return self.cells.setdefault(key, Cell())

    def run(self, name: str, length: int, case: HeadCase) -> None:
        """Measure one head: build once per body span, then every budget and step."""
        leader = is_leader(case.layer)
        spans = {(b.sinks, case.body_end - b.window) for b in self.budgets}
        built = {span: build_bodies(case, *span, self.seed) for span in spans}
        scale = case.keys.shape[1] ** -0.5
        probs = [
            softmax(q @ case.keys[:n].T * scale)
            for q, n in zip(case.queries, case.context, strict=True)
        ]
        for budget in self.budgets:
            bodies = built[(budget.sinks, case.body_end - budget.window)]
            leader_key = (case.head, bodies.start, bodies.end, leader_of(case.layer))
            if leader:
                self.leaders[leader_key] = bodies.indexes["icecache"]
            follower = None
            if not leader:
                t0 = time.perf_counter()
                follower = Follower.of(self.leaders[leader_key], case.keys)
                follower_s = time.perf_counter() - t0
            for policy in POLICIES:
                cell = self.cell((name, length, policy, budget.total))
                source = "icecache" if policy == "icecache-r" else policy
                index_of = "icecache" if policy == "icecache-tokens" else source
                fill, own = bodies.memory.get(index_of, (math.nan, 0.0))
                if policy == "icecache-r" and follower is not None:
                    # a follower keeps no index: its own centroids on the leader's leaves
                    cell.build_s.append(follower_s)
                    cell.index_bytes.append(follower.nbytes() / (bodies.end - bodies.start))
                else:
                    cell.build_s.append(bodies.build_s.get(index_of, 0.0))
                    cell.index_bytes.append(own)
                if policy == "icecache-tokens":  # its tokens stay in positional pages
                    cell.fill.append(bodies.memory["quest"][0])
                elif policy != "icecache-r":
                    cell.fill.append(fill)
                for s, q in enumerate(case.queries):
                    fixed = np.r_[0 : budget.sinks, bodies.end : case.context[s]]
                    t0 = time.perf_counter()
                    if policy == "icecache-r" and follower is not None:
                        pos, pages = follower.select(q, budget.body)
                    else:
                        pos, pages = select(source, bodies, case, q, budget.body)
                    cell.search_s.append(time.perf_counter() - t0)
                    mass, hit = quality(probs[s], np.concatenate([fixed, pos]), budget.body)
                    cell.mass.append(mass)
                    cell.hit.append(hit)
                    cell.pages.append(pages)


@dataclass
class Follower:
    """An ``icecache-r`` follower head (``MirroredBody``'s arithmetic on plain arrays): the
    leader's leaves, the centroid of the follower's own keys in each."""

    index: ClusterIndex
    keys: np.ndarray  # [N, D] the follower's keys by position
    centroids: np.ndarray  # [leaves, D]
    fills: np.ndarray  # [leaves]

    @staticmethod
    def of(index: ClusterIndex, keys: np.ndarray) -> Follower:
        fills = index.fill[: index.num_leaves]
        rows = leaf_positions(index, np.arange(index.num_leaves))  # leaf by leaf
        sums = np.add.reduceat(keys[rows], np.cumsum(fills) - fills, axis=0)
        return Follower(index, keys, (sums / fills[:, None]).astype(np.float32), fills)

    def nbytes(self) -> int:
        return self.centroids.nbytes + self.fills.nbytes

    def select(self, q: np.ndarray, body_budget: int) -> tuple[np.ndarray, int]:
        leaves = search_layout(
            q,
            np.arange(len(self.fills)),
            self.centroids,
            self.fills,
            lambda picked: self.keys[leaf_positions(self.index, picked)],
            body_budget,
            self.index.config,
            self.index.dim,
        )
        return leaf_positions(self.index, leaves), len(leaves)


def leader_of(layer: int) -> int:
    """The layer whose selection ``icecache-r`` reuses at ``layer`` (engine's rule)."""
    if layer < DENSE_LAYERS:
        return layer
    return layer - (layer - DENSE_LAYERS) % REUSE_GROUP


def is_leader(layer: int) -> bool:
    return leader_of(layer) == layer


# ---------------------------------------------------------------------------- speed
@dataclass(frozen=True)
class SpeedRow:
    """Whole-layer timings of one policy at one context length, scaled to ``SPEED_LAYERS``
    layers.

    Selection times are medians over steps and repeats of one layer's 8 KV heads (the same
    indexes and queries for all three ways), x32; the store step is ``Store.decode`` of one
    token through ``STORE_LAYERS`` clustered layers (select + staggered insert +
    bookkeeping), x(32 / STORE_LAYERS).
    """

    policy: str
    """``icecache`` (whole leaves) or ``icecache-tokens`` (single tokens)."""
    context: int
    batched_ms: float
    """``search_heads`` (``search_heads_tokens``): one call per layer (wall)."""
    batched_cpu_ms: float
    per_head_ms: float
    """``ClusterIndex.search`` (``search_tokens``) head by head (the reference path)."""
    oracle_ms: float
    """Exact scan of every body key by the group (``OracleBody``'s selection)."""
    insert_ms: float
    """Page inserts per decode step: 256 heads / 16 steps = 16 page inserts (mean page insert
    of the measured heads x 16)."""
    step_p50_ms: float
    step_p99_ms: float
    step_cpu_p50_ms: float
    step_cpu_p99_ms: float
    step_runs: str
    """p50 / p99 (wall) of each run of ``--store-steps`` decode steps."""
    bytes_per_step: float
    """Bytes the batched search reads per decode step: int8 centroids scored + float32 keys
    scored exactly (x32 layers x 8 heads)."""
    oracle_bytes_per_step: float
    leaves_scored: float
    tokens_scored: float


SPEED_LAYERS = 32
SPEED_HEADS = 8
STORE_LAYERS = 2  # layer delays 0..7 and 8..15: one of the 16 heads inserts at every step
INSERT_PAGES = 8
"""Pages each of the 16 heads inserts for the insert column (128 inserts: with 2 pages a
head, a rare expensive split moved the mean by tens of percent between runs)."""


def speed_case(n: int, steps: int, seed: int) -> list[HeadCase]:
    """Two layers x 8 KV heads of the synthetic generator at ``n`` tokens plus ``steps``
    decoded ones (their keys continue the document; queries cycle over the case's)."""
    doc = topic_runs(n + steps, np.random.default_rng(seed))
    return [
        synthetic_head(layer, head, doc, 8, group=4, seed=seed)
        for layer in (DENSE_LAYERS, DENSE_LAYERS + 1)
        for head in range(SPEED_HEADS)
    ]


def measure_speed(
    policy: str, n: int, store_steps: int, runs: int, repeats: int, seed: int
) -> SpeedRow:
    """Build a two-layer ``Store`` of ``policy`` over ``n`` synthetic tokens (budget 256),
    time whole-layer selection three ways on its first layer, page inserts, then ``runs`` x
    ``store_steps`` decode steps."""
    import copy

    from cache_service.batched_search import search_heads, search_heads_tokens
    from cache_service.page_pool import PagePool
    from cache_service.store import Store

    decoded = store_steps * runs
    cases = speed_case(n, max(decoded, INSERT_PAGES * PAGE), seed)  # keys to insert too
    group = cases[0].queries.shape[1]
    spec = SequenceSpec(
        STORE_LAYERS,
        SPEED_HEADS,
        SPEED_HEADS * group,
        128,
        policy=policy,
        budget=256,
        dense_layers=0,
        seed=seed,
    )
    # The build's admission: leaf pages (up to 3x the positional ones while both are held)
    # and the index's own memory in pages (``INDEX_BYTES_PER_KEY``: ~3.5x at head_dim 128).
    pages = STORE_LAYERS * SPEED_HEADS * (7 * (n + decoded) // PAGE + 64)
    store = Store(PagePool(pages, PAGE, 128, dtype="float16"))
    store.create("s", spec)
    keys = np.stack([c.keys for c in cases]).reshape(STORE_LAYERS, SPEED_HEADS, -1, 128)
    keys = keys.transpose(0, 2, 1, 3)  # [L, N, H, D]
    t0 = time.perf_counter()
    for layer in range(STORE_LAYERS):
        store.append("s", layer, keys[layer, :n], keys[layer, :n], np.arange(n))
        q = np.concatenate([c.queries[0] for c in cases[layer * 8 : layer * 8 + 8]])
        store.retrieve("s", layer, q)  # builds the indexes
    log.info("speed %d: store built in %.1f s", n, time.perf_counter() - t0)
    bodies = store._seqs["s"].bodies[0]
    indexes = [body.index for body in bodies]  # type: ignore[attr-defined]
    body = Budget.of(256).body
    queries = np.stack([c.queries for c in cases[:SPEED_HEADS]], axis=1)  # [S, H, G, D]
    lay = store._seqs["s"].heads[0][0]
    end = n - len(lay.window_pages_now()) * PAGE  # body span [sinks, end)
    sinks = spec.sinks(PAGE)
    single = policy == "icecache-tokens"
    batched = search_heads_tokens if single else search_heads
    times: dict[str, list[float]] = {"batched": [], "cpu": [], "per_head": [], "oracle": []}
    for _ in range(repeats):
        for q in queries:
            c0 = time.process_time()  # wall excludes the CPU clock's own call
            t0 = time.perf_counter()
            batched(indexes, q, body)
            times["batched"].append(time.perf_counter() - t0)
            times["cpu"].append(time.process_time() - c0)
            t0 = time.perf_counter()
            for index, qh in zip(indexes, q, strict=True):
                index.search_tokens(qh, body) if single else index.search(qh, body)
            times["per_head"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for case, qh in zip(cases, q, strict=False):
                scores = group_scores(qh, case.keys[sinks:end]).max(axis=0)
                np.argpartition(-scores, body - 1)[:body]
            times["oracle"].append(time.perf_counter() - t0)
    efforts = [index.last_effort for index in indexes]
    leaves = float(np.mean([e.nodes + e.leaves for e in efforts]))
    tokens = float(np.mean([e.tokens for e in efforts]))
    inserts = []
    for index, case in zip(indexes, cases, strict=False):
        # A copy of the index that reads keys from the case (the store's reads the pool's
        # pages, which hold only what the store was given), so that the store stays as is.
        source, index.key_source = index.key_source, None
        twin = copy.deepcopy(index)
        index.key_source, twin.key_source = source, case.keys.__getitem__
        for start in range(n, n + INSERT_PAGES * PAGE, PAGE):
            t0 = time.perf_counter()
            twin.insert(case.keys[start : start + PAGE], np.arange(start, start + PAGE))
            inserts.append(time.perf_counter() - t0)
    wall, cpu, per_run = [], [], []
    for run in range(runs):
        run_wall = []
        for step in range(store_steps):
            pos = n + run * store_steps + step
            c0 = time.process_time()
            t0 = time.perf_counter()
            for layer in range(STORE_LAYERS):
                k = keys[layer, pos][None]
                q = np.concatenate(
                    [c.queries[pos % len(c.queries)] for c in cases[layer * 8 : layer * 8 + 8]]
                )[None]
                store.decode(layer, ["s"], k, k, np.array([pos]), q)
            run_wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        wall += run_wall
        per_run.append(run_wall)
    scale = SPEED_LAYERS / STORE_LAYERS
    ms = 1e3 * SPEED_LAYERS
    runs_text = ", ".join(
        f"{1e3 * scale * np.percentile(r, 50):.0f} / {1e3 * scale * np.percentile(r, 99):.0f}"
        for r in per_run
    )
    return SpeedRow(
        policy,
        n,
        ms * float(np.median(times["batched"])),
        ms * float(np.median(times["cpu"])),
        ms * float(np.median(times["per_head"])),
        ms * float(np.median(times["oracle"])),
        1e3 * 16 * float(np.mean(inserts)),
        1e3 * scale * float(np.percentile(wall, 50)),
        1e3 * scale * float(np.percentile(wall, 99)),
        1e3 * scale * float(np.percentile(cpu, 50)),
        1e3 * scale * float(np.percentile(cpu, 99)),
        runs_text,
        SPEED_LAYERS * SPEED_HEADS * (leaves * 128 * 1 + tokens * 128 * 4),
        SPEED_LAYERS * SPEED_HEADS * (end - sinks) * 128 * 4.0,
        leaves,
        tokens,
    )


def speed_markdown(rows: list[SpeedRow]) -> str:
    head = (
        "| policy | context | batched ms/step | (CPU) | per-head ms/step | oracle ms/step "
        "| batched / oracle | insert ms/step | store step p50 / p99 ms (wall) "
        "| p50 / p99 (CPU) | p99 / p50 "
        "| runs p50 / p99 | MB read/step (oracle) | centroids + tokens scored/head |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- "
        "| ---: | ---: |\n"
    )
    lines = [
        f"| {r.policy} | {r.context} | {r.batched_ms:.1f} | {r.batched_cpu_ms:.1f} "
        f"| {r.per_head_ms:.1f} "
        f"| {r.oracle_ms:.1f} | {r.batched_ms / r.oracle_ms:.3f} | {r.insert_ms:.1f} "
        f"| {r.step_p50_ms:.1f} / {r.step_p99_ms:.1f} "
        f"| {r.step_cpu_p50_ms:.1f} / {r.step_cpu_p99_ms:.1f} "
        f"| {r.step_p99_ms / r.step_p50_ms:.2f} | {r.step_runs} "
        f"| {r.bytes_per_step / 1e6:.0f} ({r.oracle_bytes_per_step / 1e6:.0f}) "
        f"| {r.leaves_scored:.0f} + {r.tokens_scored:.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class Row:
    """One table line: a policy at a budget and context length, all-layer totals scaled."""

    case: str
    context: int
    policy: str
    budget: int
    recall: float
    vs_oracle: float
    topk_hit: float
    pages: float
    select_ms: float
    """Selection per decode step, all layers and heads (scaled from the measured heads)."""
    build_s: float
    """Index build, all layers and heads (scaled)."""
    heads_measured: int
    fill: float = math.nan
    """Tokens per page of the body's structure / page size (leaves; quest's pages)."""
    index_bytes: float = 0.0
    """The structure's own bytes per body token and head (index arrays; quest's page
    bounds), mean over the measured heads."""


def summarize(cells: dict[Key, Cell], layers: int, kv_heads: int) -> list[Row]:
    """Rows of all cells; per-head times scaled to ``layers x kv_heads`` (``icecache-r``:
    its leaders' and followers' times averaged in the measured proportion)."""
    rows = []
    for (name, length, policy, budget), c in cells.items():
        oracle = cells[(name, length, "oracle", budget)]
        heads = layers * kv_heads
        rows.append(
            Row(
                name,
                length,
                policy,
                budget,
                float(np.mean(c.mass)),
                float(np.mean(c.mass) / np.mean(oracle.mass)),
                float(np.mean(c.hit)),
                float(np.mean(c.pages)),
                1e3 * heads * float(np.mean(c.search_s)),
                heads * float(np.mean(c.build_s)) if c.build_s else 0.0,
                len(c.build_s),
                float(np.mean(c.fill)) if c.fill else math.nan,
                float(np.mean(c.index_bytes)) if c.index_bytes else 0.0,
            )
        )
    return rows


def markdown(rows: list[Row], name: str, length: int) -> str:
    """A Markdown table of one (case, context)."""
    head = (
        "| policy | budget | mass recall | × oracle | top-k hit | body pages/head/step "
        "| select ms/step (all layers) | build s (all layers) | leaf fill | index B/token |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r.policy} | {r.budget} | {r.recall:.3f} | {r.vs_oracle:.3f} | {r.topk_hit:.3f} "
        f"| {r.pages:.1f} | {r.select_ms:.1f} | {r.build_s:.1f} "
        f"| {'—' if math.isnan(r.fill) else f'{r.fill:.2f}'} | {r.index_bytes:.0f} |"
        for r in sorted(rows, key=lambda r: (r.budget, POLICIES.index(r.policy)))
        if r.case == name and r.context == length
    ]
    return head + "\n".join(lines) + "\n"


def plot(
    rows: list[Row], panels: list[tuple[str, int]], path: Path, speed: list[SpeedRow] | None = None
) -> None:
    """Recall vs budget per policy for each panel, and select ms vs context (per-head rows,
    and the whole-layer batched search of ``speed``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4), squeeze=False)
    axes = list(grid[0])
    for ax, (name, length) in zip(axes, panels, strict=False):
        for policy in POLICIES:
            mine = sorted(
                (r for r in rows if (r.case, r.context, r.policy) == (name, length, policy)),
                key=lambda r: r.budget,
            )
            ax.plot([r.budget for r in mine], [r.recall for r in mine], "o-", label=policy)
        ax.set(title=f"{name}, {length} tokens", xlabel="budget (tokens)", ylabel="mass recall")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for policy in ("icecache", "icecache-r", "icecache-tokens", "kmeans", "quest", "oracle"):
        mine = sorted(
            (r for r in rows if r.case == "synthetic" and r.policy == policy and r.budget == 256),
            key=lambda r: r.context,
        )
        ax.plot([r.context for r in mine], [r.select_ms for r in mine], "o-", label=policy)
    for policy, style in (("icecache", "s-k"), ("icecache-tokens", "D--k")):
        layers = sorted((r for r in speed or [] if r.policy == policy), key=lambda r: r.context)
        if layers:
            ax.plot(
                [r.context for r in layers],
                [r.batched_ms for r in layers],
                style,
                label=f"{policy}, batched",
            )
    ax.axhline(10, color="grey", ls="--", lw=1, label="target 10 ms @32k")
    ax.set(
        title="selection, 8B shape, budget 256",
        xlabel="context (tokens)",
        ylabel="ms / decode step (all layers)",
    )
    if any(r.case == "synthetic" for r in rows):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- main
def int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int_tuple, default=(8192, 32768, 131072))
    p.add_argument("--budgets", type=int_tuple, default=(64, 128, 256))
    p.add_argument("--synthetic-layers", type=int_tuple, default=(2, 3, 4))
    p.add_argument("--synthetic-heads", type=int_tuple, default=(0, 1))
    p.add_argument("--steps", type=int, default=8, help="decode query steps per head")
    p.add_argument(
        "--real-contexts",
        type=int_tuple,
        default=(8192, 16384, 32768),
        help="real keys of the embedded model (past 8k with RoPE extrapolated); 0: none",
    )
    p.add_argument(
        "--speed-sizes", type=int_tuple, default=(8192, 32768), help="whole-layer timing"
    )
    p.add_argument(
        "--speed-policies",
        type=lambda text: tuple(x for x in text.split(",") if x),
        default=("icecache-tokens", "icecache"),
        help="policies timed (single tokens: the default policy; whole leaves)",
    )
    p.add_argument("--store-steps", type=int, default=256, help="decode steps per store run")
    p.add_argument("--store-runs", type=int, default=2)
    p.add_argument("--speed-repeats", type=int, default=5, help="passes over the queries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from cache_service import compiled

    compiled.warm_up()  # as a cache service does before it listens: no compile is timed
    measurer = Measurer(args.budgets, args.seed)
    rows: list[Row] = []
    meta: dict[str, object] = {}
    for context in (n for n in args.real_contexts if n):
        started = time.perf_counter()
        cases, prefill_s = real_cases(context, args.steps, args.seed)
        log.info(
            "real keys at %d in %.1f s (prefill %s)",
            context,
            time.perf_counter() - started,
            "replayed from its capture" if prefill_s is None else f"{prefill_s:.1f} s",
        )
        meta[f"real_prefill_s_{context}"] = prefill_s
        for case in cases:
            if case.layer >= DENSE_LAYERS:
                measurer.run("real", context, case)
        del cases
        rows += summarize(measurer.cells, layers=30, kv_heads=3)
        measurer.cells.clear()
        log.info("real case %d done", context)
    for n in args.sizes:
        started = time.perf_counter()
        for case in synthetic_cases(
            n, args.synthetic_layers, args.synthetic_heads, args.steps, args.seed
        ):
            measurer.run("synthetic", n, case)
        log.info("synthetic %d done in %.1f s", n, time.perf_counter() - started)
    rows += summarize(measurer.cells, layers=32, kv_heads=8)
    speed = []
    for n in args.speed_sizes:
        for policy in args.speed_policies:
            started = time.perf_counter()
            speed.append(
                measure_speed(
                    policy, n, args.store_steps, args.store_runs, args.speed_repeats, args.seed
                )
            )
            log.info("speed %s %d done in %.1f s", policy, n, time.perf_counter() - started)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta.update(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        args={k: str(v) for k, v in vars(args).items()},
    )
    (args.out_dir / "selection.json").write_text(
        json.dumps(
            {"meta": meta, "rows": [asdict(r) for r in rows], "speed": [asdict(r) for r in speed]},
            indent=1,
        )
    )
    panels = [(r.case, r.context) for r in rows]
    panels = list(dict.fromkeys(p for p in panels if p[0] == "real" or p[1] == 32768))
    plot(rows, panels, args.out_dir / "selection.png", speed)
    tables = [markdown(rows, *key) for key in dict.fromkeys((r.case, r.context) for r in rows)]
    if speed:
        tables.append(speed_markdown(speed))
    sys.stdout.write("\n".join(tables))
    log.info("wrote %s", args.out_dir)


if __name__ == "__main__":
    main()
