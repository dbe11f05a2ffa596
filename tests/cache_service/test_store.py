import numpy as np
import pytest

from cache_service.page_pool import PagePool
from cache_service.store import Store
from cache_service.types import SequenceExists, SequenceSpec, UnknownSequence

LAYERS, KV, Q, DIM, PAGE = 3, 2, 4, 8, 16


def _spec(policy, budget=64, **kw):
    return SequenceSpec(LAYERS, KV, Q, DIM, policy=policy, budget=budget, dense_layers=1, **kw)


def _fill(store, seq, tokens, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((LAYERS, tokens, KV, DIM)).astype(np.float32)
    values = rng.standard_normal((LAYERS, tokens, KV, DIM)).astype(np.float32)
    for layer in range(LAYERS):
        store.append(seq, layer, keys[layer], values[layer], np.arange(tokens))
    return keys, values


def _positions(store, sel, head):
    pages = sel.pages[sel.indptr[head] : sel.indptr[head + 1]]
    lens = sel.lens[sel.indptr[head] : sel.indptr[head + 1]]
    return np.concatenate([store.pool.positions[p, :n] for p, n in zip(pages, lens, strict=False)])


@pytest.fixture
def store():
    return Store(PagePool(2048, PAGE, DIM))


def test_full_attends_to_every_token(store):
    store.create("s", _spec("full", budget=None))
    _fill(store, "s", 200)
    sel = store.retrieve("s", 2, np.ones((Q, DIM), np.float32))
    for head in range(KV):
        assert sorted(_positions(store, sel, head)) == list(range(200))


def test_dense_layers_attend_fully_under_a_sparse_policy(store):
    store.create("s", _spec("streaming"))
    _fill(store, "s", 200)
    sel = store.retrieve("s", 0, np.ones((Q, DIM), np.float32))
    assert sorted(_positions(store, sel, 1)) == list(range(200))


def test_streaming_keeps_sinks_and_the_most_recent_tokens(store):
    store.create("s", _spec("streaming"))
    _fill(store, "s", 200)
    sel = store.retrieve("s", 2, np.ones((Q, DIM), np.float32))
    # 16 sink tokens, window page [192, 200), body budget 32 = two newest body pages
    expected = list(range(16)) + list(range(160, 200))
    assert sorted(_positions(store, sel, 0)) == expected


def test_oracle_picks_the_exact_top_tokens_of_the_query_group(store):
    store.create("s", _spec("oracle"))
    keys, _ = _fill(store, "s", 200)
    q = np.random.default_rng(1).standard_normal((Q, DIM)).astype(np.float32)
    sel = store.retrieve("s", 2, q)
    for head in range(KV):
        body = np.arange(16, 192)  # between the sinks and the window page
        scores = (q[2 * head : 2 * head + 2] @ keys[2][body, head].T).max(axis=0)
        top = set(body[np.argsort(-scores)[:32]].tolist())
        got = set(_positions(store, sel, head).tolist()) - set(range(16)) - set(range(192, 200))
        assert got == top


def test_quest_ranks_pages_by_the_min_max_bound(store):
    store.create("s", _spec("quest"))
    keys, _ = _fill(store, "s", 200)
    q = np.random.default_rng(2).standard_normal((Q, DIM)).astype(np.float32)
    sel = store.retrieve("s", 2, q)
    k = keys[2][16:192, 0].reshape(11, PAGE, DIM)  # body pages of head 0
    lo, hi = k.min(1), k.max(1)
    bound = np.maximum(q[:2, None] * lo[None], q[:2, None] * hi[None]).sum(-1).max(0)
    best = np.sort(np.argsort(-bound)[:2])
    expected = set(range(16)) | set(range(192, 200))
    for page in best:
        expected |= set(range(16 + PAGE * page, 16 + PAGE * (page + 1)))
    assert set(_positions(store, sel, 0).tolist()) == expected


@pytest.mark.parametrize("policy", ["streaming", "quest", "oracle"])
def test_budget_is_never_exceeded_while_decoding(store, policy):
    store.create("s", _spec(policy))
    _fill(store, "s", 100)
    rng = np.random.default_rng(3)
    for pos in range(100, 160):
        k = rng.standard_normal((1, KV, DIM)).astype(np.float32)
        (sel,) = store.decode(
            2, ["s"], k, k, np.array([pos]), rng.standard_normal((1, Q, DIM)).astype(np.float32)
        )
        for head in range(KV):
            got = _positions(store, sel, head)
            assert len(got) <= 64
            assert pos in got  # the current token attends to itself
        for layer in (0, 1):
            store.append("s", layer, k, k, np.array([pos]))


@pytest.mark.parametrize("policy", ["full", "streaming", "quest", "oracle"])
def test_release_returns_every_page(store, policy):
    total = store.pool.num_free
    store.create("s", _spec(policy, budget=None if policy == "full" else 64))
    _fill(store, "s", 150)
    store.retrieve("s", 2, np.ones((Q, DIM), np.float32))
    store.release("s")
    assert store.pool.num_free == total
    assert "s" not in store


def test_bad_requests_raise_clear_errors(store):
    with pytest.raises(ValueError, match="budget 16 is below"):
        store.create("s", _spec("quest", budget=16))
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        store.create("s", _spec("nope"))
    with pytest.raises(ValueError, match="needs a token budget"):
        store.create("s", _spec("quest", budget=None))
    store.create("s", _spec("quest"))
    with pytest.raises(SequenceExists, match="already exists"):
        store.create("s", _spec("quest"))
    with pytest.raises(UnknownSequence, match="unknown sequence 'x'"):
        store.retrieve("x", 0, np.ones((Q, DIM), np.float32))
    k = np.zeros((2, KV, DIM), np.float32)
    with pytest.raises(ValueError, match="must continue at 0"):
        store.append("s", 0, k, k, np.array([1, 2]))
    with pytest.raises(ValueError, match="shape"):
        store.append("s", 0, k[:, :1], k[:, :1], np.array([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        store.append("s", 5, k, k, np.array([0, 1]))
    with pytest.raises(ValueError, match="queries must have shape"):
        store.retrieve("s", 0, np.ones((3, DIM), np.float32))
    assert store.length("s", 0) == 0  # nothing half-applied
