"""kernels/paged_attention.cu against the torch reference, on the CPU emulator and on CUDA.

Every case poisons what the kernels must not read or must overwrite: unselected page slots
and the tokens past each page's length are NaN, the output buffer starts as NaN, and the
emulator fills its split-K workspaces and shared memory with NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from kernels import emulator
from kernels.backend import KernelBackend
from kernels.cupy_backend import CupyBackend
from kernels.decode_plan import decode_shared_floats
from kernels.paged_attention import paged_decode_attention
from kernels.reference import paged_decode_attention_ref
from kernels.registry import HEAD_DIMS
from tests.kernels import require_emulator
from tests.kernels.recording import RecordingBackend, decode_inputs

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


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


class Case(NamedTuple):
    q: torch.Tensor  # [B, Hq, D]
    kv_cache: torch.Tensor  # [S, 2, P, D]
    indptr: torch.Tensor  # [B * Hkv + 1]
    indices: torch.Tensor  # [nnz]
    page_lens: torch.Tensor  # [nnz]
    sm_scale: float


def make_case(
    batch: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    page_size: int = 16,
    pages: tuple[int, int] = (0, 5),
    seed: int = 0,
    q_scale: float = 1.0,
    full_pages: bool = False,
) -> Case:
    """A random CSR selection: ``pages`` = (min, max) pages per row, ragged page lengths.

    Selected pages have distinct slots; the other slots and each page's tail are NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = batch * kv_heads
    counts = torch.randint(pages[0], pages[1] + 1, (rows,), generator=gen)
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0)
    nnz = int(indptr[-1])
    slots = nnz + 3
    indices = torch.randperm(slots, generator=gen)[:nnz].int()
    if full_pages:
        page_lens = torch.full((nnz,), page_size, dtype=torch.int32)
    else:
        page_lens = torch.randint(1, page_size + 1, (nnz,), generator=gen).int()
    kv = torch.full((slots, 2, page_size, head_dim), float("nan"))
    for slot, length in zip(indices.tolist(), page_lens.tolist(), strict=True):
        kv[slot, :, :length] = torch.randn(2, length, head_dim, generator=gen)
    q = q_scale * torch.randn(batch, kv_heads * group, head_dim, generator=gen)
    return Case(q.to(dtype), kv.to(dtype), indptr, indices, page_lens, head_dim**-0.5)


def check(
    case: Case, runner: Runner, *, split_pages: int | None = None, num_warps: int | None = None
) -> torch.Tensor:
    """Runs the kernel on a NaN-filled output and compares it with the reference."""
    on = [t.to(runner.device) for t in case[:5]]
    out = torch.full_like(on[0], float("nan"))
    got = paged_decode_attention(
        *on,
        case.sm_scale,
        out=out,
        split_pages=split_pages,
        num_warps=num_warps,
        backend=runner.backend,
    )
    assert got is out
    want = paged_decode_attention_ref(*case)
    tol = TOLERANCE[case.q.dtype]
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)
    return got.cpu()


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("group", range(1, 9))
def test_every_gqa_ratio_split_and_unsplit(runner: Runner, group: int):
    dtype = DTYPES[group % 3]
    head_dim = (64, 128)[group % 2]
    case = make_case(2, 2, group, head_dim, dtype, pages=(1, 6), seed=group)
    check(case, runner)  # one split a row
    check(case, runner, split_pages=2)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_and_head_dim(runner: Runner, dtype: torch.dtype, head_dim: int):
    case = make_case(2, 1, 4, head_dim, dtype, pages=(2, 7), seed=head_dim)
    check(case, runner)  # the default plan: one split a row
    check(case, runner, split_pages=1)  # a split a page


def test_rows_without_pages_give_zero(runner: Runner):
    case = make_case(3, 2, 3, 64, torch.float32, pages=(0, 2), seed=5)
    empty = (case.indptr[1:] == case.indptr[:-1]).nonzero().flatten().tolist()
    assert empty, "the seed must produce empty rows"
    for split_pages in (64, 1):
        out = check(case, runner, split_pages=split_pages)
        for row in empty:
            b, h = divmod(row, 2)
            assert torch.all(out[b, 3 * h : 3 * h + 3] == 0)


def test_all_rows_empty(runner: Runner):
    case = make_case(2, 2, 2, 64, torch.float16, pages=(0, 0))
    assert case.indices.numel() == 0
    assert torch.all(check(case, runner) == 0)


@pytest.mark.parametrize("split_pages", [1, 2, 3])
def test_rows_split_differently_in_one_call(runner: Runner, split_pages: int):
    # rows of 1-9 pages: some of one split, the others of up to 9; the merge skips the first
    case = make_case(2, 3, 2, 128, torch.bfloat16, pages=(1, 9), seed=split_pages)
    check(case, runner, split_pages=split_pages)


@pytest.mark.parametrize("num_warps", [1, 2, 8, 16])
def test_warps_per_block(runner: Runner, num_warps: int):
    case = make_case(1, 2, 4, 64, torch.float16, pages=(3, 9), seed=num_warps)
    check(case, runner, num_warps=num_warps)
    check(case, runner, split_pages=2, num_warps=num_warps)


def test_eight_heads_a_kv_head_at_head_dim_256(runner: Runner):
    # the widest instance: chunks of 4 tokens, and the default plan's 5 warps (what fits the
    # shared memory) merge in a block whose warps are not a power of two
    case = make_case(1, 2, 8, 256, torch.float16, pages=(4, 9), seed=11)
    check(case, runner)
    check(case, runner, split_pages=3)


@pytest.mark.parametrize("page_size", [1, 8, 32, 64])
def test_page_sizes(runner: Runner, page_size: int):
    case = make_case(2, 1, 5, 64, torch.float32, page_size=page_size, pages=(1, 4), seed=page_size)
    check(case, runner, split_pages=2)


def test_long_rows_full_pages(runner: Runner):
    case = make_case(1, 2, 8, 128, torch.float16, pages=(24, 40), full_pages=True)
    check(case, runner)
    check(case, runner, split_pages=5)


def test_large_scores_stay_finite(runner: Runner):
    # Scores around +-100: the running max must keep exp2 in range.
    case = make_case(2, 1, 2, 64, torch.float32, pages=(3, 6), q_scale=80.0, seed=3)
    out = check(case, runner, split_pages=2)
    assert torch.isfinite(out).all()


def test_page_lens_beyond_page_and_zero_follow_the_reference(runner: Runner):
    case = make_case(1, 2, 2, 64, torch.float32, pages=(3, 3), full_pages=True, seed=9)
    page_lens = case.page_lens.clone()
    page_lens[0] = 0  # no valid token: the page is skipped
    page_lens[3] = 99  # more than the page holds: the whole page
    check(case._replace(page_lens=page_lens), runner, split_pages=2)


def test_pages_shared_by_rows(runner: Runner):
    case = make_case(2, 2, 2, 64, torch.float16, pages=(3, 3), full_pages=True, seed=4)
    indices = case.indices.clone()
    indices[3:6] = indices[0:3]  # row 1 attends to the pages of row 0
    check(case._replace(indices=indices), runner, split_pages=2)


def test_launches_of_an_8b_decode_step_at_batch_1_over_1024_tokens():
    backend = RecordingBackend()
    q, *rest = decode_inputs(pages_per_row=64)  # 1024 tokens a row
    paged_decode_attention(q, *rest, 128**-0.5, backend=backend)
    decode, merge = backend.launches
    assert decode.kernel == "icecache_decode_f16_d128_g4"
    # 8 rows x 2 splits of 32 pages x 8 warps: 8 chunks of 8 tokens per warp
    assert decode.grid == (8, 2, 1)
    assert decode.block == (256, 1, 1)
    assert decode.shared_mem == 4 * decode_shared_floats(4, 128, 8) == 16640
    assert decode.args[8:12] == [4, 16, 32, 2]  # group, page_size, split_pages, max_splits
    assert float(decode.args[12]) == pytest.approx(128**-0.5 * 1.4426950408889634)
    assert merge.kernel == "icecache_decode_merge_f16"
    assert merge.grid == (8, 1, 1) and merge.shared_mem == 4 * 4 * 2
    part_o, part_lse, out, indptr = merge.args[:4]
    assert part_o.shape == (8, 2, 4, 128) and part_lse.shape == (8, 2, 4)
    assert out is decode.args[5] and indptr is decode.args[2]
    assert merge.args[4:] == [4, 128, 32, 2]  # group, head_dim, split_pages, max_splits


def test_large_batches_launch_unsplit():
    backend = RecordingBackend()
    q, *rest = decode_inputs(batch=64)
    paged_decode_attention(q, *rest, 0.1, backend=backend)
    (decode,) = backend.launches  # rows of 16 pages: one split each, no merge
    assert decode.grid == (512, 1, 1)
    assert decode.block == (256, 1, 1)
    assert decode.args[6] is decode.args[5]  # no workspace: partials point at out


def test_a_rows_output_does_not_depend_on_the_other_rows(runner: Runner):
    # Sequence 0 alone, then in a batch whose longer rows raise the call's number of splits
    # (the grid): its rows are summed the same way, so its output is the same bit for bit.
    case = make_case(3, 2, 4, 128, torch.float16, pages=(33, 110), full_pages=True, seed=2)
    splits = [-(-n // 32) for n in (case.indptr[1:] - case.indptr[:-1]).tolist()]  # of 32 pages
    assert max(splits[2:]) > max(splits[:2]) > 1, "rows of several splits, more elsewhere"
    alone = case._replace(
        q=case.q[:1],
        indptr=case.indptr[:3],
        indices=case.indices[: case.indptr[2]],
        page_lens=case.page_lens[: case.indptr[2]],
    )
    batched = check(case, runner)
    assert torch.equal(check(alone, runner)[0], batched[0])
