"""Typed objects that cross the store's boundary (in-process or over gRPC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

POLICIES = (
    "full",
    "oracle",
    "icecache",
    "icecache-r",
    "icecache-tokens",
    "quest",
    "kmeans",
    "streaming",
)
"""Every attention policy by name; the bodies each one lays out are ``cache_service.policies``'."""
DEFAULT_POLICY = "icecache-tokens"
"""The policy a sequence, the engine and the compose cluster get unless told otherwise: of
the index's variants, the one with the highest attention recall and fidelity, and the
smallest memory (``bench/results/selection.md``, ``accuracy.md``, ``memory.md``); its price
is more bytes moved per step than whole leaves (its scratch pages are new at every step)."""
INDEXED_POLICIES = ("icecache", "icecache-r", "icecache-tokens", "kmeans")
"""The policies whose bodies cluster their tokens in an index."""
LEAF_PAGE_POLICIES = ("icecache", "icecache-r", "kmeans")
"""The indexed policies whose bodies re-lay tokens out into the leaf pages of their index
(they allocate pages when their body takes tokens); ``icecache-tokens`` leaves its tokens in
their positional pages."""


def check_policy(name: str) -> str:
    """``name`` if it names a policy; else ``ValueError`` listing the policies."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return name


def kv_bytes(tokens: int, head_dim: int, itemsize: int, heads: int = 1) -> int:
    """Bytes of the keys and values of ``tokens`` tokens in each of ``heads`` (layer, KV head)
    pairs, at ``itemsize`` bytes a value: a page is ``kv_bytes(page_size, head_dim, itemsize)``."""
    return 2 * tokens * heads * head_dim * itemsize


class UnknownSequence(KeyError):
    """A request named a sequence the store does not hold."""

    def __str__(self) -> str:
        return f"unknown sequence {self.args[0]!r}: create it first (or it was released)"


class SequenceExists(ValueError):
    """A create named a sequence that is already held."""


class OutOfOrder(ValueError):
    """A well-formed request that does not fit the sequence's state (e.g. positions that do
    not continue the layer); the message says what the sequence expects."""


class SequenceFailed(RuntimeError):
    """A request failed after it had started changing the sequence, which is now unusable:
    release it and create it again (re-prefill)."""


class TooManySequences(RuntimeError):
    """A create beyond the service's limit of concurrent sequences."""


class TooManyStreams(RuntimeError):
    """A ``DecodeStream`` beyond the service's limit of open streams; use ``Decode``."""


class LeaseLost(ConnectionError):
    """The caller's lease expired (or never existed here), or the sequence is another lease's:
    what it held is no longer its own; it rebuilds its sequences under a new lease. A
    ``ConnectionError``, so a worker treats it as losing the replica's sequences."""


class AdoptionRefused(RuntimeError):
    """A sequence cannot be taken over as it is (gone, or its layers disagree on its length);
    the worker rebuilds it by prefill and replay instead."""


class AdoptionConflict(RuntimeError):
    """Another worker took the sequence over first (its lease epoch is not the one expected):
    this resume is a duplicate and must not go on."""


@dataclass(frozen=True)
class SequenceSpec:
    """How one sequence's KV cache is kept and selected from."""

    num_layers: int
    """Decoder layers of the model."""
    num_kv_heads: int
    """KV heads per layer; each (layer, KV head) has its own pages."""
    num_q_heads: int
    """Query heads per layer; a multiple of ``num_kv_heads`` (GQA)."""
    head_dim: int
    """Dimension of one key or value vector."""
    policy: str = DEFAULT_POLICY
    """Which tokens decode attends to; one of ``POLICIES``."""
    budget: int | None = 256
    """Tokens attended per (layer, KV head) and step, sinks and recent window included.
    ``None`` only with the ``full`` policy."""
    sink_tokens: int | None = None
    """First tokens that are always attended; a multiple of the page size.
    ``None``: ``page_size * clamp(budget // (8 * page_size), 1, 2)``."""
    recent_pages: int | None = None
    """Pages of the most recent tokens that are always attended (a ring of positional pages).
    ``None``: same number of pages as the sinks."""
    dense_layers: int = 2
    """The first layers attend to every token under every policy."""
    reuse_group: int = 3
    """``icecache-r``: layers per group that share the first layer's leaf layout."""
    seed: int = 0
    """Seed of the clustering, so selection is reproducible."""

    def validate(self, page_size: int) -> None:
        """Raise ``ValueError`` naming the field to fix."""
        check_policy(self.policy)
        for name in ("num_layers", "num_kv_heads", "num_q_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.dense_layers < 0 or self.reuse_group < 1:
            raise ValueError("dense_layers must be >= 0 and reuse_group >= 1")
        if self.sink_tokens is not None and (self.sink_tokens < 0 or self.sink_tokens % page_size):
            raise ValueError(
                f"sink_tokens ({self.sink_tokens}) must be a non-negative multiple of the "
                f"page size ({page_size})"
            )
        if self.recent_pages is not None and self.recent_pages < 1:
            raise ValueError(f"recent_pages must be >= 1, got {self.recent_pages}")
        if self.budget is None:
            if self.policy != "full":
                raise ValueError(f"policy {self.policy!r} needs a token budget")
            return
        floor = self.sinks(page_size) + self.window_pages(page_size) * page_size
        if self.budget < floor:
            raise ValueError(
                f"budget {self.budget} is below the sink tokens plus the recent window "
                f"({floor}); raise the budget or lower sink_tokens/recent_pages"
            )

    @property
    def full_layers(self) -> int:
        """The first layers attend to every token: all of them under ``full``, else the
        dense layers."""
        return self.num_layers if self.policy == "full" else self.dense_layers

    def sinks(self, page_size: int) -> int:
        """Sink tokens in effect."""
        if self.sink_tokens is not None:
            return self.sink_tokens
        pages = 2 if self.budget is None else min(2, max(1, self.budget // (8 * page_size)))
        return pages * page_size

    def window_pages(self, page_size: int) -> int:
        """Recent-window pages in effect."""
        if self.recent_pages is not None:
            return self.recent_pages
        return max(1, self.sinks(page_size) // page_size)

    def body_budget(self, page_size: int) -> int | None:
        """Tokens the policy may pick beyond sinks and window (``None``: unlimited)."""
        if self.budget is None:
            return None
        return self.budget - self.sinks(page_size) - self.window_pages(page_size) * page_size


@dataclass(frozen=True)
class PrefixKeys:
    """A prompt's leading blocks as the prefix cache names them (``cache_service.prefix_cache``).

    The worker prefills in blocks of ``block_tokens`` tokens at fixed positions; block ``k``
    (tokens ``k * block_tokens .. (k + 1) * block_tokens - 1``) is named by ``keys[k]``, a
    hash of its token ids chained to ``keys[k - 1]`` (the first also over the model and the
    sequence's spec), so equal keys mean equal prompts up to the block's end.

    Given at a sequence's creation, the keys also fix where an indexed policy's index is
    built: over the tokens of the whole blocks (those that left the recent window by the
    last block's end), the tokens after them inserted, so that every sequence on the same
    blocks builds the same index and can share one kept (``Store._flush``). ``reuse``
    ``False``: that build boundary only, the kept blocks neither read nor offered.
    """

    keys: tuple[bytes, ...]
    block_tokens: int
    reuse: bool = True

    @property
    def tokens(self) -> int:
        """Prompt tokens the blocks cover."""
        return len(self.keys) * self.block_tokens

    def validate(self, page_size: int) -> None:
        """Raise ``ValueError`` naming what to fix."""
        if self.block_tokens <= 0 or self.block_tokens % page_size:
            raise ValueError(
                f"prefix block_tokens ({self.block_tokens}) must be a positive multiple of "
                f"the page size ({page_size})"
            )
        if any(not 8 <= len(key) <= 64 for key in self.keys):
            raise ValueError("prefix keys must be hashes of 8 to 64 bytes")


class Selection(NamedTuple):
    """The pages one sequence attends to at one layer, as a CSR table over its KV heads.

    ``pages[indptr[h]:indptr[h + 1]]`` are the pages of KV head ``h``; ``lens`` gives each
    page's valid tokens and ``versions`` its version (for the worker's page cache).
    """

    indptr: np.ndarray  # [num_kv_heads + 1] int64
    pages: np.ndarray  # [nnz] int64 page ids in the store's pool
    lens: np.ndarray  # [nnz] int64, 1..page_size
    versions: np.ndarray  # [nnz] int64

    def tokens(self) -> int:
        """Tokens attended over all heads."""
        return int(self.lens.sum())
