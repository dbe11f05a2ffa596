import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_service.head_layout import HeadLayout
from cache_service.page_pool import PagePool


def _tokens(start, end, dim=2):
    pos = np.arange(start, end)
    keys = np.repeat(pos[:, None], dim, axis=1).astype(np.float32)
    return keys, -keys, pos


def test_sinks_then_window_then_evictions_in_position_order():
    pool = PagePool(64, page_size=16, head_dim=2)
    lay = HeadLayout(pool, sink_tokens=32, window_pages=2)
    evicted = lay.append(*_tokens(0, 100))
    assert [pool.positions[p, 0] for p in lay.sink] == [0, 16]
    assert [pool.positions[p, 0] for p in evicted] == [32, 48, 64]
    assert all(pool.fill[p] == 16 for p in evicted)
    assert [pool.positions[p, 0] for p in lay.window] == [80, 96]
    assert [int(pool.fill[p]) for p in lay.window] == [16, 4]
    assert lay.length == 100


def test_decode_tokens_evict_one_page_when_the_ring_wraps():
    pool = PagePool(64, page_size=16, head_dim=2)
    lay = HeadLayout(pool, sink_tokens=16, window_pages=1)
    assert lay.append(*_tokens(0, 32)) == []
    evicted = lay.append(*_tokens(32, 33))
    assert len(evicted) == 1 and pool.positions[evicted[0], 0] == 16
    assert pool.positions[lay.window[0], 0] == 32 and pool.fill[lay.window[0]] == 1


def test_release_frees_every_page():
    pool = PagePool(16, page_size=4, head_dim=2)
    lay = HeadLayout(pool, sink_tokens=4, window_pages=2)
    evicted = lay.append(*_tokens(0, 30))
    pool.free(np.asarray(evicted))
    lay.release()
    assert pool.num_free == 16


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    sinks=st.integers(0, 11),
    window_pages=st.integers(1, 3),
    delay=st.integers(0, 3),
)
def test_appending_in_chunks_is_appending_token_by_token(chunks, sinks, window_pages, delay):
    """Chunks take the whole-page path (pages allocated and written at once); single tokens
    never do: both hand over the same pages by the same lengths and leave the same layout
    and pool, sinks a whole number of pages or not."""
    size, total = 4, sum(chunks)

    def layout():
        pool = PagePool(2 * (total // size + 2), page_size=size, head_dim=2)
        lay = HeadLayout(pool, sink_tokens=sinks, window_pages=window_pages,
                         handover_delay=delay)  # fmt: skip
        return pool, lay

    pool_b, b = layout()
    handed_by = [[]]  # token by token: pages handed over once the head holds i tokens
    for i in range(total):
        handed_by.append(handed_by[-1] + b.append(*_tokens(i, i + 1)))
    pool_a, a = layout()
    handed, start = [], 0
    for n in chunks:
        handed += a.append(*_tokens(start, start + n))
        start += n
        assert handed == handed_by[start]
    assert (a.sink, list(a.window), list(a.leaving), a.length) == (
        b.sink,
        list(b.window),
        list(b.leaving),
        b.length,
    )
    for name in ("data", "positions", "fill", "refs"):  # versions count write calls
        assert np.array_equal(getattr(pool_a, name), getattr(pool_b, name)), name
