import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_service.page_pool import PagePool, PoolExhausted, as_float32


def test_alloc_hands_out_distinct_pages_and_free_returns_them():
    pool = PagePool(num_pages=4, page_size=2, head_dim=3)
    a = pool.alloc(3)
    assert sorted(a.tolist()) == [0, 1, 2]
    assert pool.num_free == 1
    pool.free(a[:2])
    assert pool.num_free == 3
    b = pool.alloc(3)
    assert len(set(b.tolist()) | {int(a[2])}) == 4


def test_exhaustion_names_the_shortfall():
    pool = PagePool(num_pages=2, page_size=2, head_dim=3)
    pool.alloc(2)
    with pytest.raises(PoolExhausted, match="need 1 KV pages but only 0 of 2 are free"):
        pool.alloc(1)


def test_append_fills_slots_in_order_and_bumps_version():
    pool = PagePool(num_pages=2, page_size=4, head_dim=2)
    page = int(pool.alloc(1)[0])
    v0 = pool.version[page]
    k = np.arange(6, dtype=np.float32).reshape(3, 2)
    pool.append(page, k, -k, np.array([7, 8, 9]))
    assert pool.fill[page] == 3
    assert pool.positions[page].tolist() == [7, 8, 9, -1]
    np.testing.assert_array_equal(pool.data[page, 0, :3], k)
    np.testing.assert_array_equal(pool.data[page, 1, :3], -k)
    assert pool.version[page] == v0 + 1
    keys, pos = pool.keys_of(np.array([page]))
    np.testing.assert_array_equal(keys, k)
    assert pos.tolist() == [7, 8, 9]


def test_free_then_alloc_gives_a_new_version():
    pool = PagePool(num_pages=1, page_size=2, head_dim=2)
    page = pool.alloc(1)
    v = int(pool.version[page[0]])
    pool.free(page)
    again = pool.alloc(1)
    assert again[0] == page[0] and pool.version[again[0]] > v and pool.fill[again[0]] == 0


def test_rejects_bad_sizes_and_dtypes():
    with pytest.raises(ValueError, match="positive"):
        PagePool(0, 16, 64)
    with pytest.raises(ValueError, match="dtype"):
        PagePool(1, 16, 64, dtype="int8")


def test_shared_segment_is_mapped_and_unlinked_on_close():
    pool = PagePool(num_pages=2, page_size=2, head_dim=2, shared=True)
    name = pool.shm_name
    assert name and os.path.exists(f"/dev/shm/{name}")
    pool.data[1, 0, 0, 0] = 5.0
    from multiprocessing import shared_memory

    view = shared_memory.SharedMemory(name=name)
    mapped = np.ndarray(pool.data.shape, np.float32, buffer=view.buf)
    assert mapped[1, 0, 0, 0] == 5.0
    del mapped
    view.close()
    pool.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_as_float32_is_numpys_cast_for_every_half():
    """The bit conversion against NumPy's own cast, bit for bit, on all 65536 float16
    values (zeros of both signs, subnormals, the largest, infinities, NaNs) and any shape."""
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]
    got = as_float32(finite.reshape(-1, 8))
    assert got.dtype == np.float32 and got.shape == (len(finite) // 8, 8)
    assert np.array_equal(got.view(np.uint32).ravel(), finite.astype(np.float32).view(np.uint32))
    special = np.array([np.inf, -np.inf, 1.5, -0.0], dtype=np.float16)
    assert np.array_equal(as_float32(special), special.astype(np.float32))
    assert np.isnan(as_float32(np.array([np.nan, 1], dtype=np.float16))[0])
    assert as_float32(np.empty((0, 4), dtype=np.float16)).shape == (0, 4)
    same = np.ones(3, dtype=np.float32)
    assert as_float32(same) is same


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_keys_at_reads_single_tokens_as_float32(dtype):
    pool = PagePool(4, 4, 8, dtype=dtype)
    pages = pool.alloc(3)
    rng = np.random.default_rng(0)
    for page in pages:
        kv = rng.standard_normal((2, 4, 8)).astype(np.float32)
        pool.append(page, kv[0], kv[1], np.arange(4) + 4 * int(page))
    at, slot = np.array([pages[2], pages[0], pages[2]]), np.array([3, 0, 1])
    got = pool.keys_at(at, slot)
    assert got.dtype == np.float32
    assert np.array_equal(got, pool.data[at, 0, slot].astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["float16", "float32"]),
    st.lists(st.tuples(st.integers(0, 11), st.integers(0, 3)), max_size=20),
)
def test_copy_slots_leaves_the_pool_as_read_then_write_slots_do(dtype, moves):
    """The compiled copy against the two NumPy calls it replaces, on twin pools: data,
    positions, fills and versions equal (a destination written twice keeps the last)."""
    twins = [PagePool(num_pages=8, page_size=4, head_dim=3, dtype=dtype) for _ in range(2)]
    rng = np.random.default_rng(len(moves))
    kv = rng.standard_normal((12, 2, 3)).astype(dtype)
    for pool in twins:
        src = pool.alloc(3)
        pool.fill_pages(src, kv[:, 0], kv[:, 1], np.arange(12) + 50)
        pool.alloc(3)  # pages 3..5: destinations, empty
    picks = np.array([t for t, _ in moves], dtype=np.int64)
    src_pages, src_slots = picks // 4, picks % 4
    dest_pages = 3 + np.array([d for _, d in moves], dtype=np.int64) % 3
    dest_slots = np.array([d for _, d in moves], dtype=np.int64)
    first, second = twins
    first.copy_slots(src_pages, src_slots, dest_pages, dest_slots)
    read = second.read_slots(src_pages, src_slots)
    second.write_slots(dest_pages, dest_slots, read, second.positions[src_pages, src_slots])
    np.testing.assert_array_equal(first.data, second.data)
    for name in ("positions", "fill", "version"):
        assert getattr(first, name).tolist() == getattr(second, name).tolist(), name
