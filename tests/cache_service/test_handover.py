"""Pages leaving the recent window are handed to clustered bodies on staggered steps:
``HeadLayout``'s ``handover_delay`` and the store's choice of it per (layer, head)."""

import numpy as np
import pytest

from cache_service.head_layout import HeadLayout
from cache_service.page_pool import PagePool
from cache_service.store import Store
from cache_service.types import SequenceSpec

PAGE, DIM = 4, 2


def _token(pos):
    return np.full((1, DIM), pos, np.float32), np.array([pos])


@pytest.mark.parametrize("delay", [0, 1, 3])
def test_a_leaving_page_is_handed_over_delay_tokens_after_it_left_the_window(delay):
    pool = PagePool(64, PAGE, DIM)
    lay = HeadLayout(pool, sink_tokens=PAGE, window_pages=2, handover_delay=delay)
    handed_at = {}
    for pos in range(40):
        k, p = _token(pos)
        for page in lay.append(k, k, p):
            handed_at[int(pool.positions[page, 0])] = pos + 1  # length when handed over
            pool.free(np.array([page]))  # the caller's now
        leaving = lay.leaving_pages()
        assert len(leaving) <= 1
        window = set(pool.positions[lay.window_pages_now()].ravel().tolist()) - {-1}
        if len(leaving):  # the leaving page is the one just before the window
            before = list(range(min(window) - PAGE, min(window)))
            assert pool.positions[leaving[0]].tolist() == before
    # The page of positions [s, s + 4) leaves the window (2 pages) with position s + 8, at
    # length s + 9, and is handed over `delay` tokens later.
    assert handed_at == {s: s + 9 + delay for s in range(PAGE, 40 - 8 - delay, PAGE)}
    lay.release()
    assert pool.num_free == 64


def test_a_prefill_chunk_hands_over_every_page_due_by_its_end():
    pool = PagePool(64, PAGE, DIM)
    lay = HeadLayout(pool, sink_tokens=PAGE, window_pages=1, handover_delay=3)
    keys = np.zeros((30, DIM), np.float32)
    handed = lay.append(keys, keys, np.arange(30))
    # pages [4, 8) ... [20, 24) left at lengths 9 .. 25, due 3 tokens later (<= 30); [24, 28)
    # left at 29 and is still leaving; [28, 30) is the window
    assert [int(pool.positions[p, 0]) for p in handed] == [4, 8, 12, 16, 20]
    assert pool.positions[lay.leaving_pages()].tolist() == [[24, 25, 26, 27]]


def test_bad_delay_raises():
    with pytest.raises(ValueError, match=r"handover_delay must be in \[0, 4\), got 4"):
        HeadLayout(PagePool(8, PAGE, DIM), PAGE, 1, handover_delay=4)


LAYERS, KV, Q, D, P = 4, 2, 4, 8, 16


def _spec(policy, **kw):
    return SequenceSpec(LAYERS, KV, Q, D, policy=policy, budget=64, dense_layers=1, seed=3, **kw)


def _inserted(store, seq):
    """Tokens in each clustered body's index, [layer][head]."""
    bodies = store._seqs[seq].bodies
    return [
        [getattr(bodies[layer][head], "index", None) for head in range(KV)]
        for layer in range(LAYERS)
    ]


@pytest.mark.parametrize("policy", ["icecache", "kmeans"])
def test_clustered_heads_insert_on_different_steps(policy):
    """Six clustered heads (layers 1-3 x 2), delays 2..7: no two insert on the same step,
    and each inserts every 16 steps."""
    store = Store(PagePool(4096, P, D))
    store.create("s", _spec(policy))
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((LAYERS, 400, KV, D)).astype(np.float32)
    for layer in range(LAYERS):
        store.append("s", layer, keys[layer, :200], keys[layer, :200], np.arange(200))
    sizes = None
    steps_of = {}
    for pos in range(200, 400):
        for layer in range(LAYERS):
            q = rng.standard_normal((1, Q, D)).astype(np.float32)
            k = keys[layer, pos][None]
            store.decode(layer, ["s"], k, k, np.array([pos]), q)
        now = {
            (layer, head): index.num_tokens
            for layer, row in enumerate(_inserted(store, "s"))
            for head, index in enumerate(row)
            if index is not None
        }
        if sizes is not None:
            grew = [key for key in now if now[key] != sizes[key]]
            assert len(grew) <= 1, f"step {pos}: {grew} inserted together"
            for key in grew:
                steps_of.setdefault(key, []).append(pos)
        sizes = now
    assert len(steps_of) == 6
    assert len({steps[0] % P for steps in steps_of.values()}) == 6
    for steps in steps_of.values():
        assert np.diff(steps).tolist() == [P] * (len(steps) - 1)


@pytest.mark.parametrize("policy", ["full", "oracle", "quest", "streaming"])
def test_other_policies_hand_pages_over_at_once(policy):
    store = Store(PagePool(1024, P, D))
    store.create("s", _spec(policy))
    assert all(lay.handover_delay == 0 for row in store._seqs["s"].heads for lay in row)


def test_icecache_r_followers_keep_their_leaders_delay():
    store = Store(PagePool(1024, P, D))
    store.create("s", _spec("icecache-r"))
    delays = [[lay.handover_delay for lay in row] for row in store._seqs["s"].heads]
    assert delays[0] == [0, 0]  # dense
    assert delays[1] == delays[2] == delays[3] == [2, 3]


@pytest.mark.parametrize("policy", ["icecache", "icecache-r", "icecache-tokens", "kmeans"])
def test_a_sequence_selects_the_same_alone_or_decoded_with_others(policy):
    """Handover steps depend on positions only: same selections whatever else is in the
    batch (another sequence, at another length)."""
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((2, LAYERS, 300, KV, D)).astype(np.float32)
    queries = rng.standard_normal((300, LAYERS, Q, D)).astype(np.float32)
    runs = []
    for batched in (False, True):
        store = Store(PagePool(8192, P, D))
        names = ["a", "b"] if batched else ["a"]
        starts = {"a": 150, "b": 93}
        for i, name in enumerate(names):
            store.create(name, _spec(policy))
            for layer in range(LAYERS):
                k = keys[i, layer, : starts[name]]
                store.append(name, layer, k, k, np.arange(starts[name]))
        picked = []
        for step in range(100):
            for layer in range(LAYERS):
                pos = np.array([starts[n] + step for n in names])
                k = np.stack([keys[i, layer, pos[i]] for i in range(len(names))])
                q = np.stack([queries[pos[i], layer] for i in range(len(names))])
                sel = store.decode(layer, names, k, k, pos, q)[0]
                picked.append(store.pool.positions[sel.pages].tolist())
        runs.append(picked)
    assert runs[0] == runs[1]


def test_a_leaving_page_is_attended_whole_within_the_budget():
    """While a head's page is leaving it is attended with the window; the body gives up only
    the tokens the window's newest page does not leave free, so no step exceeds the budget."""
    store = Store(PagePool(4096, P, D))
    spec = _spec("icecache")
    store.create("s", spec)
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((LAYERS, 400, KV, D)).astype(np.float32)
    for layer in range(LAYERS):
        store.append("s", layer, keys[layer, :200], keys[layer, :200], np.arange(200))
    seen_leaving = 0
    for pos in range(200, 300):
        for layer in range(LAYERS):
            q = rng.standard_normal((1, Q, D)).astype(np.float32)
            k = keys[layer, pos][None]
            (sel,) = store.decode(layer, ["s"], k, k, np.array([pos]), q)
            for head in range(KV if layer else 0):  # layer 0 is dense
                pages = sel.pages[sel.indptr[head] : sel.indptr[head + 1]]
                got = store.pool.positions[pages].ravel()
                got = set(got[got >= 0].tolist())
                lay = store._seqs["s"].heads[layer][head]
                leaving = store.pool.positions[lay.leaving_pages()].ravel().tolist()
                seen_leaving += bool(leaving)
                assert set(leaving) <= got
                assert len(got) <= 64 and pos in got
    assert seen_leaving > 100
