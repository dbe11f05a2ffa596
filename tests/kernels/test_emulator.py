"""The CPU emulator of the CUDA execution model, and the portable conversions it runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import emulator
from kernels.registry import MODULE_KERNELS
from tests.kernels import require_emulator


@pytest.fixture(scope="module")
def kernels() -> emulator.EmulatedKernels:
    require_emulator()
    return emulator.load()


def test_library_is_cached_by_source_hash(kernels: emulator.EmulatedKernels):
    library = emulator.build_library()
    assert library.exists()
    assert library.parent.name == emulator.source_hash(emulator.generate_source())
    assert emulator.build_library() == library


def test_table_holds_every_kernel_of_every_module(kernels: emulator.EmulatedKernels):
    names = {name for module in MODULE_KERNELS.values() for name in module}
    assert names | {emulator.SELFTEST_KERNEL} == set(kernels.signatures)
    assert kernels.signatures["icecache_decode_f16_d128_g4"][1] == "ppppppppiiiif"
    assert kernels.signatures["icecache_page_scatter_u16"][1] == "pppqi"


def test_shuffles_barriers_and_shared_memory(kernels: emulator.EmulatedKernels):
    blocks, threads = 2, 64
    out = torch.full((blocks * threads, 4), -7, dtype=torch.int32)
    kernels.launch(emulator.SELFTEST_KERNEL, (blocks, 1, 1), (threads, 1, 1), [out])
    tid = torch.arange(threads).repeat(blocks)
    block = torch.arange(blocks).repeat_interleave(threads)
    lane = tid % 32
    assert torch.equal(out[:, 0], lane ^ 1)
    assert torch.equal(out[:, 1], torch.where(lane + 3 < 32, lane + 3, lane))
    assert torch.equal(out[:, 2], torch.full_like(lane, 50))
    assert torch.equal(out[:, 3], (threads - 1 - tid) % 32 + 100 * block)


def test_launch_checks_the_signature(kernels: emulator.EmulatedKernels):
    out = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"takes \(p\), got \(pi\)"):
        kernels.launch(emulator.SELFTEST_KERNEL, (1, 1, 1), (1, 1, 1), [out, np.int32(1)])


@pytest.mark.parametrize(
    "block,shared_mem,message",
    [((2048, 1, 1), 0, "1..1024 threads"), ((32, 1, 1), 64 * 1024, "above 48 KiB")],
)
def test_launch_rejects_what_a_gpu_rejects(
    kernels: emulator.EmulatedKernels, block: tuple[int, int, int], shared_mem: int, message: str
):
    out = torch.zeros(4 * 2048, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message):
        kernels.launch(emulator.SELFTEST_KERNEL, (1, 1, 1), block, [out], shared_mem)


def _all_16bit() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _same_bits_or_both_nan(got: torch.Tensor, want: torch.Tensor) -> None:
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = torch.int16 if got.element_size() == 2 else torch.int32
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


@pytest.mark.parametrize(
    "function,dtype", [("emu_half_to_float", torch.float16), ("emu_bf16_to_float", torch.bfloat16)]
)
def test_16bit_to_float_is_exact_for_every_value(
    kernels: emulator.EmulatedKernels, function: str, dtype: torch.dtype
):
    bits = _all_16bit()
    got = torch.from_numpy(kernels.convert(function, bits, np.float32))
    want = torch.from_numpy(bits.view(np.int16)).view(dtype).float()
    _same_bits_or_both_nan(got, want)


def _rounding_cases(dtype: torch.dtype) -> np.ndarray:
    """Every value of ``dtype``, the midpoints between neighbours (ties), random floats."""
    values = torch.from_numpy(_all_16bit().view(np.int16)).view(dtype).double()
    finite = values[torch.isfinite(values)].unique()
    midpoints = (finite[1:] + finite[:-1]) / 2
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    specials = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            65504.0,
            65519.99,
            65520.0,
            65536.0,
            1e10,
            2.0**-25,
            2.0**-25 * 1.0001,
            3 * 2.0**-25,
            1e-30,
        ],
        dtype=np.float32,
    )
    return np.concatenate(
        [
            values.float().numpy(),
            midpoints.float().numpy(),
            random_bits.view(np.float32),
            specials,
            -specials,
        ]
    )


@pytest.mark.parametrize(
    "function,dtype", [("emu_float_to_half", torch.float16), ("emu_float_to_bf16", torch.bfloat16)]
)
def test_float_to_16bit_rounds_like_torch(
    kernels: emulator.EmulatedKernels, function: str, dtype: torch.dtype
):
    values = _rounding_cases(dtype)
    got = torch.from_numpy(kernels.convert(function, values, np.uint16).view(np.int16)).view(dtype)
    want = torch.from_numpy(values).to(dtype)
    _same_bits_or_both_nan(got, want)
