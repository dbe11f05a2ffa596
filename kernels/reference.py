"""Pure-torch reference kernels: the CPU path of the engine and the oracle of the CUDA tests."""

from __future__ import annotations

import torch


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over selected KV pages.

    Args:
        q: ``[B, Hq, D]`` queries (post-RoPE).
        kv_cache: ``[S, 2, P, D]`` page slots; ``[:, 0]`` keys, ``[:, 1]`` values.
        indptr: ``[B * Hkv + 1]`` int, CSR row pointers; row ``b * Hkv + h`` serves query
            heads ``h * G .. h * G + G - 1`` of sequence ``b`` (``G = Hq // Hkv``).
        indices: ``[nnz]`` int, slots of the selected pages.
        page_lens: ``[nnz]`` int in ``1..P``, valid tokens at the start of each page.
        sm_scale: softmax scale, usually ``D ** -0.5``.

    Returns:
        ``[B, Hq, D]`` in ``q.dtype``; accumulation in float32. A row with no pages gives 0.
    """
    batch, q_heads, dim = q.shape
    rows = indptr.numel() - 1
    assert rows % batch == 0, "indptr must have B * kv_heads + 1 entries"
    kv_heads = rows // batch
    group = q_heads // kv_heads
    page_size = kv_cache.shape[2]
    out = torch.zeros(batch, q_heads, dim, dtype=torch.float32, device=q.device)
    offsets = torch.arange(page_size, device=q.device)
    ptr = indptr.tolist()
    for row in range(rows):
        start, end = ptr[row], ptr[row + 1]
        if start == end:
            continue
        b, h = divmod(row, kv_heads)
        pages = kv_cache[indices[start:end].long()].float()  # [n, 2, P, D]
        valid = (offsets[None, :] < page_lens[start:end, None]).reshape(-1)  # [n * P]
        keys = pages[:, 0].reshape(-1, dim)[valid]  # [T, D]
        values = pages[:, 1].reshape(-1, dim)[valid]
        qh = q[b, h * group : (h + 1) * group].float()  # [G, D]
        probs = torch.softmax((qh @ keys.T) * sm_scale, dim=-1)  # [G, T]
        out[b, h * group : (h + 1) * group] = probs @ values
    return out.to(q.dtype)


def page_scatter_ref(staging: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Bulk-load scatter: ``kv_cache[slots[i]] = staging[i]`` in place.

    Args:
        staging: ``[n, 2, P, D]`` pages gathered contiguously (already on the device).
        kv_cache: ``[S, 2, P, D]`` page slots.
        slots: ``[n]`` int, distinct destination slots.
    """
    kv_cache[slots.long()] = staging.to(kv_cache.dtype)
