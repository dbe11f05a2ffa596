"""The launch shape of one paged decode call: checks its arguments and sizes split-K.

Pure arithmetic over shapes (no device synchronisation). The engine's page table differs
from layer to layer (each layer selects its own pages), so a plan is made per call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kernels.checks import check_index
from kernels.registry import DTYPE_TAGS, HEAD_DIMS

MAX_GROUP = 8  # GQA ratio supported by the decode kernel (kMaxGroup in paged_attention.cu)
MAX_SPLITS = 256
MAX_SHARED_BYTES = 48 * 1024


class DecodePlan(NamedTuple):
    """Launch shape of one decode call."""

    rows: int
    """``B * kv_heads``: one CSR row per (sequence, KV head)."""
    group: int
    """Query heads per KV head."""
    num_splits: int
    """Blocks per row (split-K over its pages); 1 writes the output directly."""
    warps: int
    """Warps per decode block."""
    shared_mem: int
    """Dynamic shared memory of a decode block, in bytes."""


def decode_shared_floats(group: int, head_dim: int, warps: int, page_size: int) -> int:
    """Floats of dynamic shared memory of a decode block (the layout in paged_attention.cu)."""
    main = group * (head_dim + 4) + 2 * warps * group * page_size
    reduction = warps * group * (head_dim + 1)
    return max(main, reduction) + 2 * warps * group


def choose_num_splits(rows: int, nnz: int, warps: int, num_sms: int) -> int:
    """Splits per row: enough blocks to fill the device twice, at least a page per warp.

    Uses only sizes (no device synchronisation): ``nnz / rows`` is the mean row length.
    """
    if rows == 0 or nnz == 0:
        return 1
    wanted = math.ceil(2 * num_sms / rows)
    affordable = max(1, nnz // (rows * warps))
    return max(1, min(wanted, affordable, MAX_SPLITS))


def plan_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    num_sms: int,
    num_splits: int | None = None,
    num_warps: int = 4,
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
    if not 1 <= num_warps <= 8:
        raise ValueError(f"num_warps must be in 1..8, got {num_warps}")
    if num_splits is None:
        num_splits = choose_num_splits(rows, indices.numel(), num_warps, num_sms)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    page_size = kv_cache.shape[2]
    shared_mem = 4 * decode_shared_floats(group, head_dim, num_warps, page_size)
    if shared_mem > MAX_SHARED_BYTES:
        raise ValueError(
            f"page_size={page_size}, head_dim={head_dim}, group={group} need {shared_mem} "
            f"bytes of shared memory with {num_warps} warps; use fewer warps"
        )
    return DecodePlan(rows, group, num_splits, num_warps, shared_mem)
