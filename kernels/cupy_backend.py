"""The GPU backend: the ``.cu`` sources compiled by CuPy (NVRTC) and launched on torch's stream.

Each module is compiled once per device and process (``cupy.RawModule``); torch tensors reach
the kernels zero-copy through DLPack, on torch's current stream. ``cupy`` is imported lazily:
this module imports on machines without it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from kernels.backend import KernelArg
from kernels.registry import NVRTC_OPTIONS, load_source

logger = logging.getLogger(__name__)

CUPY_INSTALL_HINT = (
    "CuPy is needed to run the IceCache kernels on CUDA tensors: "
    "pip install cupy-cuda12x (CUDA 12) or pip install cupy-cuda13x (CUDA 13)"
)


@functools.cache
def cupy_module() -> Any:
    """The ``cupy`` module; ``RuntimeError`` with the install command when it is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(CUPY_INSTALL_HINT) from exc
    return cupy


@functools.cache
def _raw_module(module: str, device_index: int) -> Any:
    """The compiled ``kernels/<module>.cu`` on one device (compiled once per process)."""
    cupy = cupy_module()
    with cupy.cuda.Device(device_index):
        raw = cupy.RawModule(code=load_source(module), options=NVRTC_OPTIONS)
        raw.compile()
    logger.info("compiled kernels/%s.cu for device %d", module, device_index)
    return raw


@functools.cache
def _kernel(module: str, kernel: str, device_index: int) -> Any:
    return _raw_module(module, device_index).get_function(kernel)


class CupyBackend:
    """Runs the kernels with CuPy on torch's current CUDA stream.

    Raises ``RuntimeError`` (with the install command) when CuPy is not installed.
    """

    device_type = "cuda"

    def __init__(self) -> None:
        cupy_module()

    def num_sms(self, device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

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
        cupy = cupy_module()
        index = device.index if device.index is not None else torch.cuda.current_device()
        function = _kernel(module, kernel, index)
        stream = torch.cuda.current_stream(device)
        with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
            # DLPack on the current stream: zero-copy and no extra synchronisation.
            cargs = tuple(_to_cupy(cupy, a) if isinstance(a, torch.Tensor) else a for a in args)
            function(grid, block, cargs, shared_mem=shared_mem)


def _to_cupy(cupy: Any, tensor: torch.Tensor) -> Any:
    """Zero-copy CuPy view of a CUDA tensor (bfloat16, unknown to CuPy, as int16 bits)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return cupy.from_dlpack(tensor)


@functools.cache
def default_backend() -> CupyBackend:
    """The process's CuPy backend (made on first use)."""
    return CupyBackend()
