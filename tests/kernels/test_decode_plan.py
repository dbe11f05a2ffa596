"""kernels/decode_plan.py: the launch shape of a decode call and the arguments it refuses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kernels.decode_plan import (
    DecodePlan,
    choose_num_splits,
    choose_num_warps,
    chunk_tokens,
    decode_shared_floats,
    plan_decode,
)
from kernels.paged_attention import paged_decode_attention
from tests.kernels.recording import RecordingBackend, decode_inputs


def test_plan_of_an_8b_decode_step_at_batch_1():
    plan = plan_decode(*decode_inputs(), num_sms=132)
    # 16 pages a row of 2 chunks of 8 tokens: 16 warps take 2 each, in one block a row
    assert plan == DecodePlan(rows=8, group=4, bucket=4, num_splits=1, warps=16, shared_mem=33280)
    assert plan.shared_mem == 4 * decode_shared_floats(4, 128, 16) == 4 * (16 * 4 * 128 + 128)


def test_a_group_runs_the_smallest_bucket_that_holds_it():
    q, kv, indptr, indices, lens = decode_inputs(kv_heads=3, group=3)
    assert plan_decode(q, kv, indptr, indices, lens, num_sms=132).bucket == 4
    q, kv, indptr, indices, lens = decode_inputs(kv_heads=4, group=5)
    assert plan_decode(q, kv, indptr, indices, lens, num_sms=132).bucket == 8


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


def test_warps_follow_the_rows_share_of_chunks():
    assert choose_num_warps(rows=8, items=24, num_sms=132, most=16) == 3
    assert choose_num_warps(rows=8, items=8 * 64, num_sms=132, most=16) == 16
    assert choose_num_warps(rows=8, items=8 * 64, num_sms=132, most=8) == 8
    # the rows alone fill the device: 4 warps
    assert choose_num_warps(rows=264, items=264 * 64, num_sms=132, most=16) == 4
    assert choose_num_warps(rows=0, items=0, num_sms=132, most=16) == 1


def test_wide_groups_get_fewer_warps_to_fit_shared_memory():
    q, kv, indptr, indices, lens = decode_inputs(kv_heads=2, group=8, head_dim=256)
    plan = plan_decode(q, kv, indptr, indices, lens, num_sms=132)
    assert plan.warps == 5 and plan.shared_mem <= 48 * 1024


def test_large_batches_run_unsplit():
    plan = plan_decode(*decode_inputs(batch=64), num_sms=132)
    assert plan.rows == 512 and plan.num_splits == 1


@pytest.mark.parametrize(
    "rows,items,warps,expected",
    [
        (8, 256, 8, 1),  # four chunks a warp: no split (a merge kernel costs more)
        (8, 1024, 8, 8),  # two chunks a warp while the device holds every warp
        (8, 1000, 8, 8),
        (128, 4096, 8, 1),
        (128, 16384, 8, 2),  # 16384 chunks over 2112 resident warps: 8 a warp
        (512, 8192, 8, 1),
        (8, 8, 8, 1),
        (4, 0, 8, 1),
        (1, 10**6, 1, 256),
        (1, 40, 1, 20),
    ],
)
def test_choose_num_splits(rows: int, items: int, warps: int, expected: int):
    assert choose_num_splits(rows, items, warps=warps, resident_warps=132 * 16) == expected


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
