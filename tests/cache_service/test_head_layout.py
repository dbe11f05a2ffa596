import numpy as np

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
