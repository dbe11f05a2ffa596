"""One-shot GPU check of the IceCache kernels: correctness, decode speed, bulk-load bandwidth.

Run from the repository root on a machine with a CUDA GPU, torch and CuPy (no install of
this package needed, no network)::

    python bench/gpu_check.py [--out bench/results/gpu.md] [--budget 270]

Sections (markdown written after each one, so a timeout keeps what was measured):
  1. correctness grid of the CuPy kernels against ``kernels/reference.py``;
  2. reference bandwidths: device-to-device copy, pinned host-to-device copy;
  3. paged sparse decode vs torch SDPA over the same tokens gathered dense, for an 8B-class
     shape (32 query heads, 8 KV heads, head dim 128, pages of 16) at batch 1/16/64 and
     64/128/256/1024 selected tokens, fp16 and bf16, timed with CUDA events (median);
  3b. launch-shape sweep of the decode kernel: compiled variants, warps, split sizes (fp16);
  3c. host time of an eager decode call and of its parts;
  4. bulk load: pinned staging -> one H2D copy -> scatter kernel, vs pinned H2D bandwidth;
  5. the ``@pytest.mark.gpu`` tests of ``tests/kernels`` when pytest is installed;
  6. ``bench/gpu_engine_check.py`` (the engine on CUDA against the CPU) when faiss-cpu is.
The report goes to ``--out`` and, when the environment names a directory in ``OUT``, to
``$OUT/gpu.md`` too.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import cupy_backend  # noqa: E402
from kernels.backend import KernelArg  # noqa: E402
from kernels.cupy_backend import CupyBackend, cupy_module  # noqa: E402
from kernels.decode_plan import DecodePlan, plan_decode  # noqa: E402
from kernels.page_scatter import page_scatter  # noqa: E402
from kernels.paged_attention import paged_decode_attention  # noqa: E402
from kernels.reference import page_scatter_ref, paged_decode_attention_ref  # noqa: E402
from kernels.registry import HEAD_DIMS  # noqa: E402

logger = logging.getLogger("gpu_check")

HQ, HKV, DIM, PAGE = 32, 8, 128, 16  # Llama-3.1-8B attention
BATCHES = (1, 16, 64)
TOKENS = (64, 128, 256, 1024)
VARIANTS = 4  # distinct selections rotated through, so timings are not one L2-hot input
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class Report:
    """Markdown sections, rewritten to every destination after each section."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        text = "\n".join(self.lines) + "\n"
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def require_gpu() -> None:
    """Exits with a clear message when CUDA or CuPy is missing."""
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch; run this on a GPU machine")
    try:
        CupyBackend()
    except RuntimeError as exc:
        sys.exit(f"gpu_check: {exc}")


# ---- timing ------------------------------------------------------------------------------------


def eager_us(fn: Callable[[], object], iters: int = 50, repeats: int = 9) -> float:
    """Median microseconds per call of back-to-back calls (host launch overhead included)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(samples)


def graph_us(fns: list[Callable[[], object]], replays: int = 20, repeats: int = 9) -> float:
    """Median microseconds per call, the calls captured in one CUDA graph (GPU time only)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / (replays * len(fns)))
    return statistics.median(samples)


def safe_graph_us(fns: list[Callable[[], object]]) -> float | None:
    try:
        return graph_us(fns)
    except Exception as exc:  # capture support differs across versions: report, go on
        logger.warning("CUDA graph timing failed: %s", exc)
        torch.cuda.synchronize()
        return None


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---- 1. correctness ----------------------------------------------------------------------------


def random_case(
    batch: int, kv_heads: int, group: int, dim: int, dtype: torch.dtype, max_pages: int, seed: int
) -> tuple[list[torch.Tensor], float]:
    """Ragged random CSR selection on the GPU: ``[q, kv_cache, indptr, indices, page_lens]``
    and the softmax scale; unselected slots and page tails are NaN."""
    page_size = PAGE
    gen = torch.Generator().manual_seed(seed)
    rows = batch * kv_heads
    counts = torch.randint(0, max_pages + 1, (rows,), generator=gen)
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0)
    nnz = int(indptr[-1])
    slots = nnz + 5
    indices = torch.randperm(slots, generator=gen)[:nnz].int()
    lens = torch.randint(1, page_size + 1, (nnz,), generator=gen).int()
    kv = torch.full((slots, 2, page_size, dim), float("nan"))
    for slot, length in zip(indices.tolist(), lens.tolist(), strict=True):
        kv[slot, :, :length] = torch.randn(2, length, dim, generator=gen)
    q = torch.randn(batch, kv_heads * group, dim, generator=gen)
    cuda = [t.cuda() for t in (q.to(dtype), kv.to(dtype), indptr, indices, lens)]
    return cuda, dim**-0.5


def check_correctness(report: Report) -> bool:
    failures: list[str] = []
    worst: dict[str, float] = {}
    cases = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for dim in HEAD_DIMS:
            for group in range(1, 9):
                for split_pages in (None, 1, 2):
                    seed = cases
                    case, scale = random_case(3, 2, group, dim, dtype, 6, seed)
                    q, kv, indptr, indices, lens = case
                    out = torch.full_like(q, float("nan"))
                    paged_decode_attention(
                        q, kv, indptr, indices, lens, scale, out=out, split_pages=split_pages
                    )
                    want = paged_decode_attention_ref(q, kv, indptr, indices, lens, scale)
                    err = (out.float() - want.float()).abs().max().item()
                    cases += 1
                    key = f"decode {str(dtype)[6:]}"
                    worst[key] = max(worst.get(key, 0.0), err)
                    if not err <= TOL[dtype] * (1 + want.abs().max().item()):
                        failures.append(
                            f"decode {dtype} D={dim} G={group} split_pages={split_pages}: {err}"
                        )
        staging = torch.randn(37, 2, PAGE, 128, device="cuda").to(dtype)
        cache = torch.full((100, 2, PAGE, 128), float("nan"), device="cuda").to(dtype)
        slots = torch.randperm(100, device="cuda")[:37].int()
        want_cache = cache.clone()
        page_scatter_ref(staging, want_cache, slots)
        page_scatter(staging, cache, slots)
        cases += 1
        if not torch.equal(cache.view(torch.uint8), want_cache.view(torch.uint8)):
            failures.append(f"page_scatter {dtype}: mismatch")
    torch.cuda.synchronize()
    report.add(
        "## 1. Correctness (CuPy kernels vs kernels/reference.py)",
        "",
        f"{cases} cases: dtypes fp32/fp16/bf16 x head dims {HEAD_DIMS} x GQA 1..8 x "
        "split pages {default, 1, 2}, ragged pages, empty rows, NaN-poisoned "
        "slots/tails/outputs; "
        "page scatter bitwise per dtype.",
        "",
        "| kernel | max abs error |",
        "| --- | --- |",
        *[f"| {k} | {v:.2e} |" for k, v in worst.items()],
        "",
        f"**{'PASS' if not failures else 'FAIL'}**" + "".join(f"\n- {f}" for f in failures[:20]),
        "",
    )
    return not failures


# ---- 2. reference bandwidths ------------------------------------------------------------------


class Bandwidths(NamedTuple):
    d2d_gbs: float
    h2d_gbs: float


def copy_gbs(dst: torch.Tensor, src: torch.Tensor, traffic: int) -> float:
    """GB/s of ``dst.copy_(src)`` counting ``traffic`` bytes per copy."""
    return traffic / eager_us(lambda: dst.copy_(src, non_blocking=True), iters=5, repeats=5) / 1e3


def measure_bandwidths(report: Report) -> Bandwidths:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    d2d = copy_gbs(torch.empty_like(src), src, 2 * n)  # read + write
    h = 256 << 20
    h2d = copy_gbs(
        torch.empty(h, dtype=torch.uint8, device="cuda"),
        torch.empty(h, dtype=torch.uint8, pin_memory=True),
        h,
    )
    del src
    torch.cuda.empty_cache()
    report.add(
        "## 2. Reference bandwidths",
        "",
        "| copy | GB/s |",
        "| --- | --- |",
        f"| device-to-device, 1 GiB (read + write) | {d2d:.0f} |",
        f"| pinned host-to-device, 256 MiB | {h2d:.1f} |",
        "",
    )
    return Bandwidths(d2d, h2d)


# ---- 3. decode -------------------------------------------------------------------------------


class DecodeInputs(NamedTuple):
    """Full pages of an 8B-class shape, with VARIANTS disjoint selections of them."""

    q: torch.Tensor
    kv: torch.Tensor
    indptr: torch.Tensor
    selections: list[torch.Tensor]
    lens: torch.Tensor
    out: torch.Tensor


def decode_inputs(batch: int, tokens: int, dtype: torch.dtype) -> DecodeInputs:
    rows = batch * HKV
    nnz = rows * (tokens // PAGE)
    kv = torch.randn(nnz * VARIANTS, 2, PAGE, DIM, device="cuda", dtype=dtype)
    perm = torch.randperm(nnz * VARIANTS, device="cuda").int()
    selections = [perm[v * nnz : (v + 1) * nnz].contiguous() for v in range(VARIANTS)]
    indptr = torch.arange(0, nnz + 1, tokens // PAGE, dtype=torch.int32, device="cuda")
    lens = torch.full((nnz,), PAGE, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HQ, DIM, device="cuda", dtype=dtype)
    return DecodeInputs(q, kv, indptr, selections, lens, torch.empty_like(q))


def decode_row(batch: int, tokens: int, dtype: torch.dtype, d2d_gbs: float) -> str:
    """One table row: sparse kernel vs SDPA on the same tokens (pre-gathered and gathered)."""
    pages = tokens // PAGE
    q, kv, indptr, selections, lens, out = decode_inputs(batch, tokens, dtype)
    nnz = selections[0].numel()
    scale = DIM**-0.5
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]

    def dense(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pages_ = kv[sel.long()].view(batch, HKV, pages, 2, PAGE, DIM)
        k = pages_[:, :, :, 0].reshape(batch, HKV, tokens, DIM)
        v = pages_[:, :, :, 1].reshape(batch, HKV, tokens, DIM)
        return k, v

    gathered = [dense(sel) for sel in selections]
    expanded = [
        (k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)) for k, v in gathered
    ]

    def sparse(sel: torch.Tensor) -> Callable[[], object]:
        return lambda: paged_decode_attention(
            q, kv, indptr, sel, lens, scale, out=out, max_row_pages=pages
        )

    def sdpa_gqa(k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
        return lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    def sdpa_expanded(k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
        return lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale)

    def gather_sdpa(sel: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            k, v = dense(sel)
            return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

        return run

    want = F.scaled_dot_product_attention(q4, *gathered[0], scale=scale, enable_gqa=True)
    got = sparse(selections[0])()
    assert isinstance(got, torch.Tensor)
    err = (got.float() - want.squeeze(2).float()).abs().max().item()

    sparse_graph = safe_graph_us([sparse(s) for s in selections])
    sparse_eager = eager_us(sparse(selections[0]))
    sdpa_times = [
        safe_graph_us([sdpa_gqa(k, v) for k, v in gathered]),
        safe_graph_us([sdpa_expanded(k, v) for k, v in expanded]),
    ]
    sdpa = min((t for t in sdpa_times if t is not None), default=None)
    gathered_sdpa = safe_graph_us([gather_sdpa(s) for s in selections])
    kv_bytes = 2 * nnz * PAGE * DIM * kv.element_size()
    io_bytes = kv_bytes + 2 * q.numel() * q.element_size()
    sparse_time = sparse_graph if sparse_graph is not None else sparse_eager
    gbs = io_bytes / sparse_time / 1e3
    speedup = None if sdpa is None else sdpa / sparse_time
    plan = plan_decode(q, kv, indptr, selections[0], lens, pages)
    return (
        f"| {str(dtype)[6:]} | {batch} | {tokens} | {plan.warps} x {plan.max_splits} | "
        f"{fmt(sparse_graph)} | "
        f"{fmt(sparse_eager)} | {fmt(sdpa_times[0])} | {fmt(sdpa_times[1])} | "
        f"{fmt(gathered_sdpa)} | {fmt(speedup, 2)} | {gbs:.0f} ({100 * gbs / d2d_gbs:.0f}%) | "
        f"{err:.1e} |"
    )


def bench_decode(report: Report, bandwidths: Bandwidths, deadline: float) -> None:
    report.add(
        "## 3. Paged sparse decode vs SDPA on the same tokens",
        "",
        f"Shape: {HQ} query heads, {HKV} KV heads, head dim {DIM}, pages of {PAGE}, full pages; "
        f"inputs rotate over {VARIANTS} disjoint selections. Times in us per call (median). "
        "*graph*: calls captured in a CUDA graph (GPU time); *eager*: back-to-back Python "
        "calls (includes launch overhead). SDPA runs on K/V already gathered dense "
        "(`enable_gqa=True`, or heads pre-expanded); *gather+SDPA* includes the gather. "
        "Speedup = best SDPA / sparse (graph). Bandwidth: K+V+q+out bytes per sparse call, "
        "and its share of the device-to-device copy bandwidth.",
        "",
        "| dtype | batch | tokens | warps x splits | sparse graph | sparse eager | SDPA gqa | "
        "SDPA expanded | gather+SDPA | speedup | GB/s (% D2D) | max err vs SDPA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    )
    rows = [
        (
            f"| {str(dtype)[6:]} | {batch} | {tokens} |",
            functools.partial(decode_row, batch, tokens, dtype, bandwidths.d2d_gbs),
        )
        for dtype in (torch.float16, torch.bfloat16)
        for batch in BATCHES
        for tokens in TOKENS
    ]
    add_rows(report, rows, deadline)


def add_rows(
    report: Report, rows: Sequence[tuple[str, Callable[[], str]]], deadline: float
) -> None:
    """Each table row made by its function, in order, until the deadline; a row that fails
    says why after its ``label`` (its first cells) and the table goes on."""
    for label, make in rows:
        if time.monotonic() > deadline:
            report.add("", "(stopped: time budget spent)", "")
            return
        try:
            row = make()
        except Exception as exc:
            logger.exception("row %s failed", label)
            row = f"{label} error: {exc} |"
        torch.cuda.empty_cache()
        report.add(row)
    report.add("")


# ---- 3b. launch-shape sweep ---------------------------------------------------------------------

SWEEP_SHAPES = ((1, 256), (1, 1024), (16, 256), (16, 1024), (64, 256), (64, 1024))
SWEEP_BUDGETS = (8, 2)  # IC_DECODE_VEC_BUDGET variants (the default is 4 at group 3-4)


def sweep_row(batch: int, tokens: int, budget_backends: list[CupyBackend]) -> str:
    """Graph time of the default plan, of compiled variants, and of other launch shapes."""
    q, kv, indptr, selections, lens, out = decode_inputs(batch, tokens, torch.float16)
    scale = DIM**-0.5
    default = CupyBackend()
    plan = plan_decode(q, kv, indptr, selections[0], lens, tokens // PAGE)

    def call(
        backend: CupyBackend, warps: int | None, split_pages: int | None, sel: torch.Tensor
    ) -> Callable[[], object]:
        return lambda: paged_decode_attention(
            q,
            kv,
            indptr,
            sel,
            lens,
            scale,
            out=out,
            max_row_pages=tokens // PAGE,
            num_warps=warps,
            split_pages=split_pages,
            backend=backend,
        )

    want = call(default, None, None, selections[0])()
    assert isinstance(want, torch.Tensor)
    want = want.clone()

    def timed(backend: CupyBackend, warps: int | None, split_pages: int | None) -> str:
        got = call(backend, warps, split_pages, selections[0])()
        assert isinstance(got, torch.Tensor)
        if not torch.allclose(got.float(), want.float(), atol=TOL[torch.float16], rtol=0.0):
            return "wrong result"
        return fmt(safe_graph_us([call(backend, warps, split_pages, sel) for sel in selections]))

    times = [timed(default, None, None)]
    times += [timed(backend, None, None) for backend in budget_backends]
    times.append(timed(default, 4, None))
    times.append(timed(default, 16, None))
    times.append(timed(default, None, max(1, plan.split_pages // 2)))
    times.append(timed(default, None, 2 * plan.split_pages))
    shape = f"{plan.warps} x {plan.max_splits} of {plan.split_pages}"
    return f"| {batch} | {tokens} | {shape} | " + " | ".join(times) + " |"


def bench_sweep(report: Report, deadline: float) -> None:
    report.add(
        "## 3b. Launch-shape sweep (float16, GPU time in us per call)",
        "",
        "The default plan against kernels compiled with fewer or more key/value vectors held "
        "per lane (`IC_DECODE_VEC_BUDGET`, default 4 at group 3-4), 4 or 16 warps a block "
        "(each with its default split size), and splits of half or twice the default pages. "
        "Same inputs as section 3.",
        "",
        "| batch | tokens | plan (warps x splits of pages) | default | "
        + " | ".join(f"vec budget {b}" for b in SWEEP_BUDGETS)
        + " | 4 warps | 16 warps | split pages / 2 | split pages x 2 |",
        "| --- | --- | --- | --- | "
        + " | ".join("---" for _ in SWEEP_BUDGETS)
        + " | --- | --- | --- | --- |",
    )
    backends = [CupyBackend(defines=(f"IC_DECODE_VEC_BUDGET={b}",)) for b in SWEEP_BUDGETS]
    rows = [
        (f"| {batch} | {tokens} |", functools.partial(sweep_row, batch, tokens, backends))
        for batch, tokens in SWEEP_SHAPES
    ]
    add_rows(report, rows, deadline)


# ---- 3c. host time per call -------------------------------------------------------------------


def host_us(fn: Callable[[], object], calls: int = 2000) -> float:
    """Host microseconds per call of back-to-back calls (the GPU queue drained after)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e6 / calls


def launch_parts(
    kernel: str, plan: DecodePlan, args: list[KernelArg], device: torch.device
) -> list[tuple[str, float]]:
    """Host time of each step of ``CupyBackend.launch``, one at a time."""
    cupy = cupy_module()
    function = cupy_backend._kernel("paged_attention", kernel, 0, ())
    stream = cupy_backend._stream(torch.cuda.current_stream(device).cuda_stream, 0)
    cargs = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
    grid, block = (plan.rows, 1, 1), (32 * plan.warps, 1, 1)

    def enter() -> None:
        with cupy.cuda.Device(0), stream:
            pass

    def raw_launch() -> None:
        function(grid, block, cargs, shared_mem=plan.shared_mem)

    with cupy.cuda.Device(0), stream:
        raw = host_us(raw_launch)
    return [
        ("- torch's current stream", host_us(lambda: torch.cuda.current_stream(device))),
        (
            "- the arguments as pointers",
            host_us(
                lambda: tuple(
                    np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args
                )
            ),
        ),
        ("- entering and leaving CuPy's device and stream", host_us(enter)),
        ("- CuPy's kernel call alone", raw),
    ]


def bench_host(report: Report) -> None:
    """Where an eager call's host time goes, for batch 1 and 256 tokens (fp16)."""
    q, kv, indptr, selections, lens, out = decode_inputs(1, 256, torch.float16)
    sel, scale, backend, pages = selections[0], DIM**-0.5, CupyBackend(), 256 // PAGE
    plan = plan_decode(q, kv, indptr, sel, lens, pages)  # one split a row
    args: list[KernelArg] = [q, kv, indptr, sel, lens, out, out, out]
    args += [np.int32(4), np.int32(PAGE), np.int32(plan.split_pages), np.int32(1)]
    args.append(np.float32(scale))
    kernel = f"icecache_decode_f16_d{DIM}_g{plan.bucket}"
    rows = [
        (
            "the whole call (`paged_decode_attention`)",
            host_us(
                lambda: paged_decode_attention(
                    q, kv, indptr, sel, lens, scale, out=out, max_row_pages=pages
                )
            ),
        ),
        (
            "`plan_decode` (argument checks, launch shape)",
            host_us(lambda: plan_decode(q, kv, indptr, sel, lens, pages)),
        ),
        (
            "`CupyBackend.launch` of the decode kernel",
            host_us(
                lambda: backend.launch(
                    "paged_attention",
                    kernel,
                    (plan.rows, 1, 1),
                    (32 * plan.warps, 1, 1),
                    args,
                    plan.shared_mem,
                    q.device,
                )
            ),
        ),
        ("`torch.empty_like(q)` (for scale)", host_us(lambda: torch.empty_like(q))),
        *launch_parts(kernel, plan, args, q.device),
    ]
    report.add(
        "## 3c. Host time per eager call (batch 1, 256 tokens, float16)",
        "",
        "| what | us per call |",
        "| --- | --- |",
        *[f"| {name} | {value:.1f} |" for name, value in rows],
        "",
    )


# ---- 4. bulk load ------------------------------------------------------------------------------


def bench_bulk_load(report: Report, bandwidths: Bandwidths) -> None:
    report.add(
        "## 4. Bulk load: pinned staging -> one H2D copy -> scatter kernel",
        "",
        f"Pages of [2, {PAGE}, {DIM}] fp16 (8 KiB) into random slots of a 64K-slot cache. "
        "Effective GB/s = page bytes / time of (H2D copy + scatter); goal >= 70% of the "
        f"pinned H2D bandwidth ({bandwidths.h2d_gbs:.1f} GB/s).",
        "",
        "| pages | MiB | H2D only us | H2D + scatter us | scatter alone us | effective GB/s | "
        "% of pinned H2D |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    )
    cache = torch.zeros(1 << 16, 2, PAGE, DIM, dtype=torch.float16, device="cuda")
    for pages in (128, 1024, 4096, 16384):
        host = torch.randn(pages, 2, PAGE, DIM).half().pin_memory()
        staging = torch.empty(host.shape, dtype=host.dtype, device="cuda")
        slots = torch.randperm(cache.shape[0], device="cuda")[:pages].int()

        def copy(host: torch.Tensor = host, staging: torch.Tensor = staging) -> None:
            staging.copy_(host, non_blocking=True)

        def scatter(staging: torch.Tensor = staging, slots: torch.Tensor = slots) -> None:
            page_scatter(staging, cache, slots)

        def load(copy: Callable[[], None] = copy, scatter: Callable[[], None] = scatter) -> None:
            copy()
            scatter()

        load()
        assert torch.equal(cache[slots.long()].cpu(), host)
        copy_us = eager_us(copy, iters=10, repeats=7)
        load_us = eager_us(load, iters=10, repeats=7)
        scatter_us = eager_us(scatter, iters=20, repeats=7)
        nbytes = host.numel() * host.element_size()
        gbs = nbytes / load_us / 1e3
        report.add(
            f"| {pages} | {nbytes / 2**20:.0f} | {copy_us:.1f} | {load_us:.1f} | "
            f"{scatter_us:.1f} | {gbs:.1f} | {100 * gbs / bandwidths.h2d_gbs:.0f}% |"
        )
    report.add("")


# ---- 5. pytest ---------------------------------------------------------------------------------


def run_gpu_tests(report: Report, timeout: float) -> None:
    try:
        import pytest  # noqa: F401
    except ImportError:
        report.add("## 5. GPU tests", "", "pytest is not installed: skipped.", "")
        return
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "--noconftest",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu",
        "tests/kernels",
    ]
    try:
        result = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 10)
        )
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
    except subprocess.TimeoutExpired:
        tail = ["(timed out)"]
    report.add("## 5. GPU tests (`pytest -m gpu tests/kernels`)", "", "```", *tail, "```", "")


# ---- 6. the engine on the GPU --------------------------------------------------------------------


def run_engine_check(report: Report, timeout: float) -> None:
    """``bench/gpu_engine_check.py`` (writes ``bench/results/gpu-engine.md``); its table here."""
    title = "## 6. The engine on the GPU (`bench/gpu_engine_check.py`)"
    try:
        import faiss  # noqa: F401
    except ImportError:
        report.add(title, "", "faiss-cpu is not installed: skipped.", "")
        return
    command = [sys.executable, str(REPO / "bench" / "gpu_engine_check.py")]
    try:
        result = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 10)
        )
        lines = result.stdout.strip().splitlines()
        table = [line for line in lines if line.startswith("|")]
        verdict = [line for line in lines if line.startswith("**")]
        body = [*dict.fromkeys(table), "", *verdict] if table else result.stderr.splitlines()[-15:]
    except subprocess.TimeoutExpired:
        body = ["(timed out)"]
    report.add(title, "", *body, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.md")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for the run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    require_gpu()
    paths = [args.out]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / "gpu.md")
    report = Report(paths)
    props = torch.cuda.get_device_properties(0)
    cupy = cupy_module()
    report.add(
        "# IceCache kernels on GPU",
        "",
        f"- device: {props.name}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), cupy {cupy.__version__}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}; command: `python bench/gpu_check.py`",
        "",
    )
    logger.info("compiling kernels and checking correctness")
    ok = check_correctness(report)
    logger.info("correctness %s; measuring bandwidths", "PASS" if ok else "FAIL")
    bandwidths = measure_bandwidths(report)
    deadline = started + args.budget - 60
    logger.info("decode benchmark")
    bench_decode(report, bandwidths, deadline)
    logger.info("launch-shape sweep")
    bench_sweep(report, deadline)
    logger.info("host time per call")
    bench_host(report)
    logger.info("bulk-load benchmark")
    bench_bulk_load(report, bandwidths)
    remaining = started + args.budget - time.monotonic()
    if remaining > 20:
        logger.info("GPU tests")
        run_gpu_tests(report, remaining - 5)
    remaining = started + args.budget - time.monotonic()
    if remaining > 60:
        logger.info("the engine on the GPU")
        run_engine_check(report, remaining - 5)
    report.add(f"Total time: {time.monotonic() - started:.0f} s.")
    logger.info("wrote %s", ", ".join(map(str, paths)))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
