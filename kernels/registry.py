"""The kernels that exist and their sources: ``kernels/<module>.cu`` and the names in each.

A kernel is named by its module, dtype tag and sizes (``icecache_decode_f16_d128_g4``); this
table is the one list of them, shared by the CuPy backend, the CPU emulator and the compile
tests. :func:`load_source` gives a module's source as NVRTC compiles it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).resolve().parent
HEAD_DIMS = (64, 128, 256)
GROUP_BUCKETS = (1, 2, 4, 8)
"""Query heads per KV head a decode kernel is built for: a call with G heads per KV head runs
the smallest bucket that holds G."""
DTYPE_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
SCATTER_UNITS = (16, 8, 4, 2)  # copy unit sizes in bytes, widest first
NVRTC_OPTIONS: tuple[str, ...] = ()
"""Options of ``cupy.RawModule`` (NVRTC picks the device's architecture; C++17 is its default,
and an explicit ``-std`` could clash with one that CuPy adds)."""

MODULE_KERNELS: dict[str, tuple[str, ...]] = {
    "paged_attention": tuple(
        [
            f"icecache_decode_{t}_d{d}_g{g}"
            for t in DTYPE_TAGS.values()
            for d in HEAD_DIMS
            for g in GROUP_BUCKETS
        ]
        + [f"icecache_decode_merge_{t}" for t in DTYPE_TAGS.values()]
    ),
    "page_scatter": tuple(f"icecache_page_scatter_u{u}" for u in SCATTER_UNITS),
}
"""Kernel names of each ``kernels/<module>.cu``."""


def load_source(module: str) -> str:
    """The source of ``kernels/<module>.cu`` with its local ``#include "x.cuh"`` inlined.

    Inlining makes the text self-contained (NVRTC needs no include path) and makes CuPy's
    compile cache key cover the headers too.
    """
    include = re.compile(r'^#include "([\w./]+)"\s*$', re.MULTILINE)
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:  # headers use #pragma once
            return ""
        seen.add(name)
        text = (KERNEL_DIR / name).read_text()
        return include.sub(lambda m: expand(m.group(1)), text)

    return expand(f"{module}.cu")
