"""Every kernel source compiles for the GPUs we target, the way CuPy will compile it.

* nvcc: each ``kernels/<module>.cu`` to a cubin for sm_80 and sm_90, warnings as errors.
  Successful compiles are cached under ``build/nvcc/`` by a hash of the source and flags.
* NVRTC (what ``cupy.RawModule`` uses): the inlined source with the CuPy backend's options,
  from ``ICECACHE_NVRTC_LIB``, the ``nvidia-cuda-nvrtc`` wheel of the dev extras, or the
  system library; missing, it fails on linux x86_64 (where the wheel exists) and skips
  elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.registry import KERNEL_DIR, MODULE_KERNELS, NVRTC_OPTIONS, load_source

ARCHS = ("sm_80", "sm_90")
NVCC_FLAGS = ("-cubin", "-std=c++17", "-Werror", "all-warnings")
CACHE_DIR = KERNEL_DIR.parent / "build" / "nvcc"


class NvccJob:
    """One module compiled for one arch, started at once; ``errors()`` waits for it."""

    def __init__(self, module: str, arch: str) -> None:
        source = load_source(module)
        key = hashlib.sha256(f"{source}{arch}{NVCC_FLAGS}".encode()).hexdigest()[:16]
        self.stamp = CACHE_DIR / f"{module}-{arch}-{key}.ok"
        self.process: subprocess.Popen[str] | None = None
        if self.stamp.exists():
            return
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        command = [
            "nvcc",
            f"-arch={arch}",
            *NVCC_FLAGS,
            f"-I{KERNEL_DIR}",
            str(KERNEL_DIR / f"{module}.cu"),
            "-o",
            str(CACHE_DIR / f"{module}-{arch}-{key}.cubin"),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def errors(self) -> str:
        """nvcc's output if it failed, '' on success (then cached)."""
        if self.process is None:
            return ""
        output, _ = self.process.communicate()
        if self.process.returncode != 0:
            return output
        self.stamp.touch()
        return ""


@pytest.fixture(scope="module")
def nvcc_results() -> dict[tuple[str, str], NvccJob]:
    """Every nvcc compile, all started from this thread before the first is awaited.

    They were started from a thread pool until one full run's exec failed with EFAULT
    ("Bad address", cause not pinned down); starting them here, no two threads spawn at
    once."""
    if shutil.which("nvcc") is None:
        pytest.fail("nvcc is not on PATH: install the CUDA toolkit's nvcc")
    return {(m, a): NvccJob(m, a) for m in MODULE_KERNELS for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(MODULE_KERNELS))
def test_nvcc_compiles(nvcc_results: dict[tuple[str, str], NvccJob], module: str, arch: str):
    errors = nvcc_results[module, arch].errors()
    assert errors == "", f"nvcc -arch={arch} kernels/{module}.cu failed:\n{errors}"


@pytest.mark.parametrize("module", sorted(MODULE_KERNELS))
def test_source_declares_every_kernel(module: str):
    source = load_source(module)
    declared = set(re.findall(r"^\w+_KERNEL\((\w+),", source, re.MULTILINE))
    assert declared == set(MODULE_KERNELS[module])


@pytest.mark.parametrize("module", sorted(MODULE_KERNELS))
def test_source_needs_no_cuda_headers(module: str):
    # NVRTC in CuPy 13+ has no bundled CUDA headers: the inlined source must stand alone.
    assert "#include" not in load_source(module)


def _find_nvrtc() -> Path | None:
    explicit = os.environ.get("ICECACHE_NVRTC_LIB")
    if explicit:
        return Path(explicit)
    for package in ("nvidia.cu13", "nvidia.cuda_nvrtc"):
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            continue
        roots = spec.submodule_search_locations if spec is not None else None
        for root in roots or []:
            found = sorted(Path(root, "lib").glob("libnvrtc.so*"))
            if found:
                return found[0]
    name = ctypes.util.find_library("nvrtc")
    return Path(name) if name else None


@pytest.mark.parametrize("arch", ("compute_80", "compute_90"))
@pytest.mark.parametrize("module", sorted(MODULE_KERNELS))
def test_nvrtc_compiles(module: str, arch: str):
    path = _find_nvrtc()
    if path is None and (sys.platform, platform.machine()) != ("linux", "x86_64"):
        pytest.skip("the nvidia-cuda-nvrtc wheel is for linux x86_64; set ICECACHE_NVRTC_LIB")
    if path is None:
        pytest.fail("libnvrtc not found: `pip install -e '.[dev]'` installs nvidia-cuda-nvrtc")
    for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(str(path))
    program = ctypes.c_void_p()
    source = load_source(module).encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"k.cu", 0, None, None) == 0
    options = [o.encode() for o in (*NVRTC_OPTIONS, f"-arch={arch}")]
    status = nvrtc.nvrtcCompileProgram(
        program, len(options), (ctypes.c_char_p * len(options))(*options)
    )
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, f"NVRTC failed on kernels/{module}.cu:\n{log.value.decode()}"
