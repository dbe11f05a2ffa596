import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


# Model-based test: the cache against a plain model of what it must hold and what it may evict.

_PAGES = 24


def _bytes_of(page: int, version: int) -> np.ndarray:
    """The one content a page has at a version: ``[2, PAGE, DIM]``, unique per (page, version)."""
    return np.full((2, PAGE, DIM), page * 1000 + version, dtype=np.float32)


class VersionedStore:
    """The cache service as the cache sees it: each page at one current version."""

    def __init__(self) -> None:
        self.version = [0] * _PAGES
        self.reads: list[list[int]] = []

    def fetch(self, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        assert [self.version[i] for i in ids.tolist()] == versions.tolist()
        self.reads.append(ids.tolist())
        return np.stack([_bytes_of(int(i), int(v)) for i, v in zip(ids, versions, strict=True)])


requests = st.lists(
    st.tuples(
        st.lists(st.integers(0, _PAGES - 1), min_size=1, max_size=12),  # pages asked, repeats ok
        st.sets(st.integers(0, _PAGES - 1), max_size=3),  # pages the store updates before
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 14), requests=requests)
def test_every_slot_holds_the_page_asked_for_and_evicts_only_the_least_recent(
    capacity: int, requests: list[tuple[list[int], set[int]]]
) -> None:
    cache, store = DevicePageCache(capacity, PAGE, DIM), VersionedStore()
    resident: dict[int, int] = {}  # the model: page -> version the cache holds
    last_use: dict[int, int] = {}  # page -> index of the request that last asked for it
    for step, (asked, updated) in enumerate(requests):
        for page in updated:
            store.version[page] += 1
        pages = np.array(asked, dtype=np.int64)
        versions = np.array([store.version[p] for p in asked], dtype=np.int64)
        distinct = set(asked)
        if len(distinct) > capacity:
            reads_before, slots_before = list(store.reads), cache.slot_page.copy()
            with pytest.raises(RuntimeError, match="raise the device cache size"):
                cache.resolve(pages, versions, store.fetch)
            # Nothing resident was lost: every slot still holds its page.
            assert (cache.slot_page == slots_before).all()
            store.reads = reads_before
            continue
        missing = sorted(p for p in distinct if resident.get(p) != store.version[p])
        slots = cache.resolve(pages, versions, store.fetch).numpy()

        # Exactly the missing pages were read, once each, in one bulk read.
        assert store.reads[len(store.reads) - bool(missing) :] == ([missing] if missing else [])
        # Each returned slot holds exactly the bytes of the page and version asked for.
        for page, version, slot in zip(asked, versions.tolist(), slots.tolist(), strict=True):
            np.testing.assert_array_equal(cache.kv[slot].numpy(), _bytes_of(page, version))
        # One page, one slot; distinct pages, distinct slots.
        by_page = {
            p: {s for q, s in zip(asked, slots.tolist(), strict=True) if q == p} for p in distinct
        }
        assert all(len(s) == 1 for s in by_page.values())
        assert len({next(iter(s)) for s in by_page.values()}) == len(distinct)
        # No two live pages share a slot, and the cache's two maps agree.
        live = cache.slot_page[cache.slot_page >= 0]
        assert len(set(live.tolist())) == live.size
        for slot, page in enumerate(cache.slot_page.tolist()):
            if page >= 0:
                assert cache.page_slot[page] == slot

        # Evictions: only pages this request did not ask for, and only the least recent.
        now = set(live.tolist())
        evicted = set(resident) - now
        assert not evicted & distinct
        kept_others = (now - distinct) & set(resident)
        if evicted and kept_others:
            assert max(last_use[p] for p in evicted) <= min(last_use[p] for p in kept_others)
        assert len(now) == min(capacity, len(set(resident) | distinct))
        resident = {p: v for p, v in resident.items() if p in now}
        for page in distinct:
            resident[page] = store.version[page]
            last_use[page] = step
