"""What runs a kernel: the :class:`KernelBackend` contract and the argument type it takes.

The launchers (``kernels/paged_attention.py``, ``kernels/page_scatter.py``) compute grids,
shared memory and workspaces once and hand them to a backend: :class:`CupyBackend
<kernels.cupy_backend.CupyBackend>` on a GPU, or the CPU emulator of ``kernels/emulator.py``
that runs the same ``.cu`` sources in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

KernelArg = torch.Tensor | np.int32 | np.int64 | np.float32
"""A kernel argument: a tensor (passed as its data pointer) or a typed scalar."""


class KernelBackend(Protocol):
    """Something that runs the kernels of :data:`kernels.registry.MODULE_KERNELS` on tensors
    of one device type."""

    device_type: str
    """``"cuda"`` or ``"cpu"``: where the tensors it takes live."""

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised workspace tensor."""
        ...

    def launch(
        self,
        module: str,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[KernelArg],
        shared_mem: int,
        device: torch.device,
    ) -> None:
        """Launches ``kernel`` of ``kernels/<module>.cu`` (asynchronously on a GPU)."""
        ...
