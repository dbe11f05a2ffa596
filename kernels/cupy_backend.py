"""The GPU backend: the ``.cu`` sources compiled by CuPy (NVRTC) and launched on torch's stream.

Each module is compiled once per device and process (``cupy.RawModule``); the kernels get
torch tensors as their data pointers and run on torch's current stream. ``cupy`` is imported
lazily: this module imports on machines without it.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
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
def _raw_module(module: str, device_index: int, options: tuple[str, ...]) -> Any:
    """The compiled ``kernels/<module>.cu`` on one device (compiled once per process)."""
    cupy = cupy_module()
    with cupy.cuda.Device(device_index):
        raw = cupy.RawModule(code=load_source(module), options=NVRTC_OPTIONS + options)
        raw.compile()
    logger.info("compiled kernels/%s.cu for device %d %s", module, device_index, options or "")
    return raw


@functools.cache
def _kernel(module: str, kernel: str, device_index: int, options: tuple[str, ...]) -> Any:
    return _raw_module(module, device_index, options).get_function(kernel)


@functools.lru_cache(maxsize=64)
def _stream(handle: int, device_index: int) -> Any:
    """CuPy's handle on the CUDA stream ``handle`` (torch's), made once per stream."""
    cupy = cupy_module()
    with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external: the same handle
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(handle, device_index)


class CupyBackend:
    """Runs the kernels with CuPy on torch's current CUDA stream.

    Raises ``RuntimeError`` (with the install command) when CuPy is not installed.

    Args:
        defines: ``NAME=VALUE`` macros to compile the sources with (tuning variants, such as
            ``IC_DECODE_VEC_BUDGET=4`` in ``bench/gpu_check.py``); none in production.
    """

    device_type = "cuda"

    def __init__(self, defines: tuple[str, ...] = ()) -> None:
        cupy_module()
        self.options = tuple(f"-D{d}" for d in defines)

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
        function = _kernel(module, kernel, index, self.options)
        stream = _stream(torch.cuda.current_stream(device).cuda_stream, index)
        # A tensor goes in as its data pointer (a 64-bit scalar, what a `T*` parameter takes):
        # no DLPack view per argument, which cost more than the launch itself.
        cargs = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
        with cupy.cuda.Device(index), stream:
            function(grid, block, cargs, shared_mem=shared_mem)


@functools.cache
def default_backend() -> CupyBackend:
    """The process's CuPy backend (made on first use)."""
    return CupyBackend()
