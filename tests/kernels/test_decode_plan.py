"""kernels/decode_plan.py: the launch shape of a decode call and the arguments it refuses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kernels.decode_plan import (
    DecodePlan,
    chunk_tokens,
    decode_shared_floats,
    default_split_pages,
    plan_decode,
)
from kernels.paged_attention import paged_decode_attention
from tests.kernels.recording import RecordingBackend, decode_inputs


def test_plan_of_an_8b_decode_step_at_batch_1():
    plan = plan_decode(*decode_inputs(), max_row_pages=16)
    # rows of 16 pages, each of 2 chunks of 8 tokens: splits of 32 pages (8 warps x 8 chunks)
    assert plan == DecodePlan(
        rows=8, group=4, bucket=4, split_pages=32, max_splits=1, warps=8, shared_mem=16640
    )
    assert plan.shared_mem == 4 * decode_shared_floats(4, 128, 8) == 4 * (8 * 4 * 128 + 64)


def test_the_longest_row_sets_the_splits_and_nothing_else_depends_on_the_batch():
    inputs = decode_inputs(batch=2)
    plans = [plan_decode(*inputs, max_row_pages=n) for n in (0, 32, 33, 64, 65)]
    assert [p.max_splits for p in plans] == [1, 1, 2, 2, 3]
    assert {(p.split_pages, p.warps, p.shared_mem) for p in plans} == {(32, 8, 16640)}
    wide = plan_decode(*decode_inputs(batch=64), max_row_pages=16)
    assert (wide.split_pages, wide.warps) == (32, 8)


def test_a_group_runs_the_smallest_bucket_that_holds_it():
    q, kv, indptr, indices, lens = decode_inputs(kv_heads=3, group=3)
    assert plan_decode(q, kv, indptr, indices, lens, max_row_pages=16).bucket == 4
    q, kv, indptr, indices, lens = decode_inputs(kv_heads=4, group=5)
    assert plan_decode(q, kv, indptr, indices, lens, max_row_pages=16).bucket == 8


@pytest.mark.parametrize(
    "element_size,head_dim,bucket,expected",
    [
        (2, 128, 4, 8),
        (2, 128, 8, 8),
        (2, 64, 1, 32),
        (2, 256, 4, 4),
        (4, 128, 2, 8),
        (4, 256, 8, 2),
    ],
)
def test_chunk_tokens(element_size: int, head_dim: int, bucket: int, expected: int):
    # lanes across a row x rows a lane holds, as DecodeLayout in paged_attention.cu
    assert chunk_tokens(element_size, head_dim, bucket) == expected


@pytest.mark.parametrize(
    "warps,chunk,page_size,expected",
    [(8, 8, 16, 32), (8, 4, 16, 16), (5, 4, 16, 10), (8, 32, 1, 2048), (1, 2, 64, 1)],
)
def test_a_split_holds_eight_chunks_a_warp(warps: int, chunk: int, page_size: int, expected: int):
    assert default_split_pages(warps, chunk, page_size) == expected


def test_wide_groups_get_fewer_warps_to_fit_shared_memory():
    q, kv, indptr, indices, lens = decode_inputs(kv_heads=2, group=8, head_dim=256)
    plan = plan_decode(q, kv, indptr, indices, lens, max_row_pages=16)
    assert plan.warps == 5 and plan.shared_mem <= 48 * 1024
    assert plan.split_pages == 10  # 5 warps x 8 chunks of 4 tokens


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
    yield "split_pages must be at least 1", {"split_pages": 0}
    yield "more than the merge kernel holds", {"split_pages": 1, "max_row_pages": 10**5}
    yield "but a row has 2 pages", {"max_row_pages": 1}
    yield "num_warps must be in 1..16", {"num_warps": 17}
    yield (
        "num_warps must be in 1..8",
        {"q": torch.zeros(2, 16, 128, dtype=q.dtype), "num_warps": 9},
    )
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
        paged_decode_attention(**kwargs)  # type: ignore[arg-type]
