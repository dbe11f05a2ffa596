import numpy as np
import pytest
import torch

from cache_service.page_pool import PagePool
from worker.page_cache import DevicePageCache

PAGE, DIM = 4, 2


class PoolReader:
    """Reads pages of a real ``PagePool`` (as ``Store.read_pages`` does) and logs each read."""

    def __init__(self, pages: int) -> None:
        self.pool = PagePool(pages, PAGE, DIM)
        self.pool.data[:] = np.arange(self.pool.data.size, dtype=np.float32).reshape(
            self.pool.data.shape
        )
        self.data = self.pool.data
        self.reads: list[list[int]] = []

    def fetch(self, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        self.reads.append(ids.tolist())
        return self.pool.data[ids]


def _resolve(cache, store, pages, versions=None):
    pages = np.asarray(pages)
    versions = np.zeros(len(pages), dtype=np.int64) if versions is None else np.asarray(versions)
    slots = cache.resolve(pages, versions, store.fetch)
    torch.testing.assert_close(cache.kv[slots.long()], torch.from_numpy(store.data[pages]))
    return slots


def test_second_request_for_the_same_pages_moves_nothing():
    cache, store = DevicePageCache(8, PAGE, DIM), PoolReader(10)
    _resolve(cache, store, [3, 1, 4])
    _resolve(cache, store, [4, 3])
    assert store.reads == [[1, 3, 4]]
    assert (cache.stats.hits, cache.stats.misses) == (2, 3)
    assert cache.stats.bytes_moved == 3 * 2 * PAGE * DIM * 4


def test_a_newer_version_is_loaded_again_into_the_same_slot():
    cache, store = DevicePageCache(8, PAGE, DIM), PoolReader(10)
    first = _resolve(cache, store, [5], [1])
    store.data[5] += 100
    again = _resolve(cache, store, [5], [2])
    assert store.reads == [[5], [5]] and int(first[0]) == int(again[0])


def test_least_recently_used_page_is_evicted_first():
    cache, store = DevicePageCache(3, PAGE, DIM), PoolReader(10)
    _resolve(cache, store, [0])
    _resolve(cache, store, [1])
    _resolve(cache, store, [2])
    _resolve(cache, store, [0])  # 1 is now the oldest
    _resolve(cache, store, [7])
    assert store.reads[-1] == [7]
    _resolve(cache, store, [0, 2])
    assert store.reads[-1] == [7]  # 0 and 2 still resident
    _resolve(cache, store, [1])
    assert store.reads[-1] == [1]


def test_a_request_larger_than_the_cache_is_a_clear_error():
    cache, store = DevicePageCache(2, PAGE, DIM), PoolReader(10)
    with pytest.raises(RuntimeError, match="raise the device cache size"):
        cache.resolve(np.array([1, 2, 3]), np.zeros(3, dtype=np.int64), store.fetch)


def test_misses_follow_a_plain_lru_over_a_long_random_run():
    # Capacity 5 with 12 pages: evictions on most calls, and the LRU records are compacted
    # many times (every 4 * capacity recorded slots), so order must survive compaction.
    cache, store = DevicePageCache(5, PAGE, DIM), PoolReader(12)
    rng = np.random.default_rng(0)
    resident: dict[int, int] = {}  # page -> version, least recently used first
    want_reads = []
    for step in range(600):
        # Phases of hits (records pile up, compaction) alternate with phases of misses.
        pages = 6 if step // 50 % 2 else 12
        page, version = int(rng.integers(pages)), int(rng.random() < 0.1)
        if resident.get(page) != version:
            want_reads.append([page])
            if page not in resident and len(resident) == 5:
                del resident[next(iter(resident))]
        resident.pop(page, None)
        resident[page] = version
        _resolve(cache, store, [page], [version])
    assert store.reads == want_reads
    assert 150 < len(want_reads) < 450
    assert sorted(cache.slot_page.tolist()) == sorted(resident)


def test_pages_of_the_current_request_are_never_evicted_for_each_other():
    cache, store = DevicePageCache(4, PAGE, DIM), PoolReader(10)
    _resolve(cache, store, [0, 1])
    _resolve(cache, store, [2, 3])
    slots = _resolve(cache, store, [0, 8, 1, 9])  # evicts 2 and 3, keeps 0 and 1
    assert store.reads[-1] == [8, 9] and len(set(slots.tolist())) == 4
    _resolve(cache, store, [1, 0, 9], [0, 1, 0])  # 0 is stale: reloaded in place
    assert store.reads[-1] == [0]


def test_a_failed_read_leaves_the_cache_as_it_was():
    cache, store = DevicePageCache(2, PAGE, DIM), PoolReader(10)
    _resolve(cache, store, [0, 1])

    def failing(ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        raise ConnectionError("store unreachable")

    with pytest.raises(ConnectionError):
        cache.resolve(np.array([2]), np.zeros(1, dtype=np.int64), failing)
    _resolve(cache, store, [0, 1])  # still resident, not half-replaced by page 2
    _resolve(cache, store, [2])  # and page 2 loads once the store answers
    assert store.reads == [[0, 1], [2]]
