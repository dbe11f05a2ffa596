"""The torch-facing API of kernels/cupy_ops.py: checks, launch plans, dispatch, no-CuPy path."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import pytest
import torch

from kernels import cupy_ops
from kernels.reference import page_scatter_ref, paged_decode_attention_ref


class Launch(NamedTuple):
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    args: Sequence[cupy_ops.KernelArg]


class RecordingBackend:
    """A CPU backend that records launches instead of running them (an H200's 132 SMs)."""

    device_type = "cpu"

    def __init__(self) -> None:
        self.launches: list[Launch] = []

    def num_sms(self, device: torch.device) -> int:
        return 132

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def launch(self, module, kernel, grid, block, args, shared_mem, device) -> None:  # noqa: ANN001
        assert kernel in cupy_ops.MODULE_KERNELS[module]
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


def test_plan_of_an_8b_decode_step_at_batch_1():
    backend = RecordingBackend()
    q, *rest = decode_inputs()
    cupy_ops.paged_decode_attention(q, *rest, 128**-0.5, backend=backend)
    decode, merge = backend.launches
    assert decode.kernel == "icecache_decode_f16_d128"
    assert decode.grid == (8, 4, 1)  # 8 rows x 4 splits of 4 pages: a page per warp
    assert decode.block == (128, 1, 1)
    assert decode.shared_mem == 4 * cupy_ops.decode_shared_floats(4, 128, 4, 16) == 8384
    assert decode.args[8:11] == [4, 16, 4]  # group, page_size, num_splits
    assert float(decode.args[11]) == pytest.approx(128**-0.5 * 1.4426950408889634)
    assert merge.kernel == "icecache_decode_merge_f16"
    assert merge.grid == (8, 1, 1) and merge.shared_mem == 4 * 4 * 4
    part_o, part_lse, out = merge.args[:3]
    assert part_o.shape == (8, 4, 4, 128) and part_lse.shape == (8, 4, 4)
    assert out is decode.args[5]


def test_large_batches_run_unsplit():
    backend = RecordingBackend()
    q, *rest = decode_inputs(batch=64)
    cupy_ops.paged_decode_attention(q, *rest, 0.1, backend=backend)
    (decode,) = backend.launches
    assert decode.grid == (512, 1, 1)
    assert decode.args[6] is decode.args[5]  # no workspace: partials point at out


@pytest.mark.parametrize(
    "rows,nnz,expected",
    [
        (8, 128, 4),
        (8, 512, 16),
        (128, 2048, 3),
        (512, 8192, 1),
        (8, 8, 1),
        (4, 0, 1),
        (1, 10**6, 256),
    ],
)
def test_choose_num_splits(rows: int, nnz: int, expected: int):
    assert cupy_ops.choose_num_splits(rows, nnz, warps=4, num_sms=132) == expected


def test_scatter_plan_uses_16_byte_units():
    backend = RecordingBackend()
    cache = torch.zeros(10, 2, 16, 128, dtype=torch.bfloat16)
    staging = torch.zeros(3, 2, 16, 128, dtype=torch.bfloat16)
    cupy_ops.page_scatter(
        staging, cache, torch.tensor([1, 5, 9], dtype=torch.int32), backend=backend
    )
    (launch,) = backend.launches
    assert launch.kernel == "icecache_page_scatter_u16"
    assert launch.grid == (3, 1, 1) and launch.block == (128, 1, 1)
    assert launch.args[3:] == [512, 10]  # 16-byte units per page, slots in the cache


def _bad_decode_calls() -> Iterator[tuple[str, dict[str, object]]]:
    q, kv, indptr, indices, lens = decode_inputs(batch=2, kv_heads=2, group=2, pages_per_row=2)
    yield "q must be", {"q": q[0]}
    yield "share a dtype", {"kv_cache": kv.float()}
    yield (
        "head_dim must be one of",
        {"q": q[..., :96].contiguous(), "kv_cache": kv[..., :96].contiguous()},
    )
    yield "1-D int32", {"indptr": indptr.long()}
    yield "one entry per selected page", {"page_lens": lens[:-1]}
    yield "B \\* kv_heads \\+ 1", {"indptr": indptr[:-1]}
    yield "at most 8 query heads", {"q": torch.zeros(2, 18, 128, dtype=q.dtype)}
    yield "contiguous", {"q": q.transpose(0, 1).contiguous().transpose(0, 1)}
    yield (
        "16-byte boundary",
        {"kv_cache": torch.zeros(kv.numel() + 1, dtype=kv.dtype)[1:].view(kv.shape)},
    )
    yield "out must be", {"out": torch.empty(2, 4, 64, dtype=q.dtype)}
    yield "num_splits must be", {"num_splits": 0}
    yield "num_warps must be", {"num_warps": 9}
    yield (
        "shared memory",
        {
            "q": torch.zeros(2, 16, 256, dtype=q.dtype),
            "kv_cache": torch.zeros(8, 2, 16, 256, dtype=q.dtype),
            "num_warps": 8,
        },
    )
    yield (
        "runs on cpu tensors",
        {
            "q": q.to("meta"),
            "kv_cache": kv.to("meta"),
            "indptr": indptr.to("meta"),
            "indices": indices.to("meta"),
            "page_lens": lens.to("meta"),
        },
    )


@pytest.mark.parametrize("message,overrides", list(_bad_decode_calls()), ids=lambda v: str(v)[:30])
def test_decode_rejects_bad_arguments(message: str, overrides: dict[str, object]):
    q, kv, indptr, indices, lens = decode_inputs(batch=2, kv_heads=2, group=2, pages_per_row=2)
    kwargs: dict[str, object] = {
        "q": q,
        "kv_cache": kv,
        "indptr": indptr,
        "indices": indices,
        "page_lens": lens,
        "sm_scale": 0.1,
        "backend": RecordingBackend(),
    }
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        cupy_ops.paged_decode_attention(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message,staging,slots",
    [
        ("page shape", torch.zeros(2, 2, 8, 128), torch.zeros(2, dtype=torch.int32)),
        (
            "must be torch.float32",
            torch.zeros(2, 2, 16, 128, dtype=torch.float16),
            torch.zeros(2, dtype=torch.int32),
        ),
        ("2 entries", torch.zeros(2, 2, 16, 128), torch.zeros(3, dtype=torch.int32)),
        ("1-D int32", torch.zeros(2, 2, 16, 128), torch.zeros(2, dtype=torch.int64)),
    ],
)
def test_scatter_rejects_bad_arguments(message: str, staging: torch.Tensor, slots: torch.Tensor):
    cache = torch.zeros(4, 2, 16, 128)
    with pytest.raises(ValueError, match=message):
        cupy_ops.page_scatter(staging, cache, slots, backend=RecordingBackend())


def test_dispatch_runs_the_vectorized_torch_path_on_cpu():
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(6, 2, 16, 64, generator=gen)
    q = torch.randn(1, 4, 64, generator=gen)
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32)
    indices = torch.tensor([5, 0, 1, 2, 3], dtype=torch.int32)
    lens = torch.tensor([16, 3, 7, 16, 1], dtype=torch.int32)
    got = cupy_ops.decode_attention(q, kv, indptr, indices, lens, 0.125)
    want_out = paged_decode_attention_ref(q, kv, indptr, indices, lens, 0.125)
    torch.testing.assert_close(got, want_out, atol=1e-5, rtol=1e-5)

    staging = torch.randn(2, 2, 16, 64, generator=gen)
    want = kv.clone()
    page_scatter_ref(staging, want, torch.tensor([4, 1]))
    cupy_ops.scatter_pages(staging, kv, torch.tensor([4, 1], dtype=torch.int32))
    assert torch.equal(kv, want)


@pytest.fixture
def without_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Makes ``import cupy`` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    cupy_ops._cupy.cache_clear()
    cupy_ops._default_backend.cache_clear()
    yield
    cupy_ops._cupy.cache_clear()
    cupy_ops._default_backend.cache_clear()


def test_device_tensors_without_cupy_say_what_to_install(without_cupy: None):
    q, kv, indptr, indices, lens = (t.to("meta") for t in decode_inputs())
    with pytest.raises(RuntimeError, match="pip install cupy-cuda12x"):
        cupy_ops.decode_attention(q, kv, indptr, indices, lens, 0.1)
    with pytest.raises(RuntimeError, match="cupy-cuda13x"):
        cupy_ops.scatter_pages(kv[:1], kv, indices[:1])


def test_module_imports_without_cupy():
    code = "import sys; sys.modules['cupy'] = None; import kernels.cupy_ops; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cupy_ops.KERNEL_DIR.parent
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_load_source_inlines_the_common_header_once():
    source = cupy_ops.load_source("paged_attention")
    assert "#include" not in source
    assert source.count("struct f16 {") == 1
    assert 'extern "C" __global__' in source
