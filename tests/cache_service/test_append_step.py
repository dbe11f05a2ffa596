"""``Store.append_step``: a decode step that stores without selecting (for the layers a CPU
worker attends to over its own contiguous copy) leaves every sequence exactly as a plain
``decode`` of the same tokens does, refuses the layers that select, and is admitted whole or
not at all."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_service.page_pool import PagePool, PoolExhausted
from cache_service.store import Store
from cache_service.types import OutOfOrder, SequenceSpec

LAYERS, KV, Q, DIM, PAGE, DENSE = 3, 2, 4, 8, 16, 1


def _spec(policy: str) -> SequenceSpec:
    budget = None if policy == "full" else 64
    return SequenceSpec(LAYERS, KV, Q, DIM, policy=policy, budget=budget, dense_layers=DENSE)


def _kv(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _prefill(store: Store, seq_ids: list[str], policy: str, tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for seq_id in seq_ids:
        store.create(seq_id, _spec(policy))
        for layer in range(LAYERS):
            k, v = _kv(rng, tokens, KV, DIM), _kv(rng, tokens, KV, DIM)
            store.append(seq_id, layer, k, v, np.arange(tokens))


def _decoded(store: Store, seq_id: str, layer: int) -> bool:
    """Whether ``layer`` has decoded (its prompt pages joined the body)."""
    try:
        store.positional_pages(seq_id, layer)
    except OutOfOrder:
        return True
    return False


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["full", "quest", "oracle", "icecache-tokens"]),
    prompt=st.integers(1, 70),
    plan=st.lists(st.booleans(), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_append_step_leaves_a_sequence_as_decode_does(policy, prompt, plan, seed):
    """Two stores take the same tokens for two sequences; one decodes every layer, the other
    stores the dense layers' tokens append-only on the steps ``plan`` says. Every layer's
    selection at every later decode, and the pool's pages, stay identical."""
    ids = ["a", "b"]
    plain, appended = Store(PagePool(1024, PAGE, DIM)), Store(PagePool(1024, PAGE, DIM))
    for store in (plain, appended):
        _prefill(store, ids, policy, prompt, seed)
    full_layers = _spec(policy).full_layers
    rng = np.random.default_rng(seed + 1)
    for step, append_only in enumerate(plan):
        position = np.full(len(ids), prompt + step)
        for layer in range(LAYERS):
            k, v = _kv(rng, len(ids), KV, DIM), _kv(rng, len(ids), KV, DIM)
            q = _kv(rng, len(ids), Q, DIM)
            want = plain.decode(layer, ids, k, v, position, q)
            if append_only and layer < full_layers:
                appended.append_step(layer, ids, k, v, position)
                continue
            got = appended.decode(layer, ids, k, v, position, q)
            for a, b in zip(got, want, strict=True):
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_array_equal(x, y)
    for layer in range(LAYERS):  # what each layer attends to now, after the last step
        q = _kv(rng, Q, DIM)
        for seq_id in ids:
            assert appended.length(seq_id, layer) == plain.length(seq_id, layer)
            assert _decoded(appended, seq_id, layer) == _decoded(plain, seq_id, layer)
            got, want = appended.retrieve(seq_id, layer, q), plain.retrieve(seq_id, layer, q)
            for x, y in zip(got, want, strict=True):
                np.testing.assert_array_equal(x, y)
    assert appended.pool.num_used == plain.pool.num_used
    used = np.flatnonzero(plain.pool.refs > 0)
    np.testing.assert_array_equal(appended.pool.data[used], plain.pool.data[used])
    for store in (plain, appended):
        for seq_id in ids:
            store.release(seq_id)
    assert appended.pool.num_used == plain.pool.num_used == 0


def test_a_layer_that_selects_is_refused_and_nothing_is_stored():
    store = Store(PagePool(256, PAGE, DIM))
    _prefill(store, ["s"], "quest", 40, seed=0)
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 1, KV, DIM), _kv(rng, 1, KV, DIM)
    with pytest.raises(ValueError, match="layer 1 of 's' selects what it attends to .*first 1"):
        store.append_step(1, ["s"], k, v, np.array([40]))
    assert store.length("s", 1) == 40
    store.append_step(0, ["s"], k, v, np.array([40]))  # the dense layer takes it
    assert store.length("s", 0) == 41


def test_bad_append_steps_name_what_to_fix_and_change_nothing():
    store = Store(PagePool(256, PAGE, DIM))
    _prefill(store, ["s", "t"], "full", 20, seed=0)
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 2, KV, DIM), _kv(rng, 2, KV, DIM)
    with pytest.raises(ValueError, match="more than once"):
        store.append_step(0, ["s", "s"], k, v, np.array([20, 20]))
    with pytest.raises(ValueError, match="must continue at 20"):
        store.append_step(0, ["s", "t"], k, v, np.array([20, 21]))
    with pytest.raises(ValueError, match="shape"):
        store.append_step(0, ["s", "t"], k[:, :1], v[:, :1], np.array([20, 20]))
    assert [store.length(s, 0) for s in ("s", "t")] == [20, 20]


def test_a_batch_that_does_not_fit_is_refused_whole():
    """Both sequences sit at a page boundary, so each layer's token takes a new page per KV
    head; with room for one sequence's pages only, neither takes its token."""
    store = Store(PagePool(LAYERS * KV * 2 + 2, PAGE, DIM))
    _prefill(store, ["s", "t"], "full", PAGE, seed=0)
    assert store.pool.num_free == 2
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 2, KV, DIM), _kv(rng, 2, KV, DIM)
    with pytest.raises(PoolExhausted, match="append-only decode of 2 sequences needs up to 4"):
        store.append_step(0, ["s", "t"], k, v, np.array([PAGE, PAGE]))
    assert [store.length(s, 0) for s in ("s", "t")] == [PAGE, PAGE]
    store.append_step(0, ["s"], k[:1], v[:1], np.array([PAGE]))  # one of them fits
    assert [store.length(s, 0) for s in ("s", "t")] == [PAGE + 1, PAGE]
