"""``Scratch.gather_all``: one read, allocation and scatter for a layer's heads, against a
model of what each head's own ``gather`` must leave (its tokens copied in order into pages
of its own, the last step's pages back in the pool)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_service.page_pool import PagePool
from cache_service.policies.base import Scratch

PAGE, DIM, SOURCE = 4, 3, 6  # 6 source pages of 4 tokens, 3 dims


def _pool(pages):
    pool = PagePool(pages, PAGE, DIM)
    src = pool.alloc(SOURCE)
    kv = np.arange(SOURCE * PAGE * 2 * DIM, dtype=np.float32).reshape(SOURCE * PAGE, 2, DIM)
    pool.fill_pages(src, kv[:, 0], kv[:, 1], np.arange(SOURCE * PAGE) + 100)
    return pool, src


_picks = st.lists(st.integers(0, SOURCE * PAGE - 1), max_size=3 * PAGE + 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(_picks, min_size=1, max_size=4), min_size=1, max_size=4), st.data())
def test_gather_all_copies_each_heads_tokens_in_order_into_its_own_pages(rounds, data):
    heads = len(rounds[0])
    pool, src = _pool(SOURCE + heads * 4 + 2)
    scratches = [Scratch(pool) for _ in range(heads)]
    free = pool.num_free
    for picks in rounds:
        picks = (picks + [[]] * heads)[:heads]
        pages = [src[np.array(p, dtype=np.int64) // PAGE] for p in picks]
        slots = [np.array(p, dtype=np.int64) % PAGE for p in picks]
        if data.draw(st.booleans(), label="one head by itself"):
            got = [scratches[0].gather(pages[0], slots[0])]
            picks = picks[:1]
        else:
            got = Scratch.gather_all(scratches, pages, slots)
        for head_pages, tokens, scratch in zip(got, picks, scratches, strict=False):
            assert head_pages.tolist() == scratch.pages.tolist()
            assert len(head_pages) == -(-len(tokens) // PAGE)
            fills = pool.fill[head_pages]
            assert fills[:-1].tolist() == [PAGE] * (len(fills) - 1)
            valid = pool.positions[head_pages] >= 0
            assert (pool.positions[head_pages][valid] - 100).tolist() == tokens
            want = pool.data[src].transpose(0, 2, 1, 3).reshape(-1, 2, DIM)[tokens]
            held = pool.data[head_pages].transpose(0, 2, 1, 3)[valid]
            np.testing.assert_array_equal(held, want)
        held = np.concatenate([s.pages for s in scratches])
        assert len(set(held.tolist())) == len(held)  # no page is two heads'
        assert pool.num_free == free - len(held)
    for scratch in scratches:
        scratch.free()
    assert pool.num_free == free
