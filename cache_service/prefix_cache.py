"""Shared prompt prefixes: blocks of positional pages that later sequences start from.

A worker prefills prompts in blocks of ``block_tokens`` tokens at fixed positions (0, B, 2B,
...) and names each block by a hash chain (the block's token ids and the previous block's
key, the first keyed also by the model and the sequence spec; computed by the worker, which
alone sees token ids). After a prefill, the store publishes the sequence's blocks here: a
block holds one reference on each of its positional pages, ``[layers, kv_heads,
block_tokens / page_size]``. A new sequence whose prompt begins with known blocks takes
the pages of the longest known run of them (another reference each) and restores its
layouts from them; it prefills only the rest.

Pages are shared read-only: a positional page is full before its block is published and
nothing writes a full positional page. Sequences write only into pages of their own (new
window pages, leaf pages, scratch pages).

A block also keeps the index that the indexed policies build over the prompt's whole
blocks, when it is the last of them (``Store._flush``): per (layer, KV head) a copy of the
body, holding its leaf pages by reference (``icecache-tokens``: the positional pages of the
blocks up to it, which those blocks hold too). A sequence on the same blocks starts from a
copy of it instead of building its own; inserting its later tokens copies a leaf page
before writing it (``LeafPages._own``), so the kept index never changes.

Blocks are kept until the pool needs their pages: ``evict`` drops least recently used
blocks with no cached child (a chain is dropped from its end) whose pages no sequence
holds (every reference on them is the cache's own). A block some live sequence still uses
frees nothing when dropped, so it stays.

Pure bookkeeping over ids; the store holds the lock.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from cache_service.page_pool import PagePool
from cache_service.policies.base import Body
from cache_service.types import SequenceSpec


@dataclass
class PrefixBlock:
    """One published block of a prompt prefix."""

    key: bytes
    parent: bytes | None
    """The previous block's key (``None`` for a prompt's first block)."""
    spec: SequenceSpec
    block_tokens: int
    pages: np.ndarray
    """``[layers, kv_heads, block_tokens / page_size]`` positional pages of the block."""
    children: int = 0
    """Cached blocks whose parent this is."""
    last_used: int = 0
    bodies: dict[tuple[int, int], Body] = field(default_factory=dict)
    """By (layer, KV head): the index built over the prompt's blocks up to this one."""

    def held(self) -> np.ndarray:
        """Every page the block holds a reference on ``[n]``: positional, then its index's."""
        kept = [body.all_pages() for body in self.bodies.values()]
        return np.concatenate([self.pages.ravel(), *kept])


@dataclass(frozen=True)
class PrefixStats:
    """What the prefix cache holds and has served."""

    blocks: int = 0
    pages: int = 0
    """Pages the cache holds a reference on."""
    hits: int = 0
    """Sequences created from at least one cached block."""
    tokens_reused: int = 0
    """Prompt tokens those sequences did not need to prefill."""
    evicted_blocks: int = 0
    indexes: int = 0
    """Kept (layer, KV head) indexes."""
    index_reuses: int = 0
    """(layer, KV head) indexes sequences started from a kept one instead of building."""
    index_bytes: int = 0
    """Bytes of the kept indexes' own state, outside the pool (``Body.nbytes``)."""


@dataclass
class PrefixCache:
    """Published prefix blocks by key, with LRU eviction of unused chain ends."""

    pool: PagePool
    _blocks: OrderedDict[bytes, PrefixBlock] = field(default_factory=OrderedDict)
    """By key, least recently used first (``_touch`` moves a block to the end)."""
    _clock: itertools.count = field(default_factory=itertools.count)
    hits: int = 0
    tokens_reused: int = 0
    evicted_blocks: int = 0
    indexes: int = 0
    index_reuses: int = 0
    index_bytes: int = 0
    pages_held: int = 0
    """Pages the blocks hold (each once), kept as blocks come and go (``stats`` reads it
    without the store's lock, so it never walks ``_blocks`` while another thread changes
    it)."""
    _holds: np.ndarray = field(init=False)
    """``[num_pages]``: the cache's references on each page (a block's, its kept indexes')."""

    def __post_init__(self) -> None:
        self._holds = np.zeros(self.pool.num_pages, dtype=np.int64)

    def lookup(self, keys: list[bytes], spec: SequenceSpec, block_tokens: int) -> list[PrefixBlock]:
        """The longest run of cached blocks from the first of ``keys`` (a sequence's chain)
        made for ``spec`` and ``block_tokens``; counts a hit and marks them used."""
        found: list[PrefixBlock] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None or block.spec != spec or block.block_tokens != block_tokens:
                break
            found.append(block)
        tick = next(self._clock)
        for block in found:
            self._touch(block, tick)
        if found:
            self.hits += 1
            self.tokens_reused += len(found) * block_tokens
        return found

    def publish(
        self,
        key: bytes,
        parent: bytes | None,
        spec: SequenceSpec,
        block_tokens: int,
        pages: np.ndarray,
    ) -> bool:
        """Keep a block (a reference on each of its pages); ``False`` if it is known already
        (only marked used) or its parent is not cached (a chain is kept from its start)."""
        tick = next(self._clock)
        if key in self._blocks:
            self._touch(self._blocks[key], tick)
            return False
        if parent is not None and parent not in self._blocks:
            return False
        self.pool.share(pages.ravel())
        self._hold(pages.ravel())
        self._blocks[key] = PrefixBlock(key, parent, spec, block_tokens, pages, last_used=tick)
        if parent is not None:
            self._blocks[parent].children += 1
        return True

    def kept_body(self, key: bytes, layer: int, head: int) -> Body | None:
        """A copy of the index kept with block ``key`` for (``layer``, ``head``), holding its
        pages (``None``: none kept); counted as a reuse."""
        block = self._blocks.get(key)
        kept = None if block is None else block.bodies.get((layer, head))
        if kept is None:
            return None
        self.index_reuses += 1
        return kept.clone()

    def keep_body(self, key: bytes, layer: int, head: int, body: Body) -> bool:
        """Keep a copy of ``body`` (the index built over the blocks up to ``key``, before
        any later token) with that block; ``False`` if the block is not kept or has one."""
        block = self._blocks.get(key)
        if block is None or (layer, head) in block.bodies:
            return False
        kept = body.clone()
        block.bodies[(layer, head)] = kept
        self._hold(kept.all_pages())
        self.indexes += 1
        self.index_bytes += kept.nbytes()
        return True

    def evict(self, pages_wanted: int) -> int:
        """Drop unused blocks, least recently used chain ends first, until ``pages_wanted``
        pages went back to the pool or nothing more can go; returns the pages freed."""
        freed = 0
        while freed < pages_wanted:
            victim = self._victim()
            if victim is None:
                break
            before = self.pool.num_free
            self._drop(victim)
            freed += self.pool.num_free - before
        return freed

    def clear(self) -> None:
        """Drop every block (their pages go back to the pool where nothing else holds them)."""
        for block in list(self._blocks.values()):
            self._free(block)
        self._blocks.clear()
        self.indexes = 0
        self.index_bytes = 0

    def held_pages(self) -> np.ndarray:
        """Every page some block holds ``[n]`` (the pages of an ``icecache-tokens`` index
        kept with a block are among its blocks' pages too: listed twice)."""
        if not self._blocks:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([b.held() for b in self._blocks.values()])

    def keys(self) -> list[bytes]:
        """The cached blocks' keys, least recently used first (eviction looks in this order)."""
        return list(self._blocks)

    def stats(self) -> PrefixStats:
        """Counts only (no walk over the blocks): safe without the store's lock."""
        return PrefixStats(
            len(self._blocks),
            self.pages_held,
            self.hits,
            self.tokens_reused,
            self.evicted_blocks,
            self.indexes,
            self.index_reuses,
            self.index_bytes,
        )

    def _victim(self) -> PrefixBlock | None:
        """The least recently used block with no cached child whose pages only the cache
        holds (dropping it frees them all).

        Walks the blocks oldest first and reads page references only of chain ends, so the
        usual call stops at the first end; only ends that live sequences still use are
        passed over at the cost of their pages."""
        for block in self._blocks.values():
            held = block.held()
            if block.children == 0 and bool(np.all(self.pool.refs[held] == self._holds[held])):
                return block
        return None

    def _touch(self, block: PrefixBlock, tick: int) -> None:
        block.last_used = tick
        self._blocks.move_to_end(block.key)

    def _drop(self, block: PrefixBlock) -> None:
        del self._blocks[block.key]
        if block.parent is not None:
            self._blocks[block.parent].children -= 1
        self._free(block)
        self.evicted_blocks += 1

    def _free(self, block: PrefixBlock) -> None:
        """Let go of a block's pages and its indexes."""
        self._unhold(block.held())
        self.pool.free(block.pages.ravel())
        for body in block.bodies.values():
            self.index_bytes -= body.nbytes()
            body.release()
        self.indexes -= len(block.bodies)
        block.bodies.clear()

    def _hold(self, pages: np.ndarray) -> None:
        """Count one more reference of the cache's on each of ``pages`` (distinct ids)."""
        self.pages_held += int(np.count_nonzero(self._holds[pages] == 0))
        self._holds[pages] += 1

    def _unhold(self, pages: np.ndarray) -> None:
        """Count one reference less on each of ``pages`` (an id may repeat)."""
        np.subtract.at(self._holds, pages, 1)
        self.pages_held -= int(np.count_nonzero(self._holds[np.unique(pages)] == 0))
