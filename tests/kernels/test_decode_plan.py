"""kernels/decode_plan.py: the launch shape of a decode call and the arguments it refuses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kernels.decode_plan import DecodePlan, choose_num_splits, decode_shared_floats, plan_decode
from kernels.paged_attention import paged_decode_attention
from tests.kernels.recording import RecordingBackend, decode_inputs


def test_plan_of_an_8b_decode_step_at_batch_1():
    plan = plan_decode(*decode_inputs(), num_sms=132)
    # 8 rows x 4 splits of 4 pages: a page per warp
    assert plan == DecodePlan(rows=8, group=4, num_splits=4, warps=4, shared_mem=8384)
    assert plan.shared_mem == 4 * decode_shared_floats(4, 128, 4, 16)


def test_large_batches_run_unsplit():
    plan = plan_decode(*decode_inputs(batch=64), num_sms=132)
    assert plan.rows == 512 and plan.num_splits == 1


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
    assert choose_num_splits(rows, nnz, warps=4, num_sms=132) == expected


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
        paged_decode_attention(**kwargs)  # type: ignore[arg-type]
