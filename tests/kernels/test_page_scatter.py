"""kernels/page_scatter.cu against the torch reference, on the CPU emulator and on CUDA."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from kernels import emulator
from kernels.backend import KernelBackend
from kernels.cupy_backend import CupyBackend
from kernels.page_scatter import page_scatter, scatter_unit
from kernels.reference import page_scatter_ref
from tests.kernels import require_emulator
from tests.kernels.recording import RecordingBackend


class Runner(NamedTuple):
    backend: KernelBackend
    device: torch.device


@pytest.fixture(scope="module", params=["emulator", pytest.param("cupy", marks=pytest.mark.gpu)])
def runner(request: pytest.FixtureRequest) -> Runner:
    """The emulator on CPU tensors, or CuPy on CUDA tensors (skipped without them)."""
    if request.param == "emulator":
        require_emulator()
        return Runner(emulator.EmulatorBackend(), torch.device("cpu"))
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy", reason="CuPy is not installed")
    return Runner(CupyBackend(), torch.device("cuda"))


def _pages(
    count: int, page_size: int, head_dim: int, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 2, page_size, head_dim, generator=gen).to(dtype)


def scatter_and_check(
    staging: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor, runner: Runner
) -> None:
    """Scatters with the kernel and checks the whole cache against the reference."""
    want = kv_cache.cpu().clone()
    page_scatter_ref(staging.cpu(), want, slots.cpu())
    got = kv_cache.to(runner.device)
    page_scatter(staging.to(runner.device), got, slots.to(runner.device), backend=runner.backend)
    # Bitwise: untouched slots keep their NaN poison, copied pages are exact.
    assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_scatter_matches_reference(runner: Runner, dtype: torch.dtype, head_dim: int):
    cache = torch.full((20, 2, 16, head_dim), float("nan")).to(dtype)
    staging = _pages(7, 16, head_dim, dtype, seed=head_dim)
    slots = torch.randperm(20, generator=torch.Generator().manual_seed(1))[:7].int()
    scatter_and_check(staging, cache, slots, runner)


def test_large_pages_use_several_chunks(runner: Runner):
    # 2 * 64 * 256 * 4 bytes = 8192 16-byte units: 4 chunks of 128 threads x 16 units.
    cache = torch.full((3, 2, 64, 256), float("nan"))
    staging = _pages(2, 64, 256, torch.float32, seed=2)
    scatter_and_check(staging, cache, torch.tensor([2, 0], dtype=torch.int32), runner)


@pytest.mark.parametrize("offset_elems,unit", [(0, 16), (4, 8), (2, 4), (1, 2)])
def test_unaligned_staging_uses_narrower_units(runner: Runner, offset_elems: int, unit: int):
    # A staging view that starts offset_elems fp16 elements into its buffer.
    pages = _pages(3, 4, 64, torch.float16, seed=unit)
    buffer = torch.zeros(pages.numel() + 8, dtype=torch.float16, device=runner.device)
    staging = buffer[offset_elems : offset_elems + pages.numel()].view_as(pages)
    staging.copy_(pages)
    assert scatter_unit(pages[0].numel() * 2, staging) == unit
    cache = torch.full((5, 2, 4, 64), float("nan"), dtype=torch.float16)
    scatter_and_check(staging, cache, torch.tensor([4, 1, 0], dtype=torch.int32), runner)


def test_empty_staging_is_a_no_op(runner: Runner):
    cache = torch.ones(4, 2, 16, 64)
    staging = torch.empty(0, 2, 16, 64)
    scatter_and_check(staging, cache, torch.empty(0, dtype=torch.int32), runner)


def test_out_of_range_slots_are_skipped(runner: Runner):
    cache = torch.zeros(4, 2, 16, 64, device=runner.device)
    staging = _pages(3, 16, 64, torch.float32, seed=3).to(runner.device)
    slots = torch.tensor([1, 4, -1], dtype=torch.int32, device=runner.device)
    page_scatter(staging, cache, slots, backend=runner.backend)
    assert torch.equal(cache[1], staging[0])
    assert torch.all(cache[[0, 2, 3]] == 0)


def test_scatter_plan_uses_16_byte_units():
    backend = RecordingBackend()
    cache = torch.zeros(10, 2, 16, 128, dtype=torch.bfloat16)
    staging = torch.zeros(3, 2, 16, 128, dtype=torch.bfloat16)
    page_scatter(staging, cache, torch.tensor([1, 5, 9], dtype=torch.int32), backend=backend)
    (launch,) = backend.launches
    assert launch.kernel == "icecache_page_scatter_u16"
    assert launch.grid == (3, 1, 1) and launch.block == (128, 1, 1)
    assert launch.args[3:] == [512, 10]  # 16-byte units per page, slots in the cache


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
        page_scatter(staging, cache, slots, backend=RecordingBackend())
