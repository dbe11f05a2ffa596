"""The engine: prefill and batched decode of a Llama-family model over a paged KV store.

Prefill is dense and cut into blocks of ``prefill_chunk`` tokens at fixed positions (0, B,
2B, ...): the prompt goes through the model a layer at a time; each block's K/V go to the
store, and it attends causally to itself and to the earlier blocks' K/V as the store holds
them. A prompt whose leading blocks the store keeps from an earlier prompt (prefix reuse,
``cache_service.prefix_cache``) starts after them: their K/V are read back, and every later
block computes exactly what it would have computed after prefilling them.
Decode is one token per sequence per step, batched across sequences: per layer the store
takes the new K/V and answers which pages each KV head attends to; the device page cache
makes them resident (on a CPU with the store in this process, attention reads them where
the store keeps them); paged sparse attention runs over them.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from cache_service.settings import positive_int, setting
from cache_service.types import (
    DEFAULT_POLICY,
    POLICIES,
    PrefixKeys,
    Selection,
    SequenceSpec,
    check_policy,
    kv_bytes,
)
from kernels.dispatch import decode_attention
from worker.dense_kv import DenseKV
from worker.kv_client import KVClient
from worker.model import LlamaModel, causal_attention
from worker.page_cache import DevicePageCache
from worker.sampling import GREEDY, SamplingParams, choose

log = logging.getLogger(__name__)

PREFILL_SPAN = 2048
"""Most prompt rows per linear-layer call in a CPU prefill (whole blocks): larger calls read
each weight once for more rows, and hold ``rows x intermediate`` activations."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine keeps and selects KV for the sequences it runs."""

    policy: str = setting(DEFAULT_POLICY, "Attention policy.", choices=POLICIES)
    budget: int | None = setting(
        256,
        "KV tokens attended per layer and KV head at a decode step (sinks and window "
        "included); ignored by full.",
        parse=positive_int,
    )
    dense_layers: int = setting(2, "The first layers attend fully under every policy.")
    sink_tokens: int | None = setting(
        None, "Always-attended first tokens (none: derived from the budget)."
    )
    recent_pages: int | None = setting(
        None, "Always-attended recent-window pages (none: as many as sink pages)."
    )
    reuse_group: int = setting(3, "icecache-r: layers sharing one leaf layout.")
    prefill_chunk: int = setting(
        256,
        "Prompt tokens per prefill block (a multiple of the page size): the prompt's K/V go "
        "to the store and attend a block at a time, and prompts share whole leading blocks.",
        parse=positive_int,
    )
    prefix_reuse: bool = setting(
        True,
        "Start a prompt from the leading blocks the cache service keeps of an earlier "
        "prompt instead of prefilling them again (same output either way), and offer each "
        "prompt's blocks for reuse; a request may turn it off for itself.",
    )
    device_cache_mb: int = setting(
        1024, "Device memory for resident KV pages (MiB).", parse=positive_int
    )
    dense_copy: bool = setting(
        True,
        "On a CPU device, the layers that attend to every token (all of them under full, the "
        "dense layers under every policy) keep their K/V contiguous and attend there, "
        "instead of gathering every page from the page cache at each step (faster; host "
        "memory as large as those layers' K/V). A GPU reads pages in place and ignores it.",
    )
    pages_in_place: bool = setting(
        True,
        "On a CPU device with the store in this process keeping K/V in the model's dtype, "
        "attention reads the selected pages where the store keeps them instead of copying "
        "them into the device page cache at each step (same output, no copy). A GPU, or a "
        "store in another process, always goes through the page cache.",
    )
    seed: int = setting(0, "Seed of the clustering.")
    allow_extrapolation: bool = setting(
        False,
        "Accept sequences longer than the model's max_position_embeddings, with RoPE "
        "extrapolated past the trained context (for offline measurement only: the model's "
        "output there is not what it was trained to give).",
    )

    def spec(self, model: LlamaModel) -> SequenceSpec:
        """The store's spec for one sequence of ``model`` under this config."""
        c = model.config
        return SequenceSpec(
            num_layers=c.num_layers,
            num_kv_heads=c.num_kv_heads,
            num_q_heads=c.num_heads,
            head_dim=c.head_dim,
            policy=self.policy,
            budget=None if self.policy == "full" else self.budget,
            sink_tokens=self.sink_tokens,
            recent_pages=self.recent_pages,
            dense_layers=self.dense_layers,
            reuse_group=self.reuse_group,
            seed=self.seed,
        )


@dataclass(frozen=True)
class PrefillRecord:
    """What a dense prefill of ``ids`` appended to the store, replayable into a new sequence
    under any policy (``Engine.start(ids, replay=record)``): the store then builds that
    policy's layout and index from it exactly as after a real prefill."""

    ids: tuple[int, ...]
    keys: list[np.ndarray]
    """Per layer ``[T, kv_heads, head_dim]`` (float32, or float16 from a disk capture)."""
    values: list[np.ndarray]
    logits: torch.Tensor
    """Logits of the last prompt token ``[vocab]``."""


@dataclass
class Sequence:
    """One sequence being generated: its id in the store and its tokens so far."""

    seq_id: str
    token_ids: list[int]
    prompt_len: int
    reused_tokens: int = 0
    """Prompt tokens taken from blocks the store kept (not prefilled here)."""
    finished: bool = False
    stored_ahead: int = 0
    """The first layers that already hold the next token fed (an adopted sequence whose
    worker died in the middle of a step): the next step selects for them without storing."""
    dense: DenseKV | None = None
    """The K/V of the layers that attend to every token, contiguous (on a CPU device, if
    any layer does; ``None`` on a GPU: paged there)."""

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class StepTimings:
    """Wall time spent in each part of decoding, in seconds."""

    prefill: float = 0.0
    prefill_tokens: int = 0
    store: float = 0.0
    load: float = 0.0
    attention: float = 0.0
    total: float = 0.0
    steps: int = 0
    kv_tokens: int = 0
    """KV tokens attended, summed over steps, sequences, layers and KV heads."""

    @property
    def decode_ms_per_step(self) -> float:
        return 1000 * self.total / max(1, self.steps)


class Engine:
    """Runs one model over one KV store with one policy configuration."""

    _ids = itertools.count()

    def __init__(self, model: LlamaModel, kv: KVClient, config: EngineConfig) -> None:
        check_policy(config.policy)
        self.model = model
        self.kv = kv
        self.config = config
        c = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        page_bytes = kv_bytes(kv.page_size, c.head_dim, self.dtype.itemsize)
        capacity = max(1, config.device_cache_mb * 2**20 // page_bytes)
        self.cache = DevicePageCache(capacity, kv.page_size, c.head_dim, self.dtype, self.device)
        self.in_place = self._pages_in_place(kv, config)
        """The store's pages as a tensor when attention reads them there (``None``: through
        ``cache``)."""
        self.scale = c.head_dim**-0.5
        self.timings = StepTimings()
        config.spec(model).validate(kv.page_size)
        if config.prefill_chunk % kv.page_size:
            raise ValueError(
                f"prefill_chunk ({config.prefill_chunk}) must be a multiple of the cache "
                f"service's page size ({kv.page_size})"
            )
        self.fingerprint = model_fingerprint(model)
        """Names the weights in prefix keys: blocks kept for one model never serve another."""

    def _pages_in_place(self, kv: KVClient, config: EngineConfig) -> torch.Tensor | None:
        if not config.pages_in_place or self.device.type != "cpu":
            return None
        pages = kv.pages_in_place()
        same = {torch.float32: np.float32, torch.float16: np.float16}.get(self.dtype)
        if pages is None or pages.dtype != same:
            return None  # a store keeping float16 for a float32 model: converted in the copy
        return torch.from_numpy(pages)

    # ---- sequences ---------------------------------------------------------------------
    def start(
        self,
        prompt_ids: list[int],
        seq_id: str | None = None,
        replay: PrefillRecord | None = None,
        spec: SequenceSpec | None = None,
        reuse_prefix: bool | None = None,
        index_blocks: bool = False,
    ) -> tuple[Sequence, torch.Tensor]:
        """Create a sequence in the store and prefill its prompt (or replay ``replay``, a
        recorded prefill of the same ids, instead of computing it). ``spec``: the store's
        spec of the sequence, when a request asks for another policy or budget than the
        engine's (default ``config.spec``). ``reuse_prefix``: start from leading blocks the
        store keeps and offer this prompt's (default ``config.prefix_reuse``; the output is
        the same either way). ``index_blocks``: with ``replay``, name the prompt's blocks
        anyway (reuse off), so that the indexed policies build over its whole blocks as a
        prefilled prompt's do (default: over the whole prompt, as the offline eval measured
        the method). On failure the sequence is released.

        Returns:
            the sequence and the logits of its last prompt token ``[vocab]``.
        """
        if replay is not None and replay.ids != tuple(prompt_ids):
            raise ValueError("the replayed prefill was recorded for other token ids")
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        limit = self.model.config.max_position_embeddings
        if len(prompt_ids) >= limit and not self.config.allow_extrapolation:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the model supports {limit}; "
                "shorten it"
            )
        spec = spec or self.config.spec(self.model)
        seq = self._sequence(seq_id or f"seq-{next(self._ids)}", list(prompt_ids), spec)
        reuse = self.config.prefix_reuse if reuse_prefix is None else reuse_prefix
        # The blocks also fix where an indexed policy builds its index (``PrefixKeys``),
        # so they are named with reuse off too: the output does not depend on it.
        named = replay is None or index_blocks
        blocks = self.prefix_keys(spec, prompt_ids, reuse and replay is None) if named else None
        started = time.perf_counter()
        seq.reused_tokens = self.kv.create(seq.seq_id, spec, _before_last(blocks, prompt_ids))
        try:
            if replay is not None:
                self.replay(seq.seq_id, replay, seq.dense)
                return seq, replay.logits.clone()
            logits = self.prefill(seq.seq_id, prompt_ids, reused=seq.reused_tokens, dense=seq.dense)
            if blocks is not None and blocks.reuse:
                self.kv.share_prefix(seq.seq_id, blocks)
        except BaseException:
            self.kv.release(seq.seq_id)
            raise
        self.timings.prefill += time.perf_counter() - started
        self.timings.prefill_tokens += len(prompt_ids) - seq.reused_tokens
        return seq, logits

    def prefix_keys(
        self, spec: SequenceSpec, prompt_ids: list[int], reuse: bool = True
    ) -> PrefixKeys | None:
        """The store's names of the prompt's whole prefill blocks (``None``: not one whole
        block): a hash chain over the blocks' token ids, started from the model, the
        sequence's spec, the block and the page size (everything the blocks' K/V and their
        layout depend on). ``reuse``: the store may start from blocks it keeps and keep
        these (else they only fix where an indexed policy builds its index)."""
        size = self.config.prefill_chunk
        if len(prompt_ids) < size:
            return None
        head = f"{spec!r}|{size}|{self.kv.page_size}".encode()
        key = hashlib.blake2b(self.fingerprint + head, digest_size=16).digest()
        ids = np.asarray(prompt_ids, dtype=np.int32)
        keys = []
        for start in range(0, len(ids) - size + 1, size):
            block = ids[start : start + size].tobytes()
            key = hashlib.blake2b(key + block, digest_size=16).digest()
            keys.append(key)
        return PrefixKeys(tuple(keys), size, reuse)

    def adopt(
        self,
        seq_id: str,
        replica: str,
        epoch: int,
        prompt_ids: list[int],
        fed: list[int],
        spec: SequenceSpec | None = None,
    ) -> Sequence:
        """Take over a sequence another worker left in the cache service (no prefill): its
        store holds ``prompt_ids`` and the generated tokens ``fed`` through decode steps, in
        every layer. Raises ``AdoptionRefused`` (rebuild it instead) or ``AdoptionConflict``."""
        tokens = [*prompt_ids, *fed]
        spec = spec or self.config.spec(self.model)
        ahead = self.kv.adopt(seq_id, replica, epoch, len(tokens), spec)
        seq = self._sequence(seq_id, tokens, spec, len(prompt_ids))
        seq.stored_ahead = ahead  # its dense copy fills from the store at the next step
        return seq

    def _sequence(
        self, seq_id: str, tokens: list[int], spec: SequenceSpec, prompt_len: int | None = None
    ) -> Sequence:
        copy = self.config.dense_copy and self.device.type == "cpu" and spec.full_layers > 0
        dense = DenseKV(self.device, spec.full_layers) if copy else None
        prompt = len(tokens) if prompt_len is None else prompt_len
        return Sequence(seq_id, tokens, prompt, dense=dense)

    def record_prefill(self, prompt_ids: list[int]) -> PrefillRecord:
        """A dense prefill of ``prompt_ids`` recorded for replay (its sequence is released)."""
        seq = Sequence(f"record-{next(self._ids)}", list(prompt_ids), len(prompt_ids))
        self.kv.create(seq.seq_id, self.config.spec(self.model))  # no prefix: all recorded
        keys: list[np.ndarray] = []
        values: list[np.ndarray] = []
        started = time.perf_counter()
        try:
            logits = self.prefill(seq.seq_id, prompt_ids, record=(keys, values))
        finally:
            self.kv.release(seq.seq_id)
        self.timings.prefill += time.perf_counter() - started
        self.timings.prefill_tokens += len(prompt_ids)
        return PrefillRecord(tuple(prompt_ids), keys, values, logits)

    def replay(self, seq_id: str, record: PrefillRecord, dense: DenseKV | None = None) -> None:
        """Append a recorded prefill's K/V to a new sequence, layer by layer (and to its
        ``dense`` copy, rounded as the store keeps them, for the layers it holds)."""
        positions = np.arange(len(record.ids), dtype=np.int64)
        for layer, (k, v) in enumerate(zip(record.keys, record.values, strict=True)):
            keys, values = np.asarray(k, dtype=np.float32), np.asarray(v, dtype=np.float32)
            self.kv.append(seq_id, layer, keys, values, positions)
            if dense is not None and dense.covers(layer):
                stored = (self._as_stored(torch.from_numpy(x)) for x in (keys, values))
                dense.fill(layer, *stored)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence's KV in the store."""
        self.kv.release(seq.seq_id)
        seq.finished = True

    # ---- prefill -----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        seq_id: str,
        token_ids: list[int],
        record: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
        reused: int = 0,
        dense: DenseKV | None = None,
    ) -> torch.Tensor:
        """Dense causal prefill, one layer at a time over the whole prompt; each layer's K/V
        go to the store a block of ``prefill_chunk`` tokens at a time (and, with ``record``,
        a copy to its key and value lists). The first ``reused`` tokens (whole blocks) are in
        the store already: their K/V are read back instead. ``dense``: the sequence's
        contiguous copy, filled with the layers it covers. Returns the last token's logits
        ``[vocab]``.

        Each block attends to itself and to the earlier blocks' K/V as the store holds them
        (rounded to its dtype, as a prefix read back is), so its output does not depend on
        whether they were computed now or reused. The linear layers run over spans of whole
        blocks (``_spans``).
        """
        model, block = self.model, self.config.prefill_chunk
        c, n = model.config, len(token_ids)
        assert reused % block == 0 and reused < n, "reuse whole blocks, prefill the last token"
        shape = (n, c.num_kv_heads, c.head_dim)
        keys = [
            torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)
        ]
        values = [torch.empty_like(k) for k in keys]
        if reused:
            self._read_prefix(seq_id, reused, keys, values)
        # Rows are the prompt's positions from ``reused`` on: row r is position reused + r.
        ids = torch.tensor(token_ids[reused:], dtype=torch.long, device=self.device)
        positions = torch.arange(reused, n, device=self.device)
        host_positions = positions.cpu().numpy()
        cos, sin = model.rope.cos_sin(positions)  # [rows, D], shared by every layer
        h = model.embed(ids)  # [rows, hidden]
        spans = self._spans(n - reused)
        last = c.num_layers - 1
        bar = tqdm(
            total=c.num_layers, desc="prefill", unit="layer",
            disable=not sys.stderr.isatty(), leave=False,
        )  # fmt: skip
        for layer in range(c.num_layers):
            layer_k, layer_v = keys[layer], values[layer]
            host: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
            for s, e in spans:
                q, k, v = model.attention_inputs(
                    layer, h[s:e], positions[s:e], (cos[s:e], sin[s:e])
                )
                host_k, host_v = _np(k), _np(v)
                blocks = [(b, min(b + block, e)) for b in range(s, e, block)]
                for b, f in blocks:
                    rows = slice(b - s, f - s)
                    self.kv.append(seq_id, layer, host_k[rows], host_v[rows], host_positions[b:f])
                if record is not None:  # views of k and v, copied by the concatenation below
                    host[0].append(host_k)
                    host[1].append(host_v)
                layer_k[reused + s : reused + e] = self._as_stored(k)
                layer_v[reused + s : reused + e] = self._as_stored(v)
                if layer < last:
                    attn = torch.empty_like(q)
                    for b, f in blocks:
                        rows, end = slice(b - s, f - s), reused + f
                        attn[rows] = causal_attention(
                            q[rows], layer_k[:end], layer_v[:end], self.scale
                        )
                    h[s:e] = model.attention_output(layer, h[s:e], attn)
                elif e == n - reused:  # only the prompt's last row goes on, to the logits
                    attn = causal_attention(q[-1:], layer_k, layer_v, self.scale)
                    h = model.attention_output(layer, h[-1:], attn)
            if record is not None:
                record[0].append(np.concatenate(host[0]))
                record[1].append(np.concatenate(host[1]))
            bar.update()
        bar.close()
        if dense is not None:
            for layer in range(dense.layers):
                dense.fill(layer, keys[layer], values[layer])
        return model.logits(h)[0]

    def _spans(self, rows: int) -> list[tuple[int, int]]:
        """The prefill's row ranges for its linear layers (``rows`` from a block boundary):
        runs of whole blocks up to ``PREFILL_SPAN`` rows, then the last partial block
        alone. Each run reads every weight matrix once instead of once per block.

        A row's product must not depend on the span it runs in, or a prompt started from
        kept blocks would differ from its whole prefill. The last partial block is always
        computed alone, so its shape is the same either way. Whole blocks rely on the CPU
        BLAS giving a row the same bits in any call of whole blocks (MKL's blocked kernels
        do: ``tests/worker/test_prefill_spans.py`` checks it for the model's shapes);
        another device's BLAS may pick kernels by shape, so there a span is one block.
        """
        block = self.config.prefill_chunk
        width = max(block, PREFILL_SPAN // block * block) if self.device.type == "cpu" else block
        whole = rows - rows % block
        spans = [(s, min(s + width, whole)) for s in range(0, whole, width)]
        return spans + [(whole, rows)] if whole < rows else spans

    def _read_prefix(
        self, seq_id: str, tokens: int, keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> None:
        """Fill rows ``:tokens`` of every layer's ``keys`` / ``values`` ``[n, H, D]`` from the
        sequence's positional pages in the store."""
        size = self.kv.page_size
        for layer in range(len(keys)):
            pages = self.kv.positional_pages(seq_id, layer)[:, : tokens // size]  # [H, p]
            heads, count = pages.shape
            data = self.kv.read_pages(pages.ravel())  # [H * p, 2, P, D]
            data = data.reshape(heads, count, 2, size, -1).transpose(2, 1, 3, 0, 4)
            kv = torch.from_numpy(np.ascontiguousarray(data).reshape(2, tokens, heads, -1))
            keys[layer][:tokens] = kv[0].to(self.device, self.dtype)
            values[layer][:tokens] = kv[1].to(self.device, self.dtype)

    def _as_stored(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` rounded as the store keeps it (a float16 store rounds; float32 keeps float32,
        bfloat16 and float16 exactly)."""
        return t.to(torch.float16).to(t.dtype) if self.kv.dtype == "float16" else t

    # ---- decode ------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_step(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """Feed one token per sequence; returns next-token logits ``[B, vocab]``.

        The token is appended to each sequence's ``token_ids``.
        """
        started = time.perf_counter()
        model = self.model
        for seq, token in zip(seqs, tokens, strict=True):
            seq.token_ids.append(token)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        host_positions = np.array([s.length - 1 for s in seqs], dtype=np.int64)  # [B]
        positions = torch.from_numpy(host_positions).to(self.device)
        h = model.embed(ids)  # [B, hidden]
        rope = model.rope.cos_sin(positions)  # [B, D] x2, shared by every layer
        for layer in range(model.config.num_layers):
            q, k, v = model.attention_inputs(layer, h, positions, rope)  # [B, H, D]
            t0 = time.perf_counter()
            if self._copied(layer, seqs):
                self.kv.append_step(layer, [s.seq_id for s in seqs], _np(k), _np(v), host_positions)
                sels = None
            else:
                sels = self._select(layer, seqs, _np(k), _np(v), host_positions, _np(q))
            t1 = time.perf_counter()
            loading = self.timings.load
            attn = self._attend(layer, seqs, q, k, v, sels)
            h = model.attention_output(layer, h, attn)
            self.timings.store += t1 - t0
            self.timings.attention += time.perf_counter() - t1 - (self.timings.load - loading)
        for seq in seqs:
            seq.stored_ahead = 0
        logits = model.logits(h)
        self.timings.total += time.perf_counter() - started
        self.timings.steps += 1
        return logits

    @staticmethod
    def _copied(layer: int, seqs: list[Sequence]) -> bool:
        """Whether every sequence attends to ``layer`` over its contiguous copy, which holds
        the layer already: the store then only stores the step's token (no selection)."""
        return all(
            s.dense is not None
            and s.dense.covers(layer)
            and s.dense.holds(layer)
            and layer >= s.stored_ahead
            for s in seqs
        )

    def _select(
        self,
        layer: int,
        seqs: list[Sequence],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray,
    ) -> list[Selection]:
        """Store each sequence's token in ``layer`` and select its pages (one ``decode`` for
        the batch); a sequence whose ``layer`` holds the token already only selects."""
        ids = [s.seq_id for s in seqs]
        ahead = [i for i, s in enumerate(seqs) if layer < s.stored_ahead]
        if not ahead:
            return self.kv.decode(layer, ids, keys, values, positions, queries)
        rows = [i for i in range(len(seqs)) if i not in ahead]
        out: dict[int, Selection] = {}
        if rows:
            batch = [ids[i] for i in rows]
            sels = self.kv.decode(layer, batch, keys[rows], values[rows], positions[rows],
                                  queries[rows])  # fmt: skip
            out.update(zip(rows, sels, strict=True))
        for i in ahead:
            out[i] = self.kv.retrieve(ids[i], layer, queries[i])
        return [out[i] for i in range(len(seqs))]

    def _attend(
        self,
        layer: int,
        seqs: list[Sequence],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sels: list[Selection] | None,
    ) -> torch.Tensor:
        """Attention of one layer's queries ``[B, Hq, D]``: a sequence whose contiguous copy
        covers the layer over that copy, the others over their selected pages (rows are
        independent, so the split does not change any row). ``sels`` is ``None`` when every
        sequence's copy holds the layer (``_copied``)."""
        started = time.perf_counter()
        dense = [i for i, s in enumerate(seqs) if s.dense is not None and s.dense.covers(layer)]
        copies = [
            self._to_dense(seqs[i], layer, k[i], v[i], None if sels is None else sels[i])
            for i in dense
        ]
        self.timings.kv_tokens += sum(copy.length(layer) * k.shape[1] for copy in copies)
        paged = [i for i in range(len(seqs)) if i not in dense]
        table = None
        if paged:
            assert sels is not None, "a sequence attending over pages needs its selection"
            table = self._page_table([sels[i] for i in paged])
        self.timings.load += time.perf_counter() - started
        if not dense:
            assert table is not None
            return self._paged_attention(q, table)
        attn = torch.empty_like(q)
        for i, copy in zip(dense, copies, strict=True):
            attn[i] = copy.attend(layer, q[i], self.scale)
        if table is not None:
            attn[paged] = self._paged_attention(q[paged], table)
        return attn

    def _paged_attention(self, q: torch.Tensor, table: PageTable) -> torch.Tensor:
        pages = self.cache.kv if self.in_place is None else self.in_place
        return decode_attention(
            q, pages, table.indptr, table.slots, table.lens, self.scale, table.longest
        )

    def _to_dense(
        self, seq: Sequence, layer: int, k: torch.Tensor, v: torch.Tensor, sel: Selection | None
    ) -> DenseKV:
        """Put this step's token (``k``, ``v`` ``[kv_heads, head_dim]``) into the sequence's
        contiguous copy of ``layer``; a copy not filled yet (a sequence taken over from
        another worker) is filled from the store's pages the selection names, this token
        included. Returns the copy."""
        dense = seq.dense
        assert dense is not None
        if not dense.holds(layer):
            assert sel is not None, "a copy not filled yet needs the store's selection"
            dense.fill_from_pages(layer, self.kv.read_pages(sel.pages, sel.versions), sel)
        elif dense.length(layer) < seq.length:
            dense.append(layer, self._as_stored(k), self._as_stored(v))
        if dense.length(layer) != seq.length:
            raise RuntimeError(
                f"{seq.seq_id}: layer {layer} holds {dense.length(layer)} tokens, the "
                f"sequence {seq.length}"
            )
        return dense

    def _page_table(self, sels: list[Selection]) -> PageTable:
        """CSR page table over rows ``b * kv_heads + h`` with device slots (the store's page
        ids where attention reads the pages in place)."""
        pages = np.concatenate([s.pages for s in sels])
        versions = np.concatenate([s.versions for s in sels])
        lens = np.concatenate([s.lens for s in sels])
        counts = np.concatenate([np.diff(s.indptr) for s in sels])
        indptr = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        if self.in_place is None:
            slots = self.cache.resolve(pages, versions, self.kv.read_pages)
        else:
            slots = torch.from_numpy(pages.astype(np.int32))
        self.timings.kv_tokens += int(lens.sum())
        return PageTable(
            _to_device(indptr, self.device),
            slots,
            _to_device(lens, self.device),
            int(counts.max()) if counts.size else 0,
        )

    # ---- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
        sampling: SamplingParams = GREEDY,
    ) -> list[int]:
        """Generation for one prompt (greedy by default); returns the new tokens (stop token
        included)."""
        return list(self.stream(prompt_ids, max_new_tokens, stop_ids, sampling))

    def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
        sampling: SamplingParams = GREEDY,
    ) -> Generator[int, None, None]:
        """``generate``'s tokens as they are chosen; closing the iterator early ends the
        sequence (its KV is released)."""
        sampling = sampling.seeded()
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return
        seq, logits = self.start(prompt_ids)
        try:
            for step in range(max_new_tokens):
                token = choose(logits, sampling, step=step)
                yield token
                if token in stop_ids or step + 1 == max_new_tokens:
                    break
                logits = self.decode_step([seq], [token])[0]
        finally:
            self.finish(seq)

    def generate_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
        sampling: SamplingParams = GREEDY,
    ) -> list[list[int]]:
        """Generation for several prompts, decode steps batched across them; each token is
        ``worker.sampling.choose`` at its position (greedy by default; an unseeded sampled
        call draws a seed, so give one to reproduce it)."""
        sampling = sampling.seeded()
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        seqs: list[Sequence] = []
        outputs: list[list[int]] = [[] for _ in prompts]
        next_tokens: list[int] = []
        try:
            for prompt in prompts:
                seq, logits = self.start(prompt)
                seqs.append(seq)
                next_tokens.append(choose(logits, sampling, step=0))
            for _ in range(max_new_tokens):
                live = [i for i, s in enumerate(seqs) if not s.finished]
                if not live:
                    break
                for i in live:
                    outputs[i].append(next_tokens[i])
                    if next_tokens[i] in stop_ids or len(outputs[i]) == max_new_tokens:
                        self.finish(seqs[i])
                live = [i for i in live if not seqs[i].finished]
                if not live:
                    break
                logits = self.decode_step([seqs[i] for i in live], [next_tokens[i] for i in live])
                for row, i in enumerate(live):
                    next_tokens[i] = choose(logits[row], sampling, step=len(outputs[i]))
        finally:
            for s in seqs:
                if not s.finished:
                    self.finish(s)
        return outputs


def model_fingerprint(model: LlamaModel) -> bytes:
    """A 16-byte name of a model's weights: its config and the first values of every
    parameter (enough to tell two checkpoints apart, in milliseconds)."""
    digest = hashlib.blake2b(repr(model.config).encode(), digest_size=16)
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().flatten()[:64].to("cpu", torch.float32).numpy().tobytes())
    return digest.digest()


def _before_last(blocks: PrefixKeys | None, prompt_ids: list[int]) -> PrefixKeys | None:
    """The blocks that end before the prompt's last token (which is always prefilled: its
    logits are the first output)."""
    if blocks is None:
        return None
    whole = (len(prompt_ids) - 1) // blocks.block_tokens
    return PrefixKeys(blocks.keys[:whole], blocks.block_tokens, blocks.reuse) if whole else None


def _np(t: torch.Tensor) -> np.ndarray:
    """A float32 host copy (a view on CPU) of a tensor for the store."""
    return t.detach().to("cpu", torch.float32).numpy()


class PageTable(NamedTuple):
    """The CSR page table of one decode attention call, on the device."""

    indptr: torch.Tensor
    """``[rows + 1]`` int32 row pointers, rows ``b * kv_heads + h``."""
    slots: torch.Tensor
    """``[nnz]`` int32 device cache slots of the selected pages (or their ids in the store's
    page array, read in place)."""
    lens: torch.Tensor
    """``[nnz]`` int32 valid tokens of each page."""
    longest: int
    """Pages of the longest row (known on the host: the GPU kernel's launch needs it)."""


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int32 tensor of ``a`` on ``device``."""
    t = torch.from_numpy(a.astype(np.int32))
    return t if device.type == "cpu" else t.to(device)
