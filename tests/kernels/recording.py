"""A CPU backend that records kernel launches instead of running them, and decode inputs of
an 8B-class shape: for exact tests of the launch arithmetic (grids, splits, arguments)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kernels.backend import KernelArg
from kernels.registry import MODULE_KERNELS


class Launch(NamedTuple):
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    args: Sequence[KernelArg]


class RecordingBackend:
    """A CPU backend that records launches instead of running them."""

    device_type = "cpu"

    def __init__(self) -> None:
        self.launches: list[Launch] = []

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def launch(self, module, kernel, grid, block, args, shared_mem, device) -> None:  # noqa: ANN001
        assert kernel in MODULE_KERNELS[module]
        self.launches.append(Launch(kernel, grid, block, shared_mem, args))


def decode_inputs(
    batch: int = 1,
    kv_heads: int = 8,
    group: int = 4,
    head_dim: int = 128,
    pages_per_row: int = 16,
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, ...]:
    """q, kv_cache, indptr, indices, page_lens of an 8B-class shape (pages of 16 tokens)."""
    rows = batch * kv_heads
    nnz = rows * pages_per_row
    q = torch.zeros(batch, kv_heads * group, head_dim, dtype=dtype)
    kv = torch.zeros(nnz, 2, 16, head_dim, dtype=dtype)
    indptr = torch.arange(0, nnz + 1, pages_per_row, dtype=torch.int32)
    indices = torch.arange(nnz, dtype=torch.int32)
    page_lens = torch.full((nnz,), 16, dtype=torch.int32)
    return q, kv, indptr, indices, page_lens
