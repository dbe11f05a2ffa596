"""Prefix reuse in the store: a sequence started from published blocks is the sequence that
appending the whole prompt builds (for every policy), pages are shared by reference, and the
cache gives pages back under pressure without touching blocks in use."""

import hashlib
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_service.head_layout import HeadLayout
from cache_service.page_pool import PagePool, PoolExhausted
from cache_service.prefix_cache import PrefixCache
from cache_service.store import Store
from cache_service.types import INDEXED_POLICIES, POLICIES, OutOfOrder, PrefixKeys, SequenceSpec

LAYERS, KV, Q, DIM, PAGE, BLOCK = 4, 2, 4, 8, 4, 16


def _spec(policy, budget=48):
    return SequenceSpec(
        LAYERS, KV, Q, DIM, policy=policy, budget=None if policy == "full" else budget,
        dense_layers=1, reuse_group=2,
    )  # fmt: skip


def _keys(tokens, spec=None):
    """A hash chain over BLOCK-token blocks of ``tokens`` (as the worker computes it)."""
    keys, prev = [], repr(spec).encode()
    for k in range(len(tokens) // BLOCK):
        prev = hashlib.blake2b(
            prev + np.asarray(tokens[k * BLOCK : (k + 1) * BLOCK], np.int32).tobytes(),
            digest_size=16,
        )
        prev = prev.digest()
        keys.append(prev)
    return PrefixKeys(tuple(keys), BLOCK)


def _kv(tokens, seed=0):
    """K/V of a prompt that depend only on its token ids: equal prefixes, equal K/V."""
    rows = np.stack([np.random.default_rng([seed, t, i]).standard_normal((LAYERS, 2, KV, DIM))
                     for i, t in enumerate(tokens)])  # fmt: skip
    return rows.astype(np.float32)  # [T, layers, 2, kv, dim]


def _append(store, seq, kv, start):
    """Append K/V rows ``start ..`` of a prompt to every layer."""
    positions = np.arange(start, len(kv))
    for layer in range(LAYERS):
        store.append(seq, layer, kv[start:, layer, 0], kv[start:, layer, 1], positions)


def _start(store, seq, spec, tokens, share=True):
    """Create from the cache where it can, append the rest, publish; returns reused tokens."""
    keys = _keys(tokens[:-1], spec)
    reused = store.create(seq, spec, keys)
    _append(store, seq, _kv(tokens), reused)
    if share:
        store.share_prefix(seq, _keys(tokens, spec))
    return reused


def _attended(store, sel):
    """Per KV head, the (position, key) pairs of the selected pages, by position."""
    out = []
    for h in range(KV):
        pages = sel.pages[sel.indptr[h] : sel.indptr[h + 1]]
        lens = sel.lens[sel.indptr[h] : sel.indptr[h + 1]]
        rows = list(zip(pages, lens, strict=True))
        pos = np.concatenate([store.pool.positions[p, :n] for p, n in rows] or [[]])
        keys = np.concatenate([store.pool.data[p, 0, :n] for p, n in rows] or [np.empty((0, DIM))])
        order = np.argsort(pos, kind="stable")
        out.append((pos[order], keys[order]))
    return out


def _decode(store, seq, steps, start, seed=7):
    """Run decode steps on every layer; returns what each step attended."""
    rng = np.random.default_rng(seed)
    seen = []
    for step in range(steps):
        for layer in range(LAYERS):
            k, v = rng.standard_normal((2, 1, KV, DIM)).astype(np.float32)
            q = rng.standard_normal((1, Q, DIM)).astype(np.float32)
            (sel,) = store.decode(layer, [seq], k, v, np.array([start + step]), q)
            seen.append(_attended(store, sel))
    return seen


def _same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b, strict=True):
        for (pa, ka), (pb, kb) in zip(step_a, step_b, strict=True):
            np.testing.assert_array_equal(pa, pb)
            np.testing.assert_array_equal(ka, kb)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_sequence_started_from_a_prefix_attends_as_one_prefilled_whole(policy):
    spec = _spec(policy)
    doc = list(range(1, 70))  # 69 tokens: 4 whole blocks
    first, second = [*doc, 200, 201, 202], [*doc, 210, 211, 212, 213, 214]
    shared = Store(PagePool(4096, PAGE, DIM))
    assert _start(shared, "a", spec, first) == 0
    assert _start(shared, "b", spec, second) == 4 * BLOCK
    plain = Store(PagePool(4096, PAGE, DIM), prefix_cache=False)
    assert _start(plain, "b", spec, second) == 0
    _same(_decode(shared, "b", 40, len(second)), _decode(plain, "b", 40, len(second)))
    clustered = (LAYERS - spec.dense_layers) * KV if policy in INDEXED_POLICIES else 0
    assert shared.stats().prefix.indexes == clustered  # "b" built it ("a" never decoded)


def _kept_pages(store):
    """Every page the kept indexes hold, with its data, positions, fill and version."""
    pages = np.concatenate(
        [body.all_pages() for block in store.prefixes._blocks.values()
         for body in block.bodies.values()]
    )  # fmt: skip
    pool = store.pool
    return pages, [a[pages].copy() for a in (pool.data, pool.positions, pool.fill, pool.version)]


@pytest.mark.parametrize("policy", INDEXED_POLICIES)
def test_a_kept_index_is_shared_by_reference_and_never_written(policy):
    """Sequences on one document start from the index the first one built: they take a
    few pages of their own (their window, copies of the leaves their later tokens go to),
    not a layout of the document each; decoding them leaves the kept pages as they were,
    and the pages go back to the pool with the kept block."""
    spec = _spec(policy)
    doc = list(range(1, 134))  # 133 tokens: 8 whole blocks
    store = Store(PagePool(8192, PAGE, DIM))
    taken = []
    for i in range(4):
        tokens = [*doc, *range(300 + 10 * i, 303 + 10 * i + i)]
        before = store.pool.num_used
        _start(store, f"s{i}", spec, tokens)
        _decode(store, f"s{i}", 2, len(tokens), seed=i)
        taken.append(store.pool.num_used - before)
        if i == 0:
            pages, kept = _kept_pages(store)
            assert store.stats().prefix.indexes == (LAYERS - spec.dense_layers) * KV
    assert max(taken[1:]) < taken[0] / 3, taken
    _, still = _kept_pages(store)
    for a, b in zip(kept, still, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (store.pool.refs[pages] > 1).mean() > 0.5  # most are the sequences' too
    for i in range(4):
        store.release(f"s{i}")
    assert store.pool.num_used == store.stats().prefix.pages
    store.prefixes.evict(store.pool.num_pages)
    assert store.pool.num_used == 0 and store.stats().prefix.indexes == 0


def test_reuse_off_builds_where_reuse_does_and_leaves_the_cache_alone():
    """Keys with ``reuse=False`` only fix the build boundary: nothing is found or kept, and
    the sequence attends as one that started from the kept blocks and index."""
    spec = _spec("icecache")
    tokens = [*range(1, 70), 200, 201]
    store = Store(PagePool(4096, PAGE, DIM))
    _start(store, "a", spec, tokens)
    _decode(store, "a", 1, len(tokens))  # builds and keeps the index
    keys = _keys(tokens[:-1], spec)
    off = PrefixKeys(keys.keys, keys.block_tokens, reuse=False)
    before = store.stats().prefix
    assert store.create("off", spec, off) == 0
    _append(store, "off", _kv(tokens), 0)
    assert _start(store, "on", spec, tokens) == 4 * BLOCK
    _same(_decode(store, "off", 20, len(tokens)), _decode(store, "on", 20, len(tokens)))
    after = store.stats().prefix
    assert (after.hits, after.index_reuses) == (before.hits + 1, before.index_reuses + 6)


def test_the_prompt_that_is_the_prefix_itself_reuses_all_but_its_last_block():
    spec = _spec("icecache")
    prompt = list(range(1, 65))  # 64 tokens = 4 blocks; the last token is always prefilled
    store = Store(PagePool(4096, PAGE, DIM))
    _start(store, "a", spec, prompt)
    assert _start(store, "b", spec, prompt) == 3 * BLOCK
    plain = Store(PagePool(4096, PAGE, DIM), prefix_cache=False)
    _start(plain, "b", spec, prompt)
    _same(_decode(store, "b", 24, 64), _decode(plain, "b", 24, 64))


def test_blocks_match_only_from_the_start_and_only_for_the_same_spec():
    store = Store(PagePool(4096, PAGE, DIM))
    doc = list(range(1, 70))
    _start(store, "a", _spec("quest"), doc)
    assert _start(store, "b", _spec("quest"), [5, *doc]) == 0  # shifted: no block equal
    assert _start(store, "c", _spec("quest", budget=64), doc) == 0  # another spec
    assert _start(store, "d", _spec("quest"), [*doc[:40], 999, *doc[41:]]) == 2 * BLOCK


def test_shared_pages_are_held_once_and_freed_with_their_last_holder():
    spec = _spec("full")
    store = Store(PagePool(4096, PAGE, DIM))
    doc = list(range(1, 130))  # 129 tokens: 8 blocks = 32 pages a (layer, head)
    _start(store, "a", spec, [*doc, 1])
    one = store.pool.num_used
    for i in range(7):
        _start(store, f"q{i}", spec, [*doc, 2 + i, 3])
    # each later sequence holds only the pages after the shared 128 tokens
    assert store.pool.num_used - one == 7 * LAYERS * KV * 1
    assert store.stats().prefix.hits == 7 and store.stats().prefix.tokens_reused == 7 * 128
    for seq in ["a", *(f"q{i}" for i in range(7))]:
        store.release(seq)
    # the cache alone holds the published blocks, nothing else
    assert store.pool.num_used == store.stats().prefix.pages == LAYERS * KV * 32
    assert np.all(store.pool.refs[store.pool.used_ids()] == 1)
    store.prefixes.evict(10**9)
    assert store.pool.num_used == 0 and store.stats().prefix.blocks == 0


def test_pool_pressure_evicts_unused_blocks_oldest_first_and_never_those_in_use():
    spec = _spec("streaming")
    per_block = LAYERS * KV * BLOCK // PAGE  # pages of one block
    store = Store(PagePool(per_block * 12, PAGE, DIM))
    old, new = list(range(1, 66)), list(range(100, 165))  # 4 blocks each
    _start(store, "old", spec, old)
    store.release("old")
    _start(store, "new", spec, new)  # in use: its blocks hold pages it holds too
    assert store.stats().prefix.blocks == 8
    # 160 pages wanted, 120 free: two blocks of the unused chain go, from its end
    _start(store, "big", spec, list(range(300, 300 + 5 * BLOCK)), share=False)
    assert store.stats().prefix.evicted_blocks == 2 and store.stats().prefix.blocks == 6
    assert store.create("old-again", spec, _keys(old, spec)) == 2 * BLOCK
    store.release("old-again")
    assert _start(store, "again", spec, new) == 4 * BLOCK
    with pytest.raises(PoolExhausted, match="free"):
        _start(store, "huge", spec, list(range(500, 500 + 9 * BLOCK)), share=False)
    # everything unused went; the blocks "new" and "again" stand on stay
    assert store.stats().prefix.blocks == 4


def test_share_after_a_decode_step_is_refused_with_what_to_do():
    store = Store(PagePool(4096, PAGE, DIM))
    spec = _spec("icecache")
    reused = store.create("a", spec)
    _append(store, "a", _kv(list(range(40))), reused)
    _decode(store, "a", 1, 40)
    with pytest.raises(OutOfOrder, match="right after its prefill"):
        store.share_prefix("a", _keys(list(range(40)), spec))
    with pytest.raises(ValueError, match="multiple of the page size"):
        store.create("b", spec, PrefixKeys((b"12345678",), 6))


def test_a_store_without_the_cache_neither_keeps_nor_finds_prefixes():
    store = Store(PagePool(4096, PAGE, DIM), prefix_cache=False)
    doc = list(range(1, 70))
    assert _start(store, "a", _spec("full"), doc) == 0
    assert _start(store, "b", _spec("full"), doc) == 0
    store.release("a")
    store.release("b")
    assert store.pool.num_used == 0


@settings(max_examples=40, deadline=None)
@given(
    sink=st.integers(0, 3),
    window=st.integers(1, 3),
    delay=st.integers(0, PAGE - 1),
    pages=st.integers(0, 12),
)
def test_restore_leaves_the_layout_appending_leaves(sink, window, delay, pages):
    pool = PagePool(64, PAGE, DIM)
    grown = HeadLayout(pool, sink * PAGE, window, delay)
    rng = np.random.default_rng(0)
    n = pages * PAGE
    kv = rng.standard_normal((2, n, DIM)).astype(np.float32)
    handed = grown.append(kv[0], kv[1], np.arange(n))
    order = grown.sink + handed + grown.leaving_pages().tolist() + list(grown.window)
    restored = HeadLayout(pool, sink * PAGE, window, delay)
    assert restored.restore(np.asarray(order), n) == handed
    step = HeadLayout(pool, sink * PAGE, window, delay)  # handed_by: at every length
    count = 0
    for t in range(n):
        count += len(step.append(kv[0, t : t + 1], kv[1, t : t + 1], np.array([t])))
        assert step.handed_by(t + 1) == count
    assert restored.sink == grown.sink and list(restored.window) == list(grown.window)
    assert list(restored.leaving) == list(grown.leaving) and restored.length == n


@settings(max_examples=25, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    prompts=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), min_size=2, max_size=6),
    pool_pages=st.integers(180, 600),
)
def test_many_tenants_on_a_small_pool_get_what_a_cache_free_store_gives(
    policy, prompts, pool_pages
):
    """Prompts = one of three documents + a tail; every sequence, decoded a few steps, attends
    to what it would without the cache; afterwards only the cache holds pages."""
    spec = _spec(policy)
    docs = [list(range(1, 50)), list(range(60, 125)), list(range(1, 30))]
    store = Store(PagePool(pool_pages, PAGE, DIM))
    for i, (doc, tail) in enumerate(prompts):
        tokens = [*docs[doc], *range(500 + i, 500 + i + tail), 7]
        try:
            _start(store, f"s{i}", spec, tokens)
            seen = _decode(store, f"s{i}", 3, len(tokens), seed=i)
        except PoolExhausted:
            continue  # a full pool refuses; a refusal changes nothing (checked below)
        plain = Store(PagePool(4096, PAGE, DIM), prefix_cache=False)
        _start(plain, "p", spec, tokens)
        _same(seen, _decode(plain, "p", 3, len(tokens), seed=i))
    live = [b for seq in store._seqs.values() for row in seq.bodies for b in row]
    kept = [b for block in store.prefixes._blocks.values() for b in block.bodies.values()]
    assert store.stats().index_bytes == sum(b.nbytes() for b in live + kept)
    for i in range(len(prompts)):
        if f"s{i}" in store:
            store.release(f"s{i}")
    assert store.pool.num_used == store.stats().prefix.pages
    store.prefixes.evict(store.pool.num_pages)
    assert store.pool.num_used == 0 and store.stats().index_bytes == 0


CHAINS, DEPTH, PAGES_PER_BLOCK = 2, 3, 2
OPS = st.tuples(
    st.sampled_from(["publish", "lookup", "hold", "let_go", "evict"]),
    st.integers(0, CHAINS - 1),
    st.integers(0, DEPTH - 1),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=30))
def test_the_cache_keeps_and_evicts_what_a_simple_model_does(ops):
    """Blocks of a few chains published, looked up, held by "sequences" (another reference
    on their pages) and evicted, against a model: a dict of (last use, depth) per key; the
    victim is the least recently used block without a cached child whose pages nobody
    else holds."""
    pool = PagePool(CHAINS * DEPTH * PAGES_PER_BLOCK, PAGE, DIM)
    cache = PrefixCache(pool)
    spec = _spec("full")
    model: dict[bytes, tuple[int, int]] = {}  # key -> (last use, depth)
    pages: dict[bytes, np.ndarray] = {}
    held: dict[bytes, np.ndarray] = {}  # key -> the pages a "sequence" holds too
    for tick, (op, chain, depth) in enumerate(ops):
        key, parent = bytes([chain, depth]), bytes([chain, depth - 1]) if depth else None
        if op == "publish":
            ids = pool.alloc(PAGES_PER_BLOCK)  # the publishing sequence's pages
            kept = cache.publish(key, parent, spec, BLOCK, ids)
            pool.free(ids)  # the sequence ends: the cache alone holds them, if it kept them
            assert kept == (key not in model and (parent is None or parent in model))
            if key in model or kept:
                model[key] = (tick, depth)
                pages.setdefault(key, ids)
        elif op == "lookup":
            chain_keys = [bytes([chain, d]) for d in range(depth + 1)]
            found = cache.lookup(chain_keys, spec, BLOCK)
            run = list(itertools.takewhile(lambda k: k in model, chain_keys))
            assert [b.key for b in found] == run
            model.update({k: (tick, model[k][1]) for k in run})
        elif op == "hold" and key in model and key not in held:
            pool.share(pages[key])
            held[key] = pages[key]
        elif op == "let_go" and key in held:
            pool.free(held.pop(key))
        elif op == "evict":
            wanted, freed = (depth + 1) * PAGES_PER_BLOCK, 0
            while freed < wanted:
                ends = [k for k in model if k not in held and bytes([k[0], k[1] + 1]) not in model]
                if not ends:
                    break
                victim = min(ends, key=lambda k: model[k])
                del model[victim], pages[victim]
                freed += PAGES_PER_BLOCK
            assert cache.evict(wanted) == freed
        assert cache.keys() == sorted(model, key=lambda k: model[k])
        assert cache.stats().pages == len(model) * PAGES_PER_BLOCK
    for ids in held.values():
        pool.free(ids)
    cache.clear()
    assert pool.num_used == 0
