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
    tokens). One gather over the cache, read as ``[S * 2, P * D]`` rows, lays out every key
    page and then every value page, so the keys of a row are ``[W * P, D]`` contiguous and so
    are its values; then ``baddbmm`` (scores, scaled, invalid tokens at -inf), softmax and
    ``bmm``: four passes over the data, whatever the batch, heads or pages.

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
    width, shortest = int(counts.max()), int(counts.min())
    if shortest == width:  # every row has W pages: the CSR is already [rows, W]
        slots, lens = indices.long(), page_lens.long().view(rows, width)
    else:
        col = torch.arange(width, device=q.device)  # [W]
        at = (starts[:, None] + col).clamp_(max=nnz - 1).view(-1)  # [rows * W] into the CSR
        slots = indices.long().index_select(0, at)  # [rows * W]
        lens = page_lens.long().index_select(0, at).view(rows, width)
        lens = lens.masked_fill_(col >= counts[:, None], 0)  # padding: no valid tokens
    pages = torch.cat((2 * slots, 2 * slots + 1))  # [2 * rows * W]: keys, then values
    kv = kv_cache.view(-1, page_size * dim).index_select(0, pages)  # [2 * rows * W, P * D]
    keys, values = kv.view(2, rows, width * page_size, dim).float().unbind(0)  # [rows, W*P, D]
    invalid = torch.arange(page_size, device=q.device) >= lens[:, :, None]  # [rows, W, P]
    bias = torch.where(invalid, float("-inf"), 0.0)  # [rows, W, P] float32
    qg = q.reshape(rows, group, dim).float()  # [rows, G, D]
    scores = torch.baddbmm(  # [rows, G, W * P]
        bias.view(rows, 1, width * page_size), qg, keys.transpose(1, 2), alpha=sm_scale
    )
    out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [rows, G, D]
    if shortest == 0:
        out.masked_fill_((counts == 0)[:, None, None], 0.0)  # an empty row gives 0
    return out.reshape(batch, q_heads, dim).to(q.dtype)
