"""kernels/torch_paged.py, the CPU paged decode path, against the reference: ragged rows, rows
of equal page counts (no padding), and empty rows."""

import pytest
import torch

from kernels.reference import paged_decode_attention_ref
from kernels.torch_paged import paged_decode_attention_torch


@pytest.mark.parametrize("batch,kv_heads,group", [(1, 1, 1), (2, 3, 3), (3, 2, 8)])
def test_vectorized_path_matches_the_reference(batch, kv_heads, group):
    gen = torch.Generator().manual_seed(batch * 100 + group)
    slots, page, dim = 40, 16, 32
    kv = torch.randn(slots, 2, page, dim, generator=gen)
    rows = batch * kv_heads
    counts = torch.randint(0, 6, (rows,), generator=gen)
    counts[0] = 1
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0)
    nnz = int(indptr[-1])
    indices = torch.randperm(slots, generator=gen)[:nnz].int()
    lens = torch.randint(1, page + 1, (nnz,), generator=gen).int()
    q = torch.randn(batch, kv_heads * group, dim, generator=gen)
    want = paged_decode_attention_ref(q, kv, indptr, indices, lens, dim**-0.5)
    got = paged_decode_attention_torch(q, kv, indptr, indices, lens, dim**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("counts", [[4, 4, 4], [1], [3, 0, 5, 2], [0, 0]])
def test_rows_of_any_page_counts_match_the_reference(counts):
    gen = torch.Generator().manual_seed(len(counts) * 10 + sum(counts))
    slots, page, dim, group = 32, 16, 64, 3
    kv = torch.randn(slots, 2, page, dim, generator=gen)
    indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    nnz = int(indptr[-1])
    indices = torch.randperm(slots, generator=gen)[:nnz].int()
    lens = torch.randint(1, page + 1, (nnz,), generator=gen).int()
    q = torch.randn(1, len(counts) * group, dim, generator=gen)
    got = paged_decode_attention_torch(q, kv, indptr, indices, lens, dim**-0.5)
    want = paged_decode_attention_ref(q, kv, indptr, indices, lens, dim**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    empty = [i for i, c in enumerate(counts) if c == 0]
    assert all(got[0, i * group : (i + 1) * group].eq(0).all() for i in empty)
