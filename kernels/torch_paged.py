"""Vectorized torch paged decode attention: the CPU execution path (no per-row loop)."""

from __future__ import annotations

import torch


def paged_decode_attention_torch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Same contract as ``kernels.reference.paged_decode_attention_ref``, batched over rows.

    Every selected page is scored at once; the softmax runs per CSR row through segment
    max / sum reductions, so the cost is a few tensor ops per call whatever the batch.

    Args:
        q: ``[B, Hq, D]``.
        kv_cache: ``[S, 2, P, D]``.
        indptr: ``[B * Hkv + 1]``; indices, page_lens: ``[nnz]``.

    Returns:
        ``[B, Hq, D]`` in ``q.dtype``.
    """
    batch, q_heads, dim = q.shape
    rows = indptr.numel() - 1
    kv_heads = rows // batch
    group = q_heads // kv_heads
    page_size = kv_cache.shape[2]
    counts = (indptr[1:] - indptr[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(rows, device=q.device), counts)  # [nnz]
    pages = kv_cache[indices.long()].float()  # [nnz, 2, P, D]
    qg = q.float().reshape(rows, group, dim)[row_of]  # [nnz, G, D]
    scores = torch.einsum("ngd,npd->ngp", qg, pages[:, 0]) * sm_scale  # [nnz, G, P]
    valid = torch.arange(page_size, device=q.device)[None, :] < page_lens[:, None]  # [nnz, P]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    page_max = scores.amax(dim=2)  # [nnz, G]
    row_max = torch.full((rows, group), float("-inf"), device=q.device)
    row_max = row_max.scatter_reduce(0, row_of[:, None].expand(-1, group), page_max, "amax")
    probs = torch.exp(scores - row_max[row_of][:, :, None])  # [nnz, G, P]
    denom = torch.zeros(rows, group, device=q.device).index_add_(0, row_of, probs.sum(2))
    weighted = torch.einsum("ngp,npd->ngd", probs, pages[:, 1])  # [nnz, G, D]
    out = torch.zeros(rows, group, dim, device=q.device).index_add_(0, row_of, weighted)
    out = out / denom.clamp_min(torch.finfo(torch.float32).tiny)[:, :, None]
    return out.reshape(batch, q_heads, dim).to(q.dtype)
