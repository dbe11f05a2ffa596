"""A sequence's K/V of the layers that attend to every token, kept contiguous on a CPU device.

A layer attends to every token under ``full`` and in the dense layers of every policy. On a
CPU device the paged path gathers each of its pages from the page cache at every step: a
copy of the layer's whole K/V, as costly as the attention itself. ``DenseKV`` keeps those
layers' K/V as ``[kv_heads, capacity, head_dim]`` tensors, appended a token per step, and
attends over them in place. (On a GPU the paged kernel reads pages where they are; there
the engine keeps no copy.)

The copy holds exactly what the store holds (the engine hands it K/V rounded as stored),
in position order, so a sequence attends the same whether its copy was filled by its
prefill, by a replayed prefill or, for a sequence taken over from another worker, from the
store's pages at its first step (``fill_from_pages``): every step of every sequence runs the
same arithmetic over the same values, whatever happened before it.
"""

from __future__ import annotations

import numpy as np
import torch

from cache_service.types import Selection

GROWTH_TOKENS = 64
"""Capacity is a multiple of this, and at least doubles when it grows."""


class DenseKV:
    """Contiguous K/V per dense layer of one sequence."""

    def __init__(self, device: torch.device, layers: int) -> None:
        self.device = device
        self.layers = layers
        """Layers ``0 .. layers - 1`` attend to every token; their K/V are kept here."""
        self._keys: dict[int, torch.Tensor] = {}  # layer -> [H, capacity, D] float32
        self._values: dict[int, torch.Tensor] = {}
        self._length: dict[int, int] = {}

    def covers(self, layer: int) -> bool:
        """Whether ``layer`` attends to every token (and so is kept here)."""
        return layer < self.layers

    def holds(self, layer: int) -> bool:
        """Whether ``layer``'s K/V are here already (not yet, for a sequence taken over)."""
        return layer in self._length

    def length(self, layer: int) -> int:
        """Tokens held for ``layer``."""
        return self._length[layer]

    def held(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values held for ``layer``, ``[kv_heads, tokens, head_dim]`` each."""
        n = self._length[layer]
        return self._keys[layer][:, :n], self._values[layer][:, :n]

    def fill(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold ``keys`` / ``values`` ``[T, kv_heads, head_dim]`` (positions ``0 .. T - 1``)."""
        tokens, heads, dim = keys.shape
        self._keys[layer] = self._empty(heads, tokens + 1, dim)
        self._values[layer] = self._empty(heads, tokens + 1, dim)
        self._keys[layer][:, :tokens] = keys.transpose(0, 1)
        self._values[layer][:, :tokens] = values.transpose(0, 1)
        self._length[layer] = tokens

    def fill_from_pages(self, layer: int, data: np.ndarray, selection: Selection) -> None:
        """Hold what a selection of every page names, ``data`` ``[n, 2, page, dim]`` being
        its pages as read: per KV head, the valid tokens of its pages in order (a dense
        layer's selection lists them in position order)."""
        heads = selection.indptr.size - 1
        per_head = []
        for h in range(heads):
            rows = slice(selection.indptr[h], selection.indptr[h + 1])
            pages, lens = data[rows], selection.lens[rows]
            per_head.append(np.concatenate([p[:, :n] for p, n in zip(pages, lens, strict=True)], 1))
        tokens = {kv.shape[1] for kv in per_head}
        if len(tokens) != 1:
            raise ValueError(f"the KV heads of layer {layer} hold different lengths {tokens}")
        both = torch.from_numpy(np.stack(per_head, 1))  # [2, H, T, D]
        self.fill(layer, both[0].transpose(0, 1), both[1].transpose(0, 1))

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add the next position's ``key`` / ``value`` ``[kv_heads, head_dim]``."""
        n = self._length[layer]
        if n == self._keys[layer].shape[1]:
            for store in (self._keys, self._values):
                grown = self._empty(store[layer].shape[0], 2 * n, store[layer].shape[2])
                grown[:, :n] = store[layer]
                store[layer] = grown
        self._keys[layer][:, n] = key
        self._values[layer][:, n] = value
        self._length[layer] = n + 1

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Softmax attention of ``q`` ``[q_heads, head_dim]`` over every token held (GQA:
        query heads grouped by KV head); returns ``[q_heads, head_dim]`` in ``q``'s dtype."""
        keys, values = self.held(layer)  # [H, T, D]
        heads, dim = keys.shape[0], keys.shape[2]
        qg = q.float().reshape(heads, -1, dim) * scale  # [H, G, D]
        scores = torch.matmul(qg, keys.transpose(1, 2))  # [H, G, T]
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # [H, G, D]
        return out.reshape(q.shape).to(q.dtype)

    def _empty(self, heads: int, tokens: int, dim: int) -> torch.Tensor:
        """Room for ``tokens`` rounded up to ``GROWTH_TOKENS``, left unset: rows past a
        layer's length are never read (zeroing them took 0.5 of 15 s in a profiled 2k
        prefill)."""
        capacity = -(-tokens // GROWTH_TOKENS) * GROWTH_TOKENS
        return torch.empty((heads, capacity, dim), dtype=torch.float32, device=self.device)
