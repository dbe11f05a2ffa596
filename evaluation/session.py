"""One model, one KV store and one engine per (policy, budget) for a whole accuracy run.

Prefill is dense and identical under every policy, so the session computes it once per
input and replays its per-layer K/V into each policy's new sequence (the store then builds
that policy's layout and index from them, exactly as after a real prefill). Every decode
step runs the engine's real sparse path.

With a ``PrefillStore`` the prefill is also kept on disk (float16) and later runs replay it
without computing it; then every policy, ``full`` included, decodes over the same float16-
rounded prefill K/V (as a GPU holding its cache in half precision would), so all of them
still see identical inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from cache_service.settings import same_as, setting
from cache_service.types import PrefixKeys, Selection, SequenceSpec, kv_bytes
from evaluation.capture import Capture, PrefillStore
from worker.engine import Engine, EngineConfig, PrefillRecord, Sequence
from worker.kv_client import KVClient, LocalKVClient
from worker.model import LlamaModel
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DecodeObserver = Callable[[int, np.ndarray, np.ndarray, list[Selection]], None]
"""Called after each layer's decode with (layer, keys [B, Hkv, D], queries [B, Hq, D],
selections)."""


@dataclass(frozen=True)
class SessionConfig:
    """How the session's engines are configured besides policy and budget: these settings
    of ``EngineConfig``, declared (default and help) there."""

    dense_layers: int = same_as(EngineConfig, "dense_layers")
    seed: int = same_as(EngineConfig, "seed")
    allow_extrapolation: bool = same_as(EngineConfig, "allow_extrapolation")
    index_blocks: bool = setting(
        False,
        "Build the indexed policies' index as a worker does: over the prompt's whole "
        "prefill blocks, the tokens after them inserted (default: over the whole prompt).",
    )


def _from_capture(ids: tuple[int, ...], capture: Capture) -> PrefillRecord:
    return PrefillRecord(
        ids,
        list(capture.keys),
        list(capture.values),
        torch.from_numpy(np.array(capture.logits, dtype=np.float32)),
    )


@dataclass(frozen=True)
class ForcedSteps:
    """What each teacher-forced decode step produced."""

    logits: torch.Tensor
    """Next-token logits ``[N, vocab]`` float32."""
    hidden: torch.Tensor
    """Final hidden state after the last norm, before the LM head ``[N, hidden]`` float32."""


class TapKV(KVClient):
    """A ``KVClient`` that forwards everything and lets the session watch each decode."""

    def __init__(self, inner: KVClient) -> None:
        self.inner = inner
        self.page_size = inner.page_size
        self.dtype = inner.dtype
        self.observer: DecodeObserver | None = None

    def create(self, seq_id: str, spec: SequenceSpec, prefix: PrefixKeys | None = None) -> int:
        return self.inner.create(seq_id, spec, prefix)

    def share_prefix(self, seq_id: str, prefix: PrefixKeys) -> int:
        return self.inner.share_prefix(seq_id, prefix)

    def positional_pages(self, seq_id: str, layer: int) -> np.ndarray:
        return self.inner.positional_pages(seq_id, layer)

    def append(
        self, seq_id: str, layer: int, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> None:
        self.inner.append(seq_id, layer, keys, values, positions)

    def decode(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray,
    ) -> list[Selection]:
        sels = self.inner.decode(layer, seq_ids, keys, values, positions, queries)
        if self.observer is not None:
            self.observer(layer, keys, queries, sels)
        return sels

    def append_step(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        """Not watched: the session's engines keep no contiguous copy (``dense_copy``), so
        each of their layers decodes, and an observer sees every layer."""
        self.inner.append_step(layer, seq_ids, keys, values, positions)

    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        return self.inner.retrieve(seq_id, layer, queries)

    def read_pages(self, pages: np.ndarray, versions: np.ndarray | None = None) -> np.ndarray:
        return self.inner.read_pages(pages, versions)

    def release(self, seq_id: str) -> None:
        self.inner.release(seq_id)


class Session:
    """Runs inputs under many policies with one loaded model and one store."""

    def __init__(
        self, model: LlamaModel, tokenizer: Tokenizer, kv: LocalKVClient, config: SessionConfig
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.store = kv.store
        """The in-process store: probes read which positions a selection's pages hold."""
        self.kv = TapKV(kv)
        self.config = config
        self._engines: dict[tuple[str, int | None], Engine] = {}
        self._sized: dict[tuple[str, int | None], int] = {}
        self._prefill: PrefillRecord | None = None
        self._seq_ids = iter(range(1 << 62))
        self.prefills: PrefillStore | None = None
        """Where dense prefills are kept on disk (``None``: computed once per run)."""
        self.prefills_computed = 0
        """Dense prefills this session computed (the rest were replayed)."""

    @property
    def max_positions(self) -> int:
        """The longest sequence the session accepts (the trained context, unless
        extrapolation is allowed)."""
        if self.config.allow_extrapolation:
            return 1 << 31
        return self.model.config.max_position_embeddings

    @property
    def trained_positions(self) -> int:
        """The context the model was trained to."""
        return self.model.config.max_position_embeddings

    def engine(self, policy: str, budget: int | None, max_len: int) -> Engine:
        """The engine of ``policy`` at ``budget`` (``None`` for full) for sequences of up to
        ``max_len`` tokens; made on first use (again if a longer sequence comes).

        Every layer of every policy attends through the page table (no contiguous copy of
        the dense layers, as on a GPU), so that ``full`` and a policy differ only in what
        they select: one whose selection covers the context scores exactly full's."""
        key = (policy, None if policy == "full" else budget)
        if key not in self._engines or self._sized[key] < max_len:
            config = EngineConfig(
                policy=policy,
                budget=key[1],
                dense_layers=self.config.dense_layers,
                device_cache_mb=self._cache_mb(key[1], max_len),
                seed=self.config.seed,
                allow_extrapolation=self.config.allow_extrapolation,
                dense_copy=False,  # one arithmetic for every policy: see below
            )
            self._engines[key] = Engine(self.model, self.kv, config)
            self._sized[key] = max_len
        return self._engines[key]

    def _cache_mb(self, budget: int | None, max_len: int) -> int:
        """Device page-cache size that holds every layer's pages of one step."""
        c, size = self.model.config, self.kv.page_size
        full_pages = math.ceil(max_len / size) + 2
        pages = full_pages if budget is None else min(full_pages, 2 * budget // size + 4)
        dense = min(self.config.dense_layers, c.num_layers)
        total = c.num_kv_heads * (dense * full_pages + (c.num_layers - dense) * pages)
        page_bytes = kv_bytes(size, c.head_dim, self.model.dtype.itemsize)
        return int(min(1024, max(16, math.ceil(1.2 * total * page_bytes / 2**20))))

    # ---- sequences -------------------------------------------------------------------
    def start(self, engine: Engine, ids: list[int]) -> tuple[Sequence, torch.Tensor]:
        """Like ``engine.start``, with the dense prefill computed once per distinct input
        (and, with ``prefills``, once across runs) and replayed into each new sequence."""
        key = tuple(ids)
        if self._prefill is None or self._prefill.ids != key:
            self._prefill = None
            capture = None if self.prefills is None else self.prefills.load(key)
            if capture is None:
                record = engine.record_prefill(ids)
                self.prefills_computed += 1
                if self.prefills is not None:
                    logits = record.logits.float().numpy()
                    capture = self.prefills.save(key, record.keys, record.values, logits)
            self._prefill = record if capture is None else _from_capture(key, capture)
        return engine.start(
            ids,
            f"eval-{next(self._seq_ids)}",
            replay=self._prefill,
            index_blocks=self.config.index_blocks,
        )

    def prefill_keys(self, ids: list[int]) -> list[np.ndarray]:
        """Per-layer prefill keys ``[T, Hkv, D]`` float32 of ``ids`` (after a ``start`` of
        them), as the store holds them."""
        assert self._prefill is not None and self._prefill.ids == tuple(ids), "start first"
        return [np.asarray(k, dtype=np.float32) for k in self._prefill.keys]

    def forget(self) -> None:
        """Drop the cached prefill (call between inputs to bound memory)."""
        self._prefill = None

    @contextmanager
    def observing(self, observer: DecodeObserver) -> Iterator[None]:
        """Call ``observer`` after every layer's decode while the block runs."""
        self.kv.observer = observer
        try:
            yield
        finally:
            self.kv.observer = None

    # ---- decoding --------------------------------------------------------------------
    def greedy(
        self, engine: Engine, ids: list[int], max_new: int, stop_ids: frozenset[int] = frozenset()
    ) -> list[int]:
        """Greedy tokens after ``ids`` (a stop token is included and ends generation)."""
        seq, logits = self.start(engine, ids)
        out: list[int] = []
        try:
            token = int(torch.argmax(logits))
            while max_new > 0:
                out.append(token)
                if token in stop_ids or len(out) == max_new:
                    break
                token = int(torch.argmax(engine.decode_step([seq], [token])[0]))
        finally:
            engine.finish(seq)
        return out

    def teacher_forced(self, engine: Engine, ids: list[int], prefix: int) -> tuple[float, int]:
        """Summed NLL of ``ids[prefix:]``, each decoded after the true tokens before it.

        ``ids[:prefix]`` is prefilled; then every true token is fed with ``decode_step`` so
        each scored prediction comes from the policy's sparse attention.
        """
        if not 0 < prefix < len(ids):
            raise ValueError(f"prefix {prefix} must be inside the sequence of {len(ids)} tokens")
        seq, logits = self.start(engine, ids[:prefix])
        nll = -float(torch.log_softmax(logits.float(), -1)[ids[prefix]])
        try:
            for t in range(prefix, len(ids) - 1):
                logits = engine.decode_step([seq], [ids[t]])[0]
                nll -= float(torch.log_softmax(logits.float(), -1)[ids[t + 1]])
        finally:
            engine.finish(seq)
        return nll, len(ids) - prefix

    def teacher_forced_steps(self, engine: Engine, ids: list[int], prefix: int) -> ForcedSteps:
        """Logits and final normed hidden state after feeding each of ``ids[prefix:]``.

        ``ids[:prefix]`` is prefilled (dense, identical under every policy); then every
        true token is fed with ``decode_step``, so step ``i`` predicts ``ids[prefix + i + 1]``
        from the policy's sparse attention. The hidden state is the output of the model's
        final norm, observed with a forward hook during the decode steps.
        """
        if not 0 < prefix < len(ids):
            raise ValueError(f"prefix {prefix} must be inside the sequence of {len(ids)} tokens")
        seq, _ = self.start(engine, ids[:prefix])
        hidden: list[torch.Tensor] = []
        hook = engine.model.norm.register_forward_hook(
            lambda _module, _inputs, out: hidden.append(out.detach().float())
        )
        logits = []
        try:
            for t in range(prefix, len(ids)):
                logits.append(engine.decode_step([seq], [ids[t]])[0].float())
        finally:
            hook.remove()
            engine.finish(seq)
        assert len(hidden) == len(logits), "the final norm runs once per decode step"
        return ForcedSteps(torch.stack(logits), torch.cat(hidden))
