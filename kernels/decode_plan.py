"""The launch shape of one paged decode call: checks its arguments and sizes split-K.

Pure arithmetic over shapes (no device synchronisation). The engine's page table differs
from layer to layer (each layer selects its own pages), so a plan is made per call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kernels.checks import check_index
from kernels.registry import DTYPE_TAGS, GROUP_BUCKETS, HEAD_DIMS

MAX_GROUP = 8  # GQA ratio supported by the decode kernel (the largest of GROUP_BUCKETS)
MAX_SPLITS = 256
MAX_SHARED_BYTES = 48 * 1024


class DecodePlan(NamedTuple):
    """Launch shape of one decode call."""

    rows: int
    """``B * kv_heads``: one CSR row per (sequence, KV head)."""
    group: int
    """Query heads per KV head."""
    bucket: int
    """The group size the kernel is built for: the smallest of ``GROUP_BUCKETS`` >= group."""
    num_splits: int
    """Blocks per row (split-K over its pages); 1 writes the output directly."""
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


def resident_warps_per_sm(bucket: int) -> int:
    """Decode warps an SM holds at once: its 64K registers over the kernel's (``nvcc -Xptxas
    -v``): ~128 a thread up to 4 query heads a KV head, ~200 at 8."""
    return 16 if bucket <= 4 else 8


def chunk_tokens(element_size: int, head_dim: int, bucket: int) -> int:
    """Tokens a warp holds at once (``DecodeLayout::kChunk`` in paged_attention.cu)."""
    vecs = head_dim * element_size // 16  # 16-byte vectors per row
    dim_lanes = min(vecs, 32)
    vec_budget = 8 if bucket <= 2 else 4
    rows = max(1, vec_budget // (vecs // dim_lanes))
    return rows * (32 // dim_lanes)


def choose_num_warps(rows: int, items: int, num_sms: int, most: int) -> int:
    """Warps per block: 4 where the rows alone fill the device twice over (smaller blocks
    schedule more evenly: ~6% faster at a batch of 64 on an H200), else one per chunk of a
    row's mean share, at most ``most``."""
    if rows == 0 or items == 0:
        return 1
    if rows >= 2 * num_sms:
        return 4
    return max(1, min(most, math.ceil(items / rows)))


def choose_num_splits(rows: int, items: int, warps: int, resident_warps: int) -> int:
    """Splits per row: two chunks a warp while the device holds them all, else as few splits
    as keep each warp's share of chunks even; none where four chunks a warp do.

    ``items``: the chunks of the whole call (pages times chunks per page); ``resident_warps``:
    the decode warps the device holds at once. A split costs a second (merge) kernel, ~2 us on
    an H200, more than a small call saves by it. Uses only sizes (no device synchronisation).
    """
    if rows == 0 or items == 0:
        return 1
    per_row = math.ceil(items / rows)
    if per_row <= 4 * warps:
        return 1
    per_warp = max(2, math.ceil(items / resident_warps))  # a merge reads fewer partials
    return max(1, min(math.ceil(per_row / (warps * per_warp)), MAX_SPLITS))


def plan_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    num_sms: int,
    num_splits: int | None = None,
    num_warps: int | None = None,
) -> DecodePlan:
    """Checks the decode arguments' shapes and dtypes and sizes the launch.

    Shapes as in :func:`kernels.paged_attention.paged_decode_attention`; ``num_sms``: the
    device's multiprocessors.
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
    page_size = kv_cache.shape[2]
    chunk = chunk_tokens(q.element_size(), head_dim, bucket)
    items = indices.numel() * math.ceil(page_size / chunk)
    if num_warps is None:
        num_warps = choose_num_warps(rows, items, num_sms, max_warps(bucket))
        while num_warps > 1 and 4 * decode_shared_floats(bucket, head_dim, num_warps) > (
            MAX_SHARED_BYTES
        ):
            num_warps -= 1
    if not 1 <= num_warps <= max_warps(bucket):
        raise ValueError(
            f"num_warps must be in 1..{max_warps(bucket)} at {group} query heads a KV head, "
            f"got {num_warps}"
        )
    if num_splits is None:
        resident = num_sms * resident_warps_per_sm(bucket)
        num_splits = choose_num_splits(rows, items, num_warps, resident)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    shared_mem = 4 * decode_shared_floats(bucket, head_dim, num_warps)
    if shared_mem > MAX_SHARED_BYTES:
        raise ValueError(
            f"head_dim={head_dim}, group={group} need {shared_mem} bytes of shared memory "
            f"with {num_warps} warps; use fewer warps"
        )
    return DecodePlan(rows, group, bucket, num_splits, num_warps, shared_mem)
