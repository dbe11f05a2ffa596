"""The launch shape of one paged decode call: checks its arguments and sizes the launch.

Pure arithmetic over shapes and the longest row's page count (no device synchronisation
when the caller knows it). The engine's page table differs from layer to layer (each layer
selects its own pages), so a plan is made per call.

A row (a sequence's KV head) is cut into splits of ``split_pages`` pages and its blocks
have ``warps`` warps, both fixed by the shape alone (dtype, head dim, group, page size):
how a row's attention is summed depends on the row, never on the other rows of the call,
so a sequence's attention is the same bits in whatever batch it is decoded.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kernels.checks import check_index
from kernels.registry import DTYPE_TAGS, GROUP_BUCKETS, HEAD_DIMS

MAX_GROUP = 8  # GQA ratio supported by the decode kernel (the largest of GROUP_BUCKETS)
MAX_SHARED_BYTES = 48 * 1024
WARPS = 8
"""Warps of a decode block (fewer where the shared memory of the widest shapes allows no
more). On an H200 (bench/results/gpu.md, section 3b) 8 was within ~15% of the best of 4, 8
and 16 at every batch measured (4 was best at a batch of 64, 16 at small batches)."""
CHUNKS_PER_WARP = 8
"""Chunks a warp takes in one split: a split holds ``WARPS x CHUNKS_PER_WARP`` chunks (512
tokens at float16, head dim 128, up to 4 query heads a KV head), so the rows of the default
budget (256 tokens in ~17-20 pages) are never split, and a 1024-token row in two."""


class DecodePlan(NamedTuple):
    """Launch shape of one decode call."""

    rows: int
    """``B * kv_heads``: one CSR row per (sequence, KV head)."""
    group: int
    """Query heads per KV head."""
    bucket: int
    """The group size the kernel is built for: the smallest of ``GROUP_BUCKETS`` >= group."""
    split_pages: int
    """Pages of a split: a row of more pages is split (split-K), each split's partial merged
    by a second kernel; a row of at most this many is written by its one block."""
    max_splits: int
    """Splits of the longest row: the decode grid's second dimension."""
    warps: int
    """Warps per decode block."""
    shared_mem: int
    """Dynamic shared memory of a decode block, in bytes."""


def decode_shared_floats(bucket: int, head_dim: int, warps: int) -> int:
    """Floats of dynamic shared memory of a decode block (the layout in paged_attention.cu)."""
    return max(bucket * (head_dim + 4), warps * bucket * head_dim) + 2 * warps * bucket


def max_warps(bucket: int) -> int:
    """Warps a decode block may have (``__launch_bounds__`` in paged_attention.cu): 16 where
    the kernel fits 128 registers a thread, up to 4 query heads a KV head; 8 above."""
    return 16 if bucket <= 4 else 8


def chunk_tokens(element_size: int, head_dim: int, bucket: int) -> int:
    """Tokens a warp holds at once (``DecodeLayout::kChunk`` in paged_attention.cu)."""
    vecs = head_dim * element_size // 16  # 16-byte vectors per row
    dim_lanes = min(vecs, 32)
    vec_budget = 8 if bucket <= 2 else 4
    rows = max(1, vec_budget // (vecs // dim_lanes))
    return rows * (32 // dim_lanes)


def default_split_pages(warps: int, chunk: int, page_size: int) -> int:
    """Pages of a split: ``CHUNKS_PER_WARP`` chunks for each of the block's warps."""
    return max(1, warps * CHUNKS_PER_WARP * chunk // page_size)


def plan_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    max_row_pages: int,
    split_pages: int | None = None,
    num_warps: int | None = None,
) -> DecodePlan:
    """Checks the decode arguments' shapes and dtypes and sizes the launch.

    Shapes as in :func:`kernels.paged_attention.paged_decode_attention`;
    ``max_row_pages``: pages of the longest row; ``split_pages`` and ``num_warps`` override
    the shape's defaults (``default_split_pages``, ``WARPS``).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    batch, q_heads, head_dim = q.shape
    if kv_cache.dim() != 4 or kv_cache.shape[1] != 2 or kv_cache.shape[3] != head_dim:
        raise ValueError(
            f"kv_cache must be [S, 2, P, {head_dim}], got shape {tuple(kv_cache.shape)}"
        )
    if q.dtype not in DTYPE_TAGS or kv_cache.dtype != q.dtype:
        raise ValueError(
            f"q and kv_cache must share a dtype among float32/float16/bfloat16, "
            f"got {q.dtype} and {kv_cache.dtype}"
        )
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    for name, tensor in (("indptr", indptr), ("indices", indices), ("page_lens", page_lens)):
        check_index(name, tensor)
    if indices.numel() != page_lens.numel():
        raise ValueError("indices and page_lens must have one entry per selected page")
    rows = indptr.numel() - 1
    if batch == 0 or rows <= 0 or rows % batch or q_heads % (rows // batch):
        raise ValueError(
            f"indptr must have B * kv_heads + 1 entries with kv_heads dividing Hq={q_heads}, "
            f"got {indptr.numel()} for B={batch}"
        )
    group = q_heads // (rows // batch)
    if group > MAX_GROUP:
        raise ValueError(f"at most {MAX_GROUP} query heads per KV head, got {group}")
    bucket = next(b for b in GROUP_BUCKETS if b >= group)
    if num_warps is None:
        num_warps = WARPS
        while num_warps > 1 and 4 * decode_shared_floats(bucket, head_dim, num_warps) > (
            MAX_SHARED_BYTES
        ):
            num_warps -= 1
    if not 1 <= num_warps <= max_warps(bucket):
        raise ValueError(
            f"num_warps must be in 1..{max_warps(bucket)} at {group} query heads a KV head, "
            f"got {num_warps}"
        )
    shared_mem = 4 * decode_shared_floats(bucket, head_dim, num_warps)
    if shared_mem > MAX_SHARED_BYTES:
        raise ValueError(
            f"head_dim={head_dim}, group={group} need {shared_mem} bytes of shared memory "
            f"with {num_warps} warps; use fewer warps"
        )
    page_size = kv_cache.shape[2]
    if split_pages is None:
        chunk = chunk_tokens(q.element_size(), head_dim, bucket)
        split_pages = default_split_pages(num_warps, chunk, page_size)
    if split_pages < 1:
        raise ValueError(f"split_pages must be at least 1, got {split_pages}")
    max_splits = max(1, math.ceil(max_row_pages / split_pages))
    if 4 * group * max_splits > MAX_SHARED_BYTES:  # the merge kernel's weights
        raise ValueError(
            f"a row of {max_row_pages} pages takes {max_splits} splits of {split_pages} pages, "
            f"more than the merge kernel holds ({MAX_SHARED_BYTES // (4 * group)} at "
            f"{group} query heads a KV head): select fewer pages"
        )
    return DecodePlan(rows, group, bucket, split_pages, max_splits, num_warps, shared_mem)
