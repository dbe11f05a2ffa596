"""The kernels by device: vectorized torch on CPU tensors, the CUDA kernels on GPU tensors.

What the worker calls (``worker/engine.py``, ``worker/page_cache.py``). On CUDA tensors
without CuPy installed both raise ``RuntimeError`` with the install command.
"""

from __future__ import annotations

import torch

from kernels.page_scatter import page_scatter
from kernels.paged_attention import paged_decode_attention
from kernels.torch_paged import paged_decode_attention_torch


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    sm_scale: float,
    max_row_pages: int | None = None,
) -> torch.Tensor:
    """Paged decode attention on ``q``'s device: vectorized torch on CPU, CUDA kernel on GPU.

    Shapes as in :func:`kernels.paged_attention.paged_decode_attention`; ``max_row_pages``:
    pages of the longest row, if known (spares the GPU path a wait for the device); returns
    ``[B, Hq, D]``.
    """
    if q.device.type == "cpu":
        return paged_decode_attention_torch(q, kv_cache, indptr, indices, page_lens, sm_scale)
    return paged_decode_attention(
        q, kv_cache, indptr, indices, page_lens, sm_scale, max_row_pages=max_row_pages
    )


def scatter_pages(staging: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """``kv_cache[slots[i]] = staging[i]`` on ``kv_cache``'s device (``index_copy_`` on CPU).

    Shapes as in :func:`kernels.page_scatter.page_scatter`.
    """
    if kv_cache.device.type == "cpu":  # index_put_ (kv_cache[slots] = ...) costs milliseconds
        kv_cache.index_copy_(0, slots.long(), staging.to(kv_cache.dtype))
        return
    page_scatter(staging, kv_cache, slots)
