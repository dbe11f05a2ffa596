"""Runs the CUDA kernels of ``kernels/*.cu`` on the CPU: the test harness of the kernels.

The very same ``.cu`` sources are compiled by g++ together with ``kernels/cuda_emu.h``
(threads of a block as OS threads, futex barriers for ``__syncthreads``/``__syncwarp``,
warp shuffles through a per-warp exchange buffer, block-static shared memory). A generated
translation unit includes the header and the ``.cu`` files and adds ``extern "C"`` entry
points: a table of the kernels of :data:`kernels.registry.MODULE_KERNELS` with their
signatures, and one launch function that takes a ``void**`` argument array like
``cuLaunchKernel``. The shared library is cached under ``build/cuda_emu/<hash>/``, keyed by
the sources, flags and compiler.

:class:`EmulatorBackend` plugs into the launchers (:mod:`kernels.paged_attention`,
:mod:`kernels.page_scatter`), so the tests exercise the real launch code (grids, split-K,
shared memory sizes) on CPU tensors. Every workspace it allocates is filled with NaN, so a
partial result the kernels forget to write is caught.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.backend import KernelArg
from kernels.registry import KERNEL_DIR, MODULE_KERNELS

logger = logging.getLogger(__name__)

REPO_ROOT = KERNEL_DIR.parent
BUILD_DIR = Path(os.environ.get("ICECACHE_EMU_BUILD_DIR", REPO_ROOT / "build" / "cuda_emu"))
CXX = os.environ.get("CXX", "g++")
CXX_FLAGS = (
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fno-strict-aliasing",
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",
    "-Wno-unused-parameter",
    "-Werror",
)
SELFTEST_KERNEL = "emu_selftest"

_SELFTEST_SOURCE = r"""
// Exercises the emulated primitives: 4 ints per thread.
extern "C" __global__ void emu_selftest(int* out) {
  __shared__ int lanes_seen[1024];
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  lanes_seen[tid] = lane;
  __syncthreads();
  const int base = 4 * (blockIdx.x * blockDim.x + tid);
  out[base + 0] = __shfl_xor_sync(0xffffffffu, lane, 1);
  out[base + 1] = __shfl_down_sync(0xffffffffu, lane, 3);
  out[base + 2] = __shfl_sync(0xffffffffu, lane * 10, 5);
  out[base + 3] = lanes_seen[blockDim.x - 1 - tid] + 100 * static_cast<int>(blockIdx.x);
}
"""

_API_SOURCE = r"""
namespace {
const cuda_emu::KernelEntry kKernels[] = {
%(entries)s
};
}  // namespace

extern "C" int emu_kernel_count() { return sizeof(kKernels) / sizeof(kKernels[0]); }
extern "C" const char* emu_kernel_name(int i) { return kKernels[i].name; }
extern "C" const char* emu_kernel_signature(int i) { return kKernels[i].signature.c_str(); }
extern "C" const char* emu_launch(int i, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                  unsigned by, unsigned bz, unsigned long smem, void** args) {
  return kKernels[i].launcher(dim3(gx, gy, gz), dim3(bx, by, bz), smem, args);
}

// The conversions of common.cuh, for exhaustive tests against torch.
extern "C" void emu_half_to_float(const unsigned short* in, float* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = icecache::half_bits_to_float(in[i]);
}
extern "C" void emu_bf16_to_float(const unsigned short* in, float* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = icecache::bf16_bits_to_float(in[i]);
}
extern "C" void emu_float_to_half(const float* in, unsigned short* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = icecache::float_to_half_bits(in[i]);
}
extern "C" void emu_float_to_bf16(const float* in, unsigned short* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = icecache::float_to_bf16_bits(in[i]);
}
"""

_CTYPES: dict[type, tuple[str, type[ctypes._SimpleCData[Any]]]] = {
    np.int32: ("i", ctypes.c_int32),
    np.int64: ("q", ctypes.c_int64),
    np.float32: ("f", ctypes.c_float),
}


def generate_source() -> str:
    """The C++ translation unit: emulation header, every ``.cu``, the kernel table, the API."""
    names = [name for kernels in MODULE_KERNELS.values() for name in kernels] + [SELFTEST_KERNEL]
    entries = "\n".join(f'    cuda_emu::make_entry<&{n}>("{n}"),' for n in names)
    includes = "\n".join(f'#include "{module}.cu"' for module in MODULE_KERNELS)
    return (
        f'#include "cuda_emu.h"\n{includes}\n{_SELFTEST_SOURCE}{_API_SOURCE % {"entries": entries}}'
    )


def _compiler_version() -> str:
    try:
        result = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"the kernel emulator needs a C++20 compiler ({CXX}): {exc}") from exc
    return result.stdout


def source_hash(source: str) -> str:
    """Cache key of the library: generated source, headers, kernels, flags, compiler."""
    digest = hashlib.sha256(source.encode())
    for path in sorted(KERNEL_DIR.glob("*")):
        if path.suffix in (".cu", ".cuh", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join(CXX_FLAGS).encode() + _compiler_version().encode())
    return digest.hexdigest()[:16]


def build_library() -> Path:
    """Compiles the emulator library once per source hash; returns the ``.so`` path."""
    source = generate_source()
    target_dir = BUILD_DIR / source_hash(source)
    library = target_dir / "libicecache_emu.so"
    if library.exists():
        return library
    target_dir.mkdir(parents=True, exist_ok=True)
    with open(target_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same hash
        if library.exists():
            return library
        cpp = target_dir / "emulator.cpp"
        cpp.write_text(source)
        with tempfile.NamedTemporaryFile(dir=target_dir, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        command = [CXX, *CXX_FLAGS, f"-I{KERNEL_DIR}", str(cpp), "-o", str(partial)]
        logger.info("building the kernel emulator: %s", " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"emulator build failed:\n{result.stderr[-20000:]}")
        os.replace(partial, library)
    return library


class EmulatedKernels:
    """The loaded emulator library: kernel table and launches."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        lib.emu_kernel_name.restype = ctypes.c_char_p
        lib.emu_kernel_signature.restype = ctypes.c_char_p
        lib.emu_launch.restype = ctypes.c_char_p
        lib.emu_launch.argtypes = (
            [ctypes.c_int] + [ctypes.c_uint] * 6 + [ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p)]
        )
        self._lib = lib
        self.signatures: dict[str, tuple[int, str]] = {
            lib.emu_kernel_name(i).decode(): (i, lib.emu_kernel_signature(i).decode())
            for i in range(lib.emu_kernel_count())
        }

    def launch(
        self,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[KernelArg],
        shared_mem: int = 0,
    ) -> None:
        """Runs ``kernel`` to completion on the CPU; tensors must be contiguous CPU tensors."""
        index, signature = self.signatures[kernel]
        holders: list[ctypes._SimpleCData[Any]] = []
        codes = ""
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if arg.device.type != "cpu" or not arg.is_contiguous():
                    raise ValueError("the emulator takes contiguous CPU tensors")
                codes += "p"
                holders.append(ctypes.c_void_p(arg.data_ptr()))
            else:
                code, ctype = _CTYPES[type(arg)]
                codes += code
                holders.append(ctype(arg.item()))  # type: ignore[operator]
        if codes != signature:
            raise TypeError(f"{kernel} takes ({signature}), got ({codes})")
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        error = self._lib.emu_launch(index, *grid, *block, shared_mem, argv)
        if error is not None:
            raise RuntimeError(f"{kernel}: {error.decode()}")

    def convert(self, function: str, values: np.ndarray, out_dtype: type) -> np.ndarray:
        """Applies one of the emulator's scalar conversions (``emu_half_to_float``, ...)."""
        values = np.ascontiguousarray(values)
        out: np.ndarray = np.empty(values.shape, dtype=out_dtype)
        getattr(self._lib, function)(
            values.ctypes.data_as(ctypes.c_void_p),
            out.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_long(values.size),
        )
        return out


@functools.cache
def load() -> EmulatedKernels:
    """The emulator library, built on first use (needs g++ with C++20)."""
    return EmulatedKernels(build_library())


def available() -> str | None:
    """None when the emulator can be built here, else the reason it cannot."""
    if shutil.which(CXX) is None:
        return f"no C++ compiler ({CXX}) on PATH"
    return None


class EmulatorBackend:
    """:class:`kernels.backend.KernelBackend` that runs the kernels on CPU tensors."""

    device_type = "cpu"

    def __init__(self, kernels: EmulatedKernels | None = None) -> None:
        self._kernels = kernels if kernels is not None else load()

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, -1, dtype=dtype, device=device)

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
        if kernel not in MODULE_KERNELS[module]:
            raise KeyError(f"{kernel} is not a kernel of kernels/{module}.cu")
        self._kernels.launch(kernel, grid, block, args, shared_mem)
