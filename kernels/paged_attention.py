"""Paged decode attention on a device: launches ``kernels/paged_attention.cu``.

One decode kernel over a CSR page table (split-K over the pages of the rows longer than a
split), then, when some row is split, a merge kernel over the partial results. How a row is
summed depends on the row alone (``kernels.decode_plan``): a sequence's attention is the
same bits in any batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels.backend import KernelArg, KernelBackend
from kernels.checks import check_aligned, check_device
from kernels.cupy_backend import default_backend
from kernels.decode_plan import plan_decode
from kernels.registry import DTYPE_TAGS

LOG2E = math.log2(math.e)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    max_row_pages: int | None = None,
    split_pages: int | None = None,
    num_warps: int | None = None,
    backend: KernelBackend | None = None,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over selected KV pages (CUDA kernel).

    Same semantics as :func:`kernels.reference.paged_decode_attention_ref`.

    Args:
        q: ``[B, Hq, D]`` queries, float32/float16/bfloat16, ``D`` in 64/128/256.
        kv_cache: ``[S, 2, P, D]`` page slots, ``q``'s dtype; ``[:, 0]`` keys, ``[:, 1]``
            values.
        indptr: ``[B * Hkv + 1]`` int32 CSR row pointers; row ``b * Hkv + h`` serves query
            heads ``h * G .. h * G + G - 1`` of sequence ``b`` (``G = Hq // Hkv <= 8``).
        indices: ``[nnz]`` int32 slots of the selected pages (values are not checked).
        page_lens: ``[nnz]`` int32 valid tokens at the start of each page (clamped to ``P``;
            a page with ``<= 0`` is skipped).
        sm_scale: softmax scale, usually ``D ** -0.5``.
        out: optional ``[B, Hq, D]`` output buffer in ``q``'s dtype.
        max_row_pages: pages of the longest row, if the caller knows it (the engine builds
            the table on the host); otherwise read from ``indptr``, which on a GPU waits for
            the device. It must not be below the longest row (on a GPU that is not checked:
            the launch would leave the pages past it unread).
        split_pages: pages of a split (split-K); default
            :func:`kernels.decode_plan.default_split_pages`.
        num_warps: warps per block (1..16, 1..8 above 4 query heads a KV head); default
            :data:`kernels.decode_plan.WARPS`.
        backend: where to run; default :class:`kernels.cupy_backend.CupyBackend` (torch CUDA
            tensors).

    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype (``out`` if given); float32 accumulation. A row with
        no pages gives 0.
    """
    backend = backend if backend is not None else default_backend()
    tensors = {"q": q, "kv_cache": kv_cache, "indptr": indptr, "indices": indices}
    device = check_device(backend, page_lens=page_lens, **tensors)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
    check_device(backend, out=out, q=q)
    if q.numel() == 0:
        return out
    check_aligned("kv_cache", kv_cache)
    if max_row_pages is None or indptr.device.type == "cpu":  # free to read on the host
        lens = indptr[1:] - indptr[:-1]
        longest = int(lens.max()) if lens.numel() else 0
        if max_row_pages is not None and max_row_pages < longest:
            raise ValueError(f"max_row_pages={max_row_pages}, but a row has {longest} pages")
        max_row_pages = longest if max_row_pages is None else max_row_pages
    plan = plan_decode(
        q, kv_cache, indptr, indices, page_lens, max_row_pages, split_pages, num_warps
    )
    tag, head_dim = DTYPE_TAGS[q.dtype], q.shape[2]
    splits = plan.max_splits
    if splits == 1:  # the kernel writes out directly; partial pointers unused
        part_o = part_lse = out
    else:
        f32 = torch.float32
        part_o = backend.empty((plan.rows, splits, plan.group, head_dim), f32, device)
        part_lse = backend.empty((plan.rows, splits, plan.group), f32, device)
    decode_args: list[KernelArg] = [q, kv_cache, indptr, indices, page_lens, out, part_o, part_lse]
    decode_args += _i32(plan.group, kv_cache.shape[2], plan.split_pages, splits)
    decode_args.append(np.float32(sm_scale * LOG2E))
    grid, block = (plan.rows, splits, 1), (32 * plan.warps, 1, 1)
    kernel = f"icecache_decode_{tag}_d{head_dim}_g{plan.bucket}"
    backend.launch("paged_attention", kernel, grid, block, decode_args, plan.shared_mem, device)
    if splits > 1:
        merge_args: list[KernelArg] = [part_o, part_lse, out, indptr]
        merge_args += _i32(plan.group, head_dim, plan.split_pages, splits)
        merge_smem = 4 * plan.group * splits  # weights [G][splits]
        kernel = f"icecache_decode_merge_{tag}"
        grid, block = (plan.rows, 1, 1), (128, 1, 1)
        backend.launch("paged_attention", kernel, grid, block, merge_args, merge_smem, device)
    return out


def _i32(*values: int) -> list[KernelArg]:
    return [np.int32(v) for v in values]
