"""The KV store: many sequences' pages, laid out and selected by their policies.

Pure bookkeeping over ids and numpy arrays; the gRPC servicer and the worker's in-process
client both wrap it. Keys and values arrive post-RoPE, one (layer, KV head) at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from cache_service.head_layout import HeadLayout
from cache_service.page_pool import PagePool, PoolExhausted
from cache_service.policies import Body, make_bodies
from cache_service.policies.indexed import IndexedBody, MirroredBody, select_layer
from cache_service.prefix_cache import PrefixCache, PrefixStats
from cache_service.types import (
    INDEXED_POLICIES,
    LEAF_PAGE_POLICIES,
    OutOfOrder,
    PrefixKeys,
    Selection,
    SequenceExists,
    SequenceFailed,
    SequenceSpec,
    TooManySequences,
    UnknownSequence,
)


@dataclass
class _Sequence:
    spec: SequenceSpec
    heads: list[list[HeadLayout]]  # [layer][kv head]
    bodies: list[list[Body]]  # [layer][kv head]
    pending: list[list[list[int]]]  # [layer][kv head]: pages waiting for the body (prefill)
    flushed: list[bool]  # [layer]: the body has taken its prefill pages
    failed: str = ""  # why a request left it half-changed ('' while usable)
    build_at: int | None = None
    """Indexed bodies build over the tokens handed over by this length (the prompt's whole
    blocks) and insert the later ones (``None``: build over all the prefill)."""
    index_key: bytes | None = None
    """The block under which the index built there is kept and found (``None``: not shared)."""
    meta: list[int] = field(default_factory=list)
    """[layer]: bytes of its bodies' own state outside the pool (``Body.nbytes``)."""


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store's occupancy."""

    sequences: int
    pages_used: int
    pages_total: int
    page_bytes: int
    prefix: PrefixStats = PrefixStats()
    pages_shared: int = 0
    """Pages with more than one holder (shared prefix pages)."""
    index_bytes: int = 0
    """Memory outside the pool: the bodies' own state (an index's key copy, sums and
    centroids; page lists), the sequences' and the kept prefixes'."""

    @property
    def bytes_used(self) -> int:
        """K/V bytes of the pages in use and the index bytes: what counts against the
        memory ceiling."""
        return self.pages_used * self.page_bytes + self.index_bytes


class Store:
    """Holds the KV pages of many sequences and answers which pages each query attends."""

    def __init__(
        self, pool: PagePool, max_sequences: int | None = None, prefix_cache: bool = True
    ) -> None:
        self.pool = pool
        self.max_sequences = max_sequences
        self.prefixes = PrefixCache(pool) if prefix_cache else None
        """Shared prompt prefixes (``None``: prefix reuse is off in this store)."""
        self._seqs: dict[str, _Sequence] = {}
        self._lock = threading.RLock()
        self._meta_bytes = 0  # every sequence's ``meta``, summed

    @property
    def lock(self) -> threading.RLock:
        """Held by every operation; hold it to make a check and an operation one step."""
        return self._lock

    # ---- lifecycle -------------------------------------------------------------------
    def create(self, seq_id: str, spec: SequenceSpec, prefix: PrefixKeys | None = None) -> int:
        """Start a sequence: empty, or holding the longest cached run of ``prefix``'s blocks
        (its prompt's leading blocks, see ``cache_service.prefix_cache``). Raises
        ``ValueError`` for a bad spec or a taken id.

        Returns:
            the tokens it holds (a multiple of ``prefix.block_tokens``; 0 without a hit).
        """
        spec.validate(self.pool.page_size)
        if prefix is not None:
            prefix.validate(self.pool.page_size)
        if spec.head_dim != self.pool.head_dim:
            raise ValueError(
                f"head_dim {spec.head_dim} does not match the store's pages ({self.pool.head_dim})"
            )
        with self._lock:
            if seq_id in self._seqs:
                raise SequenceExists(f"sequence {seq_id!r} already exists; release it first")
            if self.max_sequences is not None and len(self._seqs) >= self.max_sequences:
                raise TooManySequences(
                    f"the service holds its limit of {self.max_sequences} sequences "
                    "(--max-sequences); release finished ones or use another replica"
                )
            size = self.pool.page_size
            sinks, window = spec.sinks(size), spec.window_pages(size)
            heads = [
                [
                    HeadLayout(self.pool, sinks, window, _handover_delay(spec, layer, head, size))
                    for head in range(spec.num_kv_heads)
                ]
                for layer in range(spec.num_layers)
            ]
            pending: list[list[list[int]]] = [
                [[] for _ in range(spec.num_kv_heads)] for _ in range(spec.num_layers)
            ]
            seq = _Sequence(
                spec, heads, make_bodies(spec, self.pool), pending, [False] * spec.num_layers
            )
            blocks = []
            if prefix is not None and prefix.keys:
                seq.build_at = prefix.tokens
                if prefix.reuse and self.prefixes is not None:
                    seq.index_key = prefix.keys[-1]
                    blocks = self.prefixes.lookup(list(prefix.keys), spec, prefix.block_tokens)
            if blocks:
                self._restore(seq, np.concatenate([b.pages for b in blocks], axis=2))
            seq.meta = [0] * spec.num_layers
            for layer in range(spec.num_layers):
                self._measure(seq, layer)
            self._seqs[seq_id] = seq
            return len(blocks) * prefix.block_tokens if prefix is not None else 0

    def _restore(self, seq: _Sequence, pages: np.ndarray) -> None:
        """Lay out ``seq``'s heads over shared prefix pages ``[layers, kv_heads, n]``."""
        self.pool.share(pages.ravel())
        length = pages.shape[2] * self.pool.page_size
        for layer, row in enumerate(seq.heads):
            for head, lay in enumerate(row):
                seq.pending[layer][head] = lay.restore(pages[layer, head], length)

    def share_prefix(self, seq_id: str, prefix: PrefixKeys) -> int:
        """Publish a sequence's leading blocks for later sequences to start from, right after
        its prefill (before its first decode step: its positional pages are still its own).

        Returns:
            the blocks published now (known blocks are only marked used).
        """
        prefix.validate(self.pool.page_size)
        with self._lock:
            seq = self._usable(seq_id)
            if self.prefixes is None:
                return 0
            if any(seq.flushed):
                raise OutOfOrder(
                    f"share the prefix of {seq_id!r} right after its prefill: a decode step "
                    "has handed its prompt pages to the policy already"
                )
            length = min(lay[0].length for lay in seq.heads)
            count = min(len(prefix.keys), length // prefix.block_tokens)
            per_block = prefix.block_tokens // self.pool.page_size
            pages = self._positional(seq)[:, :, : count * per_block]  # [layers, heads, n]
            published = 0
            for k in range(count):
                parent = prefix.keys[k - 1] if k else None
                block = pages[:, :, k * per_block : (k + 1) * per_block].copy()
                published += self.prefixes.publish(
                    prefix.keys[k], parent, seq.spec, prefix.block_tokens, block
                )
            return published

    def positional_pages(self, seq_id: str, layer: int) -> np.ndarray:
        """Pages holding one layer's tokens in position order ``[kv_heads, n]``, before the
        sequence's first decode step (the worker reads a restored prefix's K/V through them).
        """
        with self._lock:
            seq = self._usable(seq_id)
            self._check_layer(seq, layer)
            if seq.flushed[layer]:
                raise OutOfOrder(
                    f"layer {layer} of {seq_id!r} has decoded: its prompt pages belong to the "
                    "policy's body and are no longer in position order"
                )
            return self._positional(seq, layer)[0]

    def _positional(self, seq: _Sequence, layer: int | None = None) -> np.ndarray:
        """``[layers, kv_heads, n]`` positional pages of unflushed layers (or of ``layer``:
        ``[1, kv_heads, n]``), sinks then handed-over then leaving and window pages."""
        layers = range(seq.spec.num_layers) if layer is None else [layer]
        rows = []
        for li in layers:
            heads = []
            for head, lay in enumerate(seq.heads[li]):
                later = [*lay.leaving_pages().tolist(), *lay.window_pages_now().tolist()]
                heads.append(lay.sink + seq.pending[li][head] + later)
            rows.append(heads)
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), seq.spec.num_kv_heads, -1)

    def release(self, seq_id: str) -> None:
        """Free every page of a sequence."""
        with self._lock:
            seq = self._get(seq_id)
            for layer in range(seq.spec.num_layers):
                for head in range(seq.spec.num_kv_heads):
                    seq.heads[layer][head].release()
                    self.pool.free(np.asarray(seq.pending[layer][head], dtype=np.int64))
                    seq.bodies[layer][head].release()
            self._meta_bytes -= sum(seq.meta)
            del self._seqs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def spec(self, seq_id: str) -> SequenceSpec:
        return self._get(seq_id).spec

    def check_usable(self, seq_id: str) -> None:
        """``UnknownSequence``, or ``SequenceFailed`` when a failed request left it
        half-changed."""
        self._usable(seq_id)

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
            seq = self._usable(seq_id)
            self._check_append(seq, layer, keys, values, positions)
            self._admit(self._append_pages(seq, layer, len(positions)), f"append to {seq_id!r}")
            with self._changing([seq]):
                self._append(seq, layer, keys, values, positions)
                self._measure(seq, layer)

    def _append(
        self,
        seq: _Sequence,
        layer: int,
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
    ) -> None:
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
            seq = self._usable(seq_id)
            self._check_retrieve(seq, layer, queries)
            self._admit(self._retrieve_pages(seq, layer), f"retrieve for {seq_id!r}")
            with self._changing([seq]):
                selection = self._retrieve(seq, layer, queries)
                self._measure(seq, layer)
                return selection

    def _retrieve(self, seq: _Sequence, layer: int, queries: np.ndarray) -> Selection:
        spec = seq.spec
        self._flush(seq, layer)
        group = spec.num_q_heads // spec.num_kv_heads
        dense = layer < spec.full_layers
        max_tokens = spec.body_budget(self.pool.page_size)
        bodies, lays = seq.bodies[layer], seq.heads[layer]
        leaving = [lay.leaving_pages() for lay in lays]
        if dense or max_tokens is None:
            chosen = [body.all_pages() for body in bodies]
        else:  # a leaving page is attended whole: first in the window's unused share
            budgets = [
                max_tokens - self._over_window(lay, pages)
                for lay, pages in zip(lays, leaving, strict=True)
            ]
            grouped = queries.reshape(spec.num_kv_heads, group, spec.head_dim)
            chosen = select_layer(bodies, grouped, budgets)
        parts = [
            np.concatenate([lay.sink_pages(), pages, out, lay.window_pages_now()])
            for lay, pages, out in zip(lays, chosen, leaving, strict=True)
        ]
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
        return self._step(layer, seq_ids, keys, values, positions, queries)

    def append_step(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        """A decode step of one layer for a batch that stores each new token and selects
        nothing: for a layer that attends to every token (below each sequence's
        ``full_layers``) when the caller keeps that layer's K/V itself. Leaves every sequence
        as ``decode`` of the same tokens would (the pages handed over by the prefill join the
        body at the first step either way).

        Args:
            keys, values: ``[B, num_kv_heads, head_dim]``.
            positions: ``[B]``.
        """
        self._step(layer, seq_ids, keys, values, positions, None)

    def _step(
        self,
        layer: int,
        seq_ids: list[str],
        keys: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        queries: np.ndarray | None,
    ) -> list[Selection]:
        """``decode``, or with ``queries`` ``None`` ``append_step`` (no selections)."""
        with self._lock:
            if len(set(seq_ids)) != len(seq_ids):
                raise ValueError("Decode lists a sequence more than once; send one token each")
            seqs = [self._usable(seq_id) for seq_id in seq_ids]
            need = 0
            for b, seq in enumerate(seqs):
                rows = slice(b, b + 1)
                self._check_append(seq, layer, keys[rows], values[rows], positions[rows])
                if queries is None:
                    self._check_stored_only(seq, layer, seq_ids[b])
                else:
                    self._check_retrieve(seq, layer, queries[b], appending=1)
                    need += self._retrieve_pages(seq, layer)
                need += self._append_pages(seq, layer, 1)
            what = "decode" if queries is not None else "append-only decode"
            self._admit(need, f"{what} of {len(seqs)} sequences")
            out = []
            with self._changing(seqs):
                for b, seq in enumerate(seqs):
                    rows = slice(b, b + 1)
                    self._append(seq, layer, keys[rows], values[rows], positions[rows])
                    if queries is None:
                        self._flush(seq, layer)  # as the selection would
                    else:
                        out.append(self._retrieve(seq, layer, queries[b]))
                    self._measure(seq, layer)
            return out

    def read_pages(self, pages: np.ndarray) -> np.ndarray:
        """Copy of page data ``[n, 2, page_size, head_dim]`` (the RPC data path)."""
        return self.pool.data[np.asarray(pages, dtype=np.int64)]

    def stats(self) -> StoreStats:
        """Occupancy; lock-free, so a metrics scrape never waits for a long operation."""
        prefix = self.prefixes.stats() if self.prefixes is not None else PrefixStats()
        return StoreStats(
            len(self._seqs),
            self.pool.num_used,
            self.pool.num_pages,
            self.pool.page_bytes,
            prefix,
            int(np.count_nonzero(self.pool.refs > 1)),
            self._meta_bytes + prefix.index_bytes,
        )

    def _measure(self, seq: _Sequence, layer: int) -> None:
        """Count ``layer``'s bodies' own memory again (after a change to them)."""
        now = sum(body.nbytes() for body in seq.bodies[layer])
        self._meta_bytes += now - seq.meta[layer]
        seq.meta[layer] = now

    # ---- admission and failure ---------------------------------------------------------
    def _append_pages(self, seq: _Sequence, layer: int, tokens: int) -> int:
        """Most pages appending ``tokens`` to ``layer`` can take: new positional pages, and
        once a body laid out in leaf pages is built, two leaf pages per token leaving the
        window (at worst a copy of a shared leaf page and a leaf split per inserted token)."""
        size = self.pool.page_size
        layout = -(-tokens // size)
        body = 2 * layout * size if seq.flushed[layer] and _leaf_paged(seq.spec, layer) else 0
        return seq.spec.num_kv_heads * (layout + body)

    def _retrieve_pages(self, seq: _Sequence, layer: int) -> int:
        """Pages a retrieval is expected to take: building an index takes its own memory;
        a body laid out in leaf pages re-lays the prefill out into them (leaves about half
        full: up to three times its pages while the positional ones are still held, by a
        kept prefix or until the build ends), inserting the pages after the build boundary
        takes what appending them would; bodies that gather single tokens (they hold a
        ``Scratch``: the oracle, icecache-tokens) copy their picks to scratch pages."""
        build = 0
        if _clustered(seq.spec, layer) and not seq.flushed[layer]:
            for head, pending in enumerate(seq.pending[layer]):
                if _leaf_paged(seq.spec, layer):
                    built = self._built_pages(seq, layer, head, len(pending))
                    build += 3 * built + 2 * self.pool.page_size * (len(pending) - built)
            tokens = sum(len(pending) for pending in seq.pending[layer]) * self.pool.page_size
            build += -(-tokens * INDEX_BYTES_PER_KEY * seq.spec.head_dim // self.pool.page_bytes)
        gathering = sum(body.scratch is not None for body in seq.bodies[layer])
        budget = seq.spec.body_budget(self.pool.page_size) or 0
        return build + gathering * -(-budget // self.pool.page_size)

    def _admit(self, pages: int, what: str) -> None:
        """Refuse, before changing anything, an operation that would not fit in the memory
        ceiling (once unused prefix blocks made what room they can). The pool holds the
        ceiling's worth of pages; the bodies' own memory outside it (``index_bytes``) takes
        as many of the free ones out of use."""
        if pages > self._room() and self.prefixes is not None:
            self.prefixes.evict(pages - self._room())
        room = self._room()
        if pages > room:
            left = max(room, 0)
            raise PoolExhausted(
                f"{what} needs up to {pages} KV pages but only {left} of "
                f"{self.pool.num_pages} are free ({self.pool.num_free - left} more held back "
                "for the indexes' own memory); release finished sequences or raise the "
                "memory limit"
            )

    def _room(self) -> int:
        """Free pages less those the bodies' memory outside the pool stands for."""
        index = self._meta_bytes + (self.prefixes.index_bytes if self.prefixes is not None else 0)
        return self.pool.num_free - -(-index // self.pool.page_bytes)

    @contextlib.contextmanager
    def _changing(self, seqs: list[_Sequence]) -> Iterator[None]:
        """Marks ``seqs`` failed, and frees pages nothing holds, if the block raises."""
        try:
            yield
        except Exception as err:
            for seq in seqs:
                seq.failed = f"{type(err).__name__}: {err}"
            leaked = np.setdiff1d(self.pool.used_ids(), self._held_pages())
            self.pool.reclaim(leaked)
            raise SequenceFailed(
                f"the request failed half-way ({type(err).__name__}: {err}); its sequences "
                "are unusable: release them and create them again"
            ) from err

    def _held_pages(self) -> np.ndarray:
        """Every page some sequence or the prefix cache holds."""
        held = [np.empty(0, dtype=np.int64)]
        if self.prefixes is not None:
            held.append(self.prefixes.held_pages())
        for seq in self._seqs.values():
            for layer in range(seq.spec.num_layers):
                for head in range(seq.spec.num_kv_heads):
                    lay, body = seq.heads[layer][head], seq.bodies[layer][head]
                    held += [lay.sink_pages(), lay.window_pages_now(), lay.leaving_pages()]
                    held.append(body.all_pages())
                    held.append(np.asarray(seq.pending[layer][head], dtype=np.int64))
                    held.append(body.scratch_pages())
        return np.concatenate(held)

    # ---- helpers ---------------------------------------------------------------------
    def _get(self, seq_id: str) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequence(seq_id) from None

    def _usable(self, seq_id: str) -> _Sequence:
        seq = self._get(seq_id)
        if seq.failed:
            raise SequenceFailed(
                f"sequence {seq_id!r} was left half-changed by a failed request "
                f"({seq.failed}); release it and create it again"
            )
        return seq

    def _check_retrieve(
        self, seq: _Sequence, layer: int, queries: np.ndarray, appending: int = 0
    ) -> None:
        """``appending``: tokens the same request stores first."""
        self._check_layer(seq, layer)
        spec = seq.spec
        leader = _leader(spec, layer)
        if leader is not None:
            length = seq.heads[layer][0].length + appending
            lead = seq.heads[leader][0].length
            if not seq.flushed[leader] or length != lead:
                raise OutOfOrder(
                    f"icecache-r layer {layer} reuses layer {leader}'s layout: decode or "
                    f"retrieve layer {leader} first, with the same tokens ({lead} there, "
                    f"{length} here)"
                )
        if queries.shape != (spec.num_q_heads, spec.head_dim):
            raise ValueError(
                f"queries must have shape ({spec.num_q_heads}, {spec.head_dim}), "
                f"got {tuple(queries.shape)}"
            )

    def _flush(self, seq: _Sequence, layer: int) -> None:
        """Give each body of ``layer`` the pages handed over during the prefill (at the
        first decode step or retrieval).

        An indexed body built on the prompt's whole blocks (``build_at``) builds over the
        pages handed over by their end and inserts the rest, so its index depends on those
        blocks alone: the prefix cache keeps it with the last block, and a later sequence
        on the same blocks starts from a copy instead of building (the same index: a build
        is deterministic)."""
        if seq.flushed[layer]:
            return
        boundary = seq.build_at is not None and _clustered(seq.spec, layer)
        for head in range(seq.spec.num_kv_heads):
            pages = np.asarray(seq.pending[layer][head], dtype=np.int64)
            seq.pending[layer][head] = []
            built = self._built_pages(seq, layer, head, len(pages)) if boundary else 0
            if built:
                self._build(seq, layer, head, pages[:built])
            if built < len(pages):
                seq.bodies[layer][head].add(pages[built:])
        seq.flushed[layer] = True

    def _built_pages(self, seq: _Sequence, layer: int, head: int, pending: int) -> int:
        """How many of ``pending`` handed-over pages the first ``add`` builds over."""
        if seq.build_at is None or not _clustered(seq.spec, layer):
            return pending
        return min(pending, seq.heads[layer][head].handed_by(seq.build_at))

    def _build(self, seq: _Sequence, layer: int, head: int, pages: np.ndarray) -> None:
        """Lay ``pages`` out in the body, or start from the index the prefix cache keeps for
        them (then ``pages``, positional copies it does not need, are let go)."""
        kept = None
        if seq.index_key is not None and self.prefixes is not None:
            kept = self.prefixes.kept_body(seq.index_key, layer, head)
        body = seq.bodies[layer][head]
        leader = _leader(seq.spec, layer)
        if leader is not None:  # an icecache-r follower: its leader may be a kept copy
            for follower in (body, kept):
                if isinstance(follower, MirroredBody):
                    follower.leader = cast(IndexedBody, seq.bodies[leader][head])
        if kept is not None:
            body.release()
            seq.bodies[layer][head] = kept
            self.pool.free(pages)
            return
        body.add(pages)
        if seq.index_key is not None and self.prefixes is not None:
            self.prefixes.keep_body(seq.index_key, layer, head, body)

    def _over_window(self, lay: HeadLayout, leaving: np.ndarray) -> int:
        """Tokens of ``leaving`` pages beyond the window's share of the budget
        (``window_pages`` full pages, of which the newest is still filling)."""
        share = lay.window_pages * self.pool.page_size
        used = int(self.pool.fill[lay.window_pages_now()].sum()) + int(
            self.pool.fill[leaving].sum()
        )
        return max(0, used - share)

    def _selection(self, parts: list[np.ndarray]) -> Selection:
        pages = np.concatenate(parts).astype(np.int64)
        indptr = np.zeros(len(parts) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(p) for p in parts])
        return Selection(
            indptr, pages, self.pool.fill[pages].copy(), self.pool.version[pages].copy()
        )

    @staticmethod
    def _check_stored_only(seq: _Sequence, layer: int, seq_id: str) -> None:
        """An append-only step is for a layer that attends to every token."""
        if layer >= seq.spec.full_layers:
            raise ValueError(
                f"layer {layer} of {seq_id!r} selects what it attends to (its first "
                f"{seq.spec.full_layers} layers attend to every token under policy "
                f"{seq.spec.policy!r}): store its tokens with a plain decode step, not an "
                "append-only one"
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
        if positions.ndim != 1:
            raise ValueError(f"positions must be one-dimensional [T], got {positions.shape}")
        shape = (len(positions), spec.num_kv_heads, spec.head_dim)
        if keys.shape != shape or values.shape != shape:
            raise ValueError(
                f"keys and values must have shape {shape} (tokens, kv heads, head dim), "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        start = seq.heads[layer][0].length
        if not np.array_equal(positions, np.arange(start, start + len(positions))):
            raise OutOfOrder(
                f"positions of layer {layer} must continue at {start} without gaps, "
                f"got {positions[:4].tolist()}..."
            )
        leader = _leader(spec, layer)
        if leader is not None:
            end, lead = start + len(positions), seq.heads[leader][0].length
            if end > lead or (seq.flushed[layer] and end != lead):
                raise OutOfOrder(
                    f"icecache-r layer {layer} reuses layer {leader}'s layout: append to layer "
                    f"{leader} first (it holds {lead} tokens, layer {layer} would hold {end})"
                )


INDEX_BYTES_PER_KEY = 3
"""An index's memory per token and key coordinate, for admission: per leaf (about half full,
with room for splits) sums, quantized centroids and slots, and the token maps; the keys
themselves are read from the pool (``ClusterIndex`` key source). ~1.6 measured on Gaussian
keys at head_dim 64 (~10.6 while the index kept a float16 copy of the keys, float64 leaf
sums and float32 centroids)."""


def _leader(spec: SequenceSpec, layer: int) -> int | None:
    """The layer whose layout ``layer`` mirrors under ``icecache-r`` (``None``: its own)."""
    if spec.policy != "icecache-r" or layer < spec.dense_layers:
        return None
    offset = (layer - spec.dense_layers) % spec.reuse_group
    return layer - offset if offset else None


def _handover_delay(spec: SequenceSpec, layer: int, head: int, page_size: int) -> int:
    """Tokens a page of ``layer``'s head waits after leaving the window before its body
    takes it: clustered bodies insert pages, so their heads are spread over the
    ``page_size`` steps between two evictions (``icecache-r`` followers keep their leader's
    timing, they replay its inserts); 0 for the others, and when the body's budget cannot
    hold a leaving page. A leaving page is attended whole: in the window's share of the
    budget that its newest page does not use yet, the rest taken from the body's."""
    budget = spec.body_budget(page_size)
    if not _clustered(spec, layer) or budget is None or budget < page_size:
        return 0
    return ((_leader(spec, layer) or layer) * spec.num_kv_heads + head) % page_size


def _clustered(spec: SequenceSpec, layer: int) -> bool:
    """Whether ``layer``'s bodies cluster their tokens in an index."""
    return spec.policy in INDEXED_POLICIES and layer >= spec.dense_layers


def _leaf_paged(spec: SequenceSpec, layer: int) -> bool:
    """Whether ``layer``'s bodies re-lay tokens out into leaf pages (they allocate)."""
    return spec.policy in LEAF_PAGE_POLICIES and layer >= spec.dense_layers
