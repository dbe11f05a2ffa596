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

    The CSR rows are padded to the longest one (padding repeats a selected page with no valid
    tokens), each row's keys and values are gathered once into ``[rows, W * P, D]``, and two
    batched matmuls around a masked softmax serve every row: about fifteen tensor ops per
    call whatever the batch, heads or pages.

    Args:
        q: ``[B, Hq, D]``.
        kv_cache: ``[S, 2, P, D]``.
        indptr: ``[B * Hkv + 1]``; indices, page_lens: ``[nnz]``.

    Returns:
        ``[B, Hq, D]`` in ``q.dtype``.
    """
    batch, q_heads, dim = q.shape
    rows = indptr.numel() - 1
    group = q_heads // (rows // batch)
    page_size = kv_cache.shape[2]
    nnz = indices.numel()
    if nnz == 0:
        return torch.zeros_like(q)
    starts = indptr[:-1].long()
    counts = indptr[1:].long() - starts  # [rows]
    width = int(counts.max())
    col = torch.arange(width, device=q.device)  # [W]
    at = (starts[:, None] + col).clamp_(max=nnz - 1).view(-1)  # [rows * W] into the CSR
    slots = indices.long().index_select(0, at)  # [rows * W]
    lens = page_lens.long().index_select(0, at).view(rows, width)
    lens = lens.masked_fill_(col >= counts[:, None], 0)  # padding: no valid tokens
    keys = kv_cache[:, 0].index_select(0, slots).view(rows, width * page_size, dim).float()
    values = kv_cache[:, 1].index_select(0, slots).view(rows, width * page_size, dim).float()
    invalid = torch.arange(page_size, device=q.device) >= lens[:, :, None]  # [rows, W, P]
    qg = q.reshape(rows, group, dim).float()  # [rows, G, D]
    scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(sm_scale)  # [rows, G, W * P]
    scores.masked_fill_(invalid.view(rows, 1, width * page_size), float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [rows, G, D]
    out.masked_fill_((counts == 0)[:, None, None], 0.0)  # an empty row gives 0
    return out.reshape(batch, q_heads, dim).to(q.dtype)
