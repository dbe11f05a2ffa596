"""The KV store: many sequences' pages, laid out and selected by their policies.

Pure bookkeeping over ids and numpy arrays; the gRPC servicer and the worker's in-process
client both wrap it. Keys and values arrive post-RoPE, one (layer, KV head) at a time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from cache_service.head_layout import HeadLayout
from cache_service.page_pool import PagePool
from cache_service.policies import Body, make_bodies
from cache_service.types import Selection, SequenceExists, SequenceSpec, UnknownSequence


@dataclass
class _Sequence:
    spec: SequenceSpec
    heads: list[list[HeadLayout]]  # [layer][kv head]
    bodies: list[list[Body]]  # [layer][kv head]
    pending: list[list[list[int]]]  # [layer][kv head]: pages waiting for the body (prefill)
    flushed: list[bool]  # [layer]: the body has taken its prefill pages


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store's occupancy."""

    sequences: int
    pages_used: int
    pages_total: int
    page_bytes: int

    @property
    def bytes_used(self) -> int:
        return self.pages_used * self.page_bytes


class Store:
    """Holds the KV pages of many sequences and answers which pages each query attends."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._seqs: dict[str, _Sequence] = {}
        self._lock = threading.RLock()

    # ---- lifecycle -------------------------------------------------------------------
    def create(self, seq_id: str, spec: SequenceSpec) -> None:
        """Start an empty sequence. Raises ``ValueError`` for a bad spec or a taken id."""
        spec.validate(self.pool.page_size)
        if spec.head_dim != self.pool.head_dim:
            raise ValueError(
                f"head_dim {spec.head_dim} does not match the store's pages ({self.pool.head_dim})"
            )
        with self._lock:
            if seq_id in self._seqs:
                raise SequenceExists(f"sequence {seq_id!r} already exists; release it first")
            size = self.pool.page_size
            sinks, window = spec.sinks(size), spec.window_pages(size)
            heads = [
                [HeadLayout(self.pool, sinks, window) for _ in range(spec.num_kv_heads)]
                for _ in range(spec.num_layers)
            ]
            pending: list[list[list[int]]] = [
                [[] for _ in range(spec.num_kv_heads)] for _ in range(spec.num_layers)
            ]
            self._seqs[seq_id] = _Sequence(
                spec, heads, make_bodies(spec, self.pool), pending, [False] * spec.num_layers
            )

    def release(self, seq_id: str) -> None:
        """Free every page of a sequence."""
        with self._lock:
            seq = self._get(seq_id)
            for layer in range(seq.spec.num_layers):
                for head in range(seq.spec.num_kv_heads):
                    seq.heads[layer][head].release()
                    self.pool.free(np.asarray(seq.pending[layer][head], dtype=np.int64))
                    seq.bodies[layer][head].release()
            del self._seqs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def spec(self, seq_id: str) -> SequenceSpec:
        return self._get(seq_id).spec

    def length(self, seq_id: str, layer: int = 0) -> int:
        """Tokens stored for ``layer`` of a sequence."""
        return self._get(seq_id).heads[layer][0].length

    # ---- data ------------------------------------------------------------------------
    def append(
        self, seq_id: str, layer: int, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> None:
        """Store the next tokens of one layer (a prefill chunk or decoded tokens).

        Args:
            keys, values: ``[T, num_kv_heads, head_dim]`` post-RoPE.
            positions: ``[T]``, continuing the layer's length.
        """
        with self._lock:
            seq = self._get(seq_id)
            self._check_append(seq, layer, keys, values, positions)
            for head in range(seq.spec.num_kv_heads):
                evicted = seq.heads[layer][head].append(keys[:, head], values[:, head], positions)
                if not evicted:
                    continue
                if seq.flushed[layer]:
                    seq.bodies[layer][head].add(np.asarray(evicted, dtype=np.int64))
                else:
                    seq.pending[layer][head].extend(evicted)

    def retrieve(self, seq_id: str, layer: int, queries: np.ndarray) -> Selection:
        """The pages one layer's query attends to: sinks, selected body pages, recent window.

        Args:
            queries: ``[num_q_heads, head_dim]`` post-RoPE query of the current token.
        """
        with self._lock:
            seq = self._get(seq_id)
            spec = seq.spec
            self._check_layer(seq, layer)
            if queries.shape != (spec.num_q_heads, spec.head_dim):
                raise ValueError(
                    f"queries must have shape ({spec.num_q_heads}, {spec.head_dim}), "
                    f"got {tuple(queries.shape)}"
                )
            self._flush(seq, layer)
            group = spec.num_q_heads // spec.num_kv_heads
            dense = layer < spec.dense_layers or spec.policy == "full"
            max_tokens = spec.body_budget(self.pool.page_size)
            parts = []
            for head in range(spec.num_kv_heads):
                body = seq.bodies[layer][head]
                if dense or max_tokens is None:
                    chosen = body.all_pages()
                else:
                    chosen = body.select(queries[head * group : (head + 1) * group], max_tokens)
                lay = seq.heads[layer][head]
                parts.append(np.concatenate([lay.sink_pages(), chosen, lay.window_pages_now()]))
            return self._selection(parts)

    def decode(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray,
    ) -> list[Selection]:
        """One decode step of one layer for a batch: store each new token, then select.

        Args:
            keys, values: ``[B, num_kv_heads, head_dim]``.
            positions: ``[B]``.
            queries: ``[B, num_q_heads, head_dim]``.
        """
        out = []
        for b, seq_id in enumerate(seq_ids):
            self.append(seq_id, layer, keys[b : b + 1], values[b : b + 1], positions[b : b + 1])
            out.append(self.retrieve(seq_id, layer, queries[b]))
        return out

    def read_pages(self, pages: np.ndarray) -> np.ndarray:
        """Copy of page data ``[n, 2, page_size, head_dim]`` (the RPC data path)."""
        return self.pool.data[np.asarray(pages, dtype=np.int64)]

    def stats(self) -> StoreStats:
        return StoreStats(
            len(self._seqs), self.pool.num_used, self.pool.num_pages, self.pool.page_bytes
        )

    # ---- helpers ---------------------------------------------------------------------
    def _get(self, seq_id: str) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequence(seq_id) from None

    def _flush(self, seq: _Sequence, layer: int) -> None:
        if seq.flushed[layer]:
            return
        for head in range(seq.spec.num_kv_heads):
            pages = np.asarray(seq.pending[layer][head], dtype=np.int64)
            seq.pending[layer][head] = []
            if pages.size:
                seq.bodies[layer][head].add(pages)
        seq.flushed[layer] = True

    def _selection(self, parts: list[np.ndarray]) -> Selection:
        pages = np.concatenate(parts).astype(np.int64)
        indptr = np.zeros(len(parts) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(p) for p in parts])
        return Selection(
            indptr, pages, self.pool.fill[pages].copy(), self.pool.version[pages].copy()
        )

    @staticmethod
    def _check_layer(seq: _Sequence, layer: int) -> None:
        if not 0 <= layer < seq.spec.num_layers:
            raise ValueError(f"layer {layer} is out of range 0..{seq.spec.num_layers - 1}")

    def _check_append(
        self,
        seq: _Sequence,
        layer: int,
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        self._check_layer(seq, layer)
        spec = seq.spec
        shape = (len(positions), spec.num_kv_heads, spec.head_dim)
        if keys.shape != shape or values.shape != shape:
            raise ValueError(
                f"keys and values must have shape {shape} (tokens, kv heads, head dim), "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        start = seq.heads[layer][0].length
        if not np.array_equal(positions, np.arange(start, start + len(positions))):
            raise ValueError(
                f"positions of layer {layer} must continue at {start} without gaps, "
                f"got {positions[:4].tolist()}..."
            )
