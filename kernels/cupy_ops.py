"""CUDA kernels through CuPy: source loader, launch plans and the torch-facing wrappers.

The kernels live in ``kernels/*.cu`` and are compiled once per device with
``cupy.RawModule`` (NVRTC). torch tensors reach them zero-copy through DLPack, on torch's
current stream. The launch arithmetic (grids, split-K, shared memory, workspaces) is
written once here and drives any :class:`KernelBackend`: :class:`CupyBackend` on a GPU, or
the CPU emulator of ``kernels/emulator.py`` that runs the same ``.cu`` sources in the tests.

Public API:
    paged_decode_attention(q, kv_cache, indptr, indices, page_lens, sm_scale) -> out
    page_scatter(staging, kv_cache, slots)
    decode_attention(...) / scatter_pages(...): torch reference on CPU tensors, CuPy on CUDA.

``cupy`` is imported lazily: this module imports on machines without it.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from kernels.torch_paged import paged_decode_attention_torch

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
HEAD_DIMS = (64, 128, 256)
DTYPE_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
MAX_GROUP = 8  # GQA ratio supported by the decode kernel (kMaxGroup in paged_attention.cu)
MAX_SPLITS = 256
MAX_SHARED_BYTES = 48 * 1024
SCATTER_UNITS = (16, 8, 4, 2)  # copy unit sizes in bytes, widest first
LOG2E = math.log2(math.e)
_F32 = torch.float32
NVRTC_OPTIONS: tuple[str, ...] = ()
"""Options of ``cupy.RawModule`` (NVRTC picks the device's architecture; C++17 is its default,
and an explicit ``-std`` could clash with one that CuPy adds)."""

MODULE_KERNELS: dict[str, tuple[str, ...]] = {
    "paged_attention": tuple(
        [f"icecache_decode_{t}_d{d}" for t in DTYPE_TAGS.values() for d in HEAD_DIMS]
        + [f"icecache_decode_merge_{t}" for t in DTYPE_TAGS.values()]
    ),
    "page_scatter": tuple(f"icecache_page_scatter_u{u}" for u in SCATTER_UNITS),
}
"""Kernel names of each ``kernels/<module>.cu``."""

CUPY_INSTALL_HINT = (
    "CuPy is needed to run the IceCache kernels on CUDA tensors: "
    "pip install cupy-cuda12x (CUDA 12) or pip install cupy-cuda13x (CUDA 13)"
)

KernelArg = torch.Tensor | np.int32 | np.int64 | np.float32
"""A kernel argument: a tensor (passed as its data pointer) or a typed scalar."""


class KernelBackend(Protocol):
    """Something that runs the kernels of :data:`MODULE_KERNELS` on tensors of one device type."""

    device_type: str
    """``"cuda"`` or ``"cpu"``: where the tensors it takes live."""

    def num_sms(self, device: torch.device) -> int:
        """Multiprocessors of ``device``: sizes the split-K grid."""
        ...

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


# ---- CuPy backend ------------------------------------------------------------------------------


@functools.cache
def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(CUPY_INSTALL_HINT) from exc
    return cupy


@functools.cache
def _raw_module(module: str, device_index: int) -> Any:
    """The compiled ``kernels/<module>.cu`` on one device (compiled once per process)."""
    cupy = _cupy()
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
        _cupy()

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
        cupy = _cupy()
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
def _default_backend() -> CupyBackend:
    return CupyBackend()


# ---- argument checks ---------------------------------------------------------------------------


def _check_device(backend: KernelBackend, **tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"tensors must share one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != backend.device_type:
        raise ValueError(
            f"this backend runs on {backend.device_type} tensors, got {device.type} "
            "(use decode_attention/scatter_pages to dispatch by device)"
        )
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return device


def _check_index(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 1 or tensor.dtype != torch.int32:
        raise ValueError(
            f"{name} must be a 1-D int32 tensor, got {tensor.dtype} of shape "
            f"{tuple(tensor.shape)} (use .to(torch.int32))"
        )


def _i32(*values: int) -> list[KernelArg]:
    return [np.int32(v) for v in values]


def _check_aligned(name: str, tensor: torch.Tensor, alignment: int = 16) -> None:
    if tensor.data_ptr() % alignment:
        raise ValueError(f"{name} must start on a {alignment}-byte boundary (use .clone())")


# ---- paged decode attention --------------------------------------------------------------------


class DecodePlan(NamedTuple):
    """Launch shape of one decode call."""

    rows: int
    """``B * kv_heads``: one CSR row per (sequence, KV head)."""
    group: int
    """Query heads per KV head."""
    num_splits: int
    """Blocks per row (split-K over its pages); 1 writes the output directly."""
    warps: int
    """Warps per decode block."""
    shared_mem: int
    """Dynamic shared memory of a decode block, in bytes."""


def decode_shared_floats(group: int, head_dim: int, warps: int, page_size: int) -> int:
    """Floats of dynamic shared memory of a decode block (the layout in paged_attention.cu)."""
    main = group * (head_dim + 4) + 2 * warps * group * page_size
    reduction = warps * group * (head_dim + 1)
    return max(main, reduction) + 2 * warps * group


def choose_num_splits(rows: int, nnz: int, warps: int, num_sms: int) -> int:
    """Splits per row: enough blocks to fill the device twice, at least a page per warp.

    Uses only sizes (no device synchronisation): ``nnz / rows`` is the mean row length.
    """
    if rows == 0 or nnz == 0:
        return 1
    wanted = math.ceil(2 * num_sms / rows)
    affordable = max(1, nnz // (rows * warps))
    return max(1, min(wanted, affordable, MAX_SPLITS))


def plan_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    num_sms: int,
    num_splits: int | None = None,
    num_warps: int = 4,
) -> DecodePlan:
    """Checks the decode arguments' shapes and dtypes and sizes the launch."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    batch, q_heads, head_dim = q.shape
    if kv_cache.dim() != 4 or kv_cache.shape[1] != 2 or kv_cache.shape[3] != head_dim:
        raise ValueError(
            f"kv_cache must be [S, 2, P, {head_dim}], got shape {tuple(kv_cache.shape)}"
        )
    if q.dtype not in DTYPE_TAGS or kv_cache.dtype != q.dtype:
        raise ValueError(
            f"q and kv_cache must share a dtype among float32/float16/bfloat16, "
            f"got {q.dtype} and {kv_cache.dtype}"
        )
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    for name, tensor in (("indptr", indptr), ("indices", indices), ("page_lens", page_lens)):
        _check_index(name, tensor)
    if indices.numel() != page_lens.numel():
        raise ValueError("indices and page_lens must have one entry per selected page")
    rows = indptr.numel() - 1
    if batch == 0 or rows <= 0 or rows % batch or q_heads % (rows // batch):
        raise ValueError(
            f"indptr must have B * kv_heads + 1 entries with kv_heads dividing Hq={q_heads}, "
            f"got {indptr.numel()} for B={batch}"
        )
    group = q_heads // (rows // batch)
    if group > MAX_GROUP:
        raise ValueError(f"at most {MAX_GROUP} query heads per KV head, got {group}")
    if not 1 <= num_warps <= 8:
        raise ValueError(f"num_warps must be in 1..8, got {num_warps}")
    if num_splits is None:
        num_splits = choose_num_splits(rows, indices.numel(), num_warps, num_sms)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    page_size = kv_cache.shape[2]
    shared_mem = 4 * decode_shared_floats(group, head_dim, num_warps, page_size)
    if shared_mem > MAX_SHARED_BYTES:
        raise ValueError(
            f"page_size={page_size}, head_dim={head_dim}, group={group} need {shared_mem} "
            f"bytes of shared memory with {num_warps} warps; use fewer warps"
        )
    return DecodePlan(rows, group, num_splits, num_warps, shared_mem)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    backend: KernelBackend | None = None,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over selected KV pages (CUDA kernel).

    Same semantics as :func:`kernels.reference.paged_decode_attention_ref`.

    Args:
        q: ``[B, Hq, D]`` queries, float32/float16/bfloat16, ``D`` in 64/128/256.
        kv_cache: ``[S, 2, P, D]`` page slots, ``q``'s dtype; ``[:, 0]`` keys, ``[:, 1]``
            values.
        indptr: ``[B * Hkv + 1]`` int32 CSR row pointers; row ``b * Hkv + h`` serves query
            heads ``h * G .. h * G + G - 1`` of sequence ``b`` (``G = Hq // Hkv <= 8``).
        indices: ``[nnz]`` int32 slots of the selected pages (values are not checked).
        page_lens: ``[nnz]`` int32 valid tokens at the start of each page (clamped to ``P``;
            a page with ``<= 0`` is skipped).
        sm_scale: softmax scale, usually ``D ** -0.5``.
        out: optional ``[B, Hq, D]`` output buffer in ``q``'s dtype.
        num_splits: blocks per CSR row (split-K); default: sized to fill the device.
        num_warps: warps per block (1..8).
        backend: where to run; default :class:`CupyBackend` (torch CUDA tensors).

    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype (``out`` if given); float32 accumulation. A row with
        no pages gives 0.
    """
    backend = backend if backend is not None else _default_backend()
    tensors = {"q": q, "kv_cache": kv_cache, "indptr": indptr, "indices": indices}
    device = _check_device(backend, page_lens=page_lens, **tensors)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
    _check_device(backend, out=out, q=q)
    if q.numel() == 0:
        return out
    _check_aligned("kv_cache", kv_cache)
    plan = plan_decode(
        q, kv_cache, indptr, indices, page_lens, backend.num_sms(device), num_splits, num_warps
    )
    tag, head_dim = DTYPE_TAGS[q.dtype], q.shape[2]
    if plan.num_splits == 1:  # the kernel writes out directly; partial pointers unused
        part_o = part_lse = out
    else:
        part_o = backend.empty((plan.rows, plan.num_splits, plan.group, head_dim), _F32, device)
        part_lse = backend.empty((plan.rows, plan.num_splits, plan.group), _F32, device)
    decode_args: list[KernelArg] = [q, kv_cache, indptr, indices, page_lens, out, part_o, part_lse]
    decode_args += _i32(plan.group, kv_cache.shape[2], plan.num_splits)
    decode_args.append(np.float32(sm_scale * LOG2E))
    grid, block = (plan.rows, plan.num_splits, 1), (32 * plan.warps, 1, 1)
    kernel = f"icecache_decode_{tag}_d{head_dim}"
    backend.launch("paged_attention", kernel, grid, block, decode_args, plan.shared_mem, device)
    if plan.num_splits > 1:
        merge_args = [part_o, part_lse, out, *_i32(plan.group, head_dim, plan.num_splits)]
        merge_smem = 4 * plan.group * plan.num_splits  # weights [G][splits]
        kernel = f"icecache_decode_merge_{tag}"
        grid, block = (plan.rows, 1, 1), (128, 1, 1)
        backend.launch("paged_attention", kernel, grid, block, merge_args, merge_smem, device)
    return out


# ---- page scatter ------------------------------------------------------------------------------


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
        backend: where to run; default :class:`CupyBackend` (torch CUDA tensors).
    """
    backend = backend if backend is not None else _default_backend()
    device = _check_device(backend, staging=staging, kv_cache=kv_cache, slots=slots)
    _check_index("slots", slots)
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


# ---- dispatch by device ------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    page_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Paged decode attention on ``q``'s device: vectorized torch on CPU, CUDA kernel on GPU.

    Shapes as in :func:`paged_decode_attention`; returns ``[B, Hq, D]``. On CUDA tensors
    without CuPy installed it raises ``RuntimeError`` with the install command.
    """
    if q.device.type == "cpu":
        return paged_decode_attention_torch(q, kv_cache, indptr, indices, page_lens, sm_scale)
    return paged_decode_attention(q, kv_cache, indptr, indices, page_lens, sm_scale)


def scatter_pages(staging: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """``kv_cache[slots[i]] = staging[i]`` on ``kv_cache``'s device (``index_copy_`` on CPU).

    Shapes as in :func:`page_scatter`. On CUDA tensors without CuPy installed it raises
    ``RuntimeError`` with the install command.
    """
    if kv_cache.device.type == "cpu":  # index_put_ (kv_cache[slots] = ...) costs milliseconds
        kv_cache.index_copy_(0, slots.long(), staging.to(kv_cache.dtype))
        return
    page_scatter(staging, kv_cache, slots)
