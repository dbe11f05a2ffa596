"""Bulk load of pages into the device cache: launches ``kernels/page_scatter.cu``."""

from __future__ import annotations

import numpy as np
import torch

from kernels.backend import KernelArg, KernelBackend
from kernels.checks import check_device, check_index
from kernels.cupy_backend import default_backend
from kernels.registry import SCATTER_UNITS


def scatter_unit(page_bytes: int, *tensors: torch.Tensor) -> int:
    """Widest copy unit (bytes) dividing the page size and every tensor's start address."""
    for unit in SCATTER_UNITS:
        if page_bytes % unit == 0 and all(t.data_ptr() % unit == 0 for t in tensors):
            return unit
    raise ValueError("pages must be a whole number of 2-byte units")


def page_scatter(
    staging: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    *,
    backend: KernelBackend | None = None,
) -> None:
    """Bulk-load scatter ``kv_cache[slots[i]] = staging[i]`` in place (CUDA kernel).

    Same semantics as :func:`kernels.reference.page_scatter_ref` for valid slots.

    Args:
        staging: ``[n, 2, P, D]`` pages gathered contiguously (already on the device).
        kv_cache: ``[S, 2, P, D]`` page slots, ``staging``'s dtype.
        slots: ``[n]`` int32 distinct destination slots; slots outside ``[0, S)`` are skipped.
        backend: where to run; default :class:`kernels.cupy_backend.CupyBackend` (torch CUDA
            tensors).
    """
    backend = backend if backend is not None else default_backend()
    device = check_device(backend, staging=staging, kv_cache=kv_cache, slots=slots)
    check_index("slots", slots)
    if staging.dim() != 4 or kv_cache.dim() != 4 or staging.shape[1:] != kv_cache.shape[1:]:
        raise ValueError(
            f"staging [n, 2, P, D] and kv_cache [S, 2, P, D] must share their page shape, "
            f"got {tuple(staging.shape)} and {tuple(kv_cache.shape)}"
        )
    if staging.dtype != kv_cache.dtype:
        raise ValueError(f"staging must be {kv_cache.dtype}, got {staging.dtype}")
    if slots.numel() != staging.shape[0]:
        raise ValueError(f"slots must have {staging.shape[0]} entries, got {slots.numel()}")
    if staging.shape[0] == 0:
        return
    page_bytes = staging[0].numel() * staging.element_size()
    unit = scatter_unit(page_bytes, staging, kv_cache)
    units = page_bytes // unit
    threads = 128
    chunks = max(1, min(65535, units // (threads * 16)))  # >= 16 units per thread
    args: list[KernelArg] = [staging, kv_cache, slots, np.int64(units), np.int32(kv_cache.shape[0])]
    backend.launch(
        "page_scatter",
        f"icecache_page_scatter_u{unit}",
        (staging.shape[0], chunks, 1),
        (threads, 1, 1),
        args,
        0,
        device,
    )
