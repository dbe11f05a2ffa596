"""The index facts at the Store level: ``icecache``, ``icecache-r``, ``icecache-tokens`` and
``kmeans`` bodies.

Layers 0 is dense; with ``icecache-r`` layers 2 and 3 mirror layer 1's leaf layout
(``reuse_group`` 3) and select on their own.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_service.page_pool import PagePool, PoolExhausted
from cache_service.policies.indexed import GatheringBody
from cache_service.store import Store
from cache_service.types import OutOfOrder, SequenceSpec, UnknownSequence

LAYERS, KV, Q, DIM, PAGE = 4, 2, 4, 16, 16
GROUP = Q // KV
INDEXED = ["icecache", "icecache-r", "icecache-tokens", "kmeans"]


def _spec(policy, budget=64, **kw):
    return SequenceSpec(LAYERS, KV, Q, DIM, policy=policy, budget=budget, dense_layers=1, **kw)


def _head(store, sel, head):
    """Positions of head ``head``'s selected tokens, and its (page, slot) of each."""
    pages = sel.pages[sel.indptr[head] : sel.indptr[head + 1]]
    lens = sel.lens[sel.indptr[head] : sel.indptr[head + 1]]
    assert (lens == store.pool.fill[pages]).all()
    page_of = np.repeat(pages, lens)
    slot_of = np.concatenate([np.arange(n) for n in lens]) if len(lens) else page_of
    return store.pool.positions[page_of, slot_of], page_of, slot_of


def _window(spec, length, page=PAGE):
    """Positions that sit in the sinks and the recent window at ``length`` tokens."""
    sinks = spec.sinks(page)
    after = -(-max(length - sinks, 0) // page)  # positional pages after the sinks
    start = sinks + (after - min(after, spec.window_pages(page))) * page
    return set(range(min(sinks, length))) | set(range(start, length))


def _append_all(store, seq, keys, values, start=0):
    """Append tokens ``start..`` of ``keys [L, T, KV, D]`` to every layer, in layer order."""
    positions = np.arange(start, start + keys.shape[1])
    for layer in range(LAYERS):
        store.append(seq, layer, keys[layer], values[layer], positions)


def _retrieve_all(store, seq, queries):
    """One selection per layer, leader layers before their followers."""
    return [store.retrieve(seq, layer, queries[layer]) for layer in range(LAYERS)]


def _assert_kv_in_place(store, sel, head, keys, values, layer):
    """Every selected slot holds the K/V of the position it claims (K/V moved correctly)."""
    positions, pages, slots = _head(store, sel, head)
    assert np.array_equal(store.pool.data[pages, 0, slots], keys[layer, positions, head])
    assert np.array_equal(store.pool.data[pages, 1, slots], values[layer, positions, head])


# ---------------------------------------------------------------- planted clusters

SINKS, BODY = 16, 256  # one sink page, 256 body tokens, one full window page


def _planted(num_blobs, seed=0):
    """Keys ``[L, T, KV, D]`` whose body tokens form blobs around ``10 * e_(4h + j)`` for
    head ``h``; the blob of each body token; values."""
    rng = np.random.default_rng(seed)
    tokens = SINKS + BODY + PAGE
    blob = rng.permutation(np.repeat(np.arange(num_blobs), BODY // num_blobs))
    keys = 0.3 * rng.standard_normal((LAYERS, tokens, KV, DIM))
    body = SINKS + np.arange(BODY)
    for head in range(KV):
        keys[:, body, head, 4 * head + blob] += 10.0
    values = rng.standard_normal((LAYERS, tokens, KV, DIM))
    return keys.astype(np.float32), values.astype(np.float32), blob


@pytest.mark.parametrize(
    ("policy", "num_blobs"),
    # kmeans clusters hold 4 pages (64 tokens): blobs of 128 tokens are two clusters each.
    [("icecache", 4), ("icecache-r", 4), ("icecache-tokens", 4), ("kmeans", 2)],
)
def test_a_query_near_one_cluster_selects_exactly_its_positions_plus_sinks_and_window(
    policy, num_blobs
):
    per_blob = BODY // num_blobs
    store = Store(PagePool(1024, PAGE, DIM))
    budget = SINKS + PAGE + per_blob
    store.create("s", _spec(policy, budget=budget, sink_tokens=SINKS, recent_pages=1))
    keys, values, blob = _planted(num_blobs)
    _append_all(store, "s", keys, values)
    length = keys.shape[1]
    fixed = set(range(SINKS)) | set(range(SINKS + BODY, length))
    for j in range(num_blobs):
        queries = np.zeros((LAYERS, Q, DIM), np.float32)
        for head in range(KV):  # each head asks for its own blob
            queries[:, head * GROUP : (head + 1) * GROUP, 4 * head + (j + head) % num_blobs] = 1
        selections = _retrieve_all(store, "s", queries)
        for layer, sel in enumerate(selections):
            for head in range(KV):
                got = _head(store, sel, head)[0]
                if layer == 0:  # dense
                    assert sorted(got.tolist()) == list(range(length))
                    continue
                wanted = SINKS + np.flatnonzero(blob == (j + head) % num_blobs)
                assert len(got) == len(set(got.tolist())) == budget
                assert set(got.tolist()) == fixed | set(wanted.tolist())
                _assert_kv_in_place(store, sel, head, keys, values, layer)


def test_icecache_r_followers_select_their_own_tokens_on_the_leaders_layout():
    """The blobs of layers 2 and 3 lie along other directions than layer 1's: the same
    query picks another blob there, on the follower's own pages (the leader's selection
    would be the wrong blob)."""
    num_blobs, per_blob = 4, BODY // 4
    store = Store(PagePool(1024, PAGE, DIM))
    store.create(
        "s", _spec("icecache-r", budget=SINKS + PAGE + per_blob, sink_tokens=SINKS, recent_pages=1)
    )
    keys, values, blob = _planted(num_blobs)
    shift = {1: 0, 2: 1, 3: 3}  # layer -> blob b lies along direction (b + shift) % 4
    body = SINKS + np.arange(BODY)
    rng = np.random.default_rng(2)
    for layer, k in shift.items():
        for head in range(KV):
            keys[layer, body, head] = 0.3 * rng.standard_normal((BODY, DIM))
            keys[layer, body, head, 4 * head + (blob + k) % num_blobs] += 10.0
    _append_all(store, "s", keys, values)
    fixed = set(range(SINKS)) | set(range(SINKS + BODY, keys.shape[1]))
    for d in range(num_blobs):
        queries = np.zeros((LAYERS, Q, DIM), np.float32)
        for head in range(KV):
            queries[:, head * GROUP : (head + 1) * GROUP, 4 * head + d] = 1
        selections = _retrieve_all(store, "s", queries)
        for head in range(KV):
            lead_pages = set(_head(store, selections[1], head)[1].tolist())
            for layer, k in shift.items():
                got, pages, _ = _head(store, selections[layer], head)
                wanted = SINKS + np.flatnonzero((blob + k) % num_blobs == d)
                assert sorted(got.tolist()) == sorted(fixed | set(wanted.tolist()))
                _assert_kv_in_place(store, selections[layer], head, keys, values, layer)
                if layer != 1:
                    assert not set(pages.tolist()) & lead_pages


def _mass_ranked_within(leaf_keys, queries, max_tokens):
    """Reference of a follower's choice when every leaf is scored exactly: leaves by
    attention mass (each query head's softmax over all their tokens, mean over the group)
    in float64, each taken while it fits ``max_tokens``."""
    q = queries.astype(np.float64)
    logits = [q @ k.astype(np.float64).T / np.sqrt(q.shape[1]) for k in leaf_keys]
    top = max(x.max() for x in logits)
    mass = np.array([np.exp(x - top).sum(axis=1) for x in logits])  # [leaves, G]
    mass = (mass / mass.sum(axis=0)).mean(axis=1)
    taken, left = [], max_tokens
    for i in np.lexsort((np.arange(len(mass)), -mass)):
        if len(leaf_keys[i]) <= left:
            taken.append(int(i))
            left -= len(leaf_keys[i])
    return taken


def test_icecache_r_followers_catch_up_on_several_leader_inserts_at_once():
    store = Store(PagePool(2048, PAGE, DIM))
    store.create("s", _spec("icecache-r", budget=80))
    rng = np.random.default_rng(8)
    keys = rng.standard_normal((LAYERS, 320, KV, DIM)).astype(np.float32)
    values = rng.standard_normal((LAYERS, 320, KV, DIM)).astype(np.float32)
    _append_all(store, "s", keys[:, :200], values[:, :200])
    _retrieve_all(store, "s", np.ones((LAYERS, Q, DIM), np.float32))  # builds the indexes
    for layer in (0, 1):  # the leader inserts three times ...
        for start in (200, 240, 280):
            rows = slice(start, start + 40)
            store.append(
                "s", layer, keys[layer, rows], values[layer, rows], np.arange(start, start + 40)
            )
    for layer in (2, 3):  # ... its followers replay all three placements in one append
        store.append("s", layer, keys[layer, 200:], values[layer, 200:], np.arange(200, 320))
    queries = rng.standard_normal((LAYERS, Q, DIM)).astype(np.float32)
    selections = _retrieve_all(store, "s", queries)
    for head in range(KV):
        for layer in (2, 3):
            _assert_kv_in_place(store, selections[layer], head, keys, values, layer)
    body = store._seqs["s"].bodies
    for layer in (2, 3):  # every token scored exactly (quota >= 4 x 80 >= the body): by mass
        for head in range(KV):
            follower = body[layer][head]
            leaves = sorted(follower.leaf_page)
            pages = [follower.leaf_page[leaf] for leaf in leaves]
            held = [store.pool.positions[p, : store.pool.fill[p]] for p in pages]
            group = queries[layer, head * GROUP : (head + 1) * GROUP]
            leaf_keys = [keys[layer, pos, head] for pos in held]
            assert sum(map(len, held)) <= 4 * 80
            want = [pages[i] for i in _mass_ranked_within(leaf_keys, group, 80)]
            assert follower.select(group, 80).tolist() == want
    for layer in (2, 3):  # every follower leaf page holds the same positions as the leader's
        for head in range(KV):
            leader, follower = body[1][head], body[layer][head]
            assert leader.leaf_page.keys() == follower.leaf_page.keys()
            for leaf, page in follower.leaf_page.items():
                fill = store.pool.fill[page]
                assert fill == leader.index.leaf_fill(leaf)
                expected = store.pool.positions[leader.leaf_page[leaf], :fill]
                assert store.pool.positions[page, :fill].tolist() == expected.tolist()
                assert (store.pool.positions[page, fill:] == -1).all()


# ---------------------------------------------------------------- decoding


def _decode_steps(store, seq, steps, rng, keys, values, start):
    """Decode ``steps`` tokens through every layer; yields (position, [Selection per layer])."""
    for pos in range(start, start + steps):
        out = []
        for layer in range(LAYERS):
            k, v = keys[layer, pos][None], values[layer, pos][None]
            q = rng.standard_normal((1, Q, DIM)).astype(np.float32)
            (sel,) = store.decode(layer, [seq], k, v, np.array([pos]), q)
            out.append(sel)
        yield pos, out


@pytest.mark.parametrize("policy", INDEXED)
def test_budget_is_never_exceeded_and_sinks_and_window_are_always_selected(policy):
    store = Store(PagePool(2048, PAGE, DIM))
    spec = _spec(policy, budget=64)
    store.create("s", spec)
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((LAYERS, 260, KV, DIM)).astype(np.float32)
    values = rng.standard_normal((LAYERS, 260, KV, DIM)).astype(np.float32)
    _append_all(store, "s", keys[:, :100], values[:, :100])
    for pos, selections in _decode_steps(store, "s", 160, rng, keys, values, 100):
        for layer, sel in enumerate(selections[1:], start=1):
            for head in range(KV):
                got = _head(store, sel, head)[0].tolist()
                assert len(got) == len(set(got)) <= 64
                assert _window(spec, pos + 1) <= set(got)
                assert pos in got
                assert set(got) <= set(range(pos + 1))
                _assert_kv_in_place(store, sel, head, keys, values, layer)


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # icecache-tokens reads either
@pytest.mark.parametrize("policy", INDEXED)
def test_selection_is_deterministic_for_a_fixed_seed(policy, dtype):
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((LAYERS, 200, KV, DIM)).astype(np.float32)
    runs = []
    for _ in range(2):
        store = Store(PagePool(2048, PAGE, DIM, dtype=dtype))
        store.create("s", _spec(policy, seed=5))
        _append_all(store, "s", keys[:, :150], keys[:, :150])
        steps = _decode_steps(store, "s", 50, np.random.default_rng(4), keys, keys, 150)
        runs.append([])
        for _, selections in steps:
            for sel in selections:
                runs[-1].append(sel.pages.tolist())
                runs[-1] += [_head(store, sel, head)[0].tolist() for head in range(KV)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("policy", INDEXED)
def test_a_budget_covering_every_token_selects_every_position(policy):
    store = Store(PagePool(2048, PAGE, DIM))
    store.create("s", _spec(policy, budget=400))
    keys = np.random.default_rng(5).standard_normal((LAYERS, 300, KV, DIM)).astype(np.float32)
    _append_all(store, "s", keys, keys)
    queries = np.random.default_rng(6).standard_normal((LAYERS, Q, DIM)).astype(np.float32)
    for sel in _retrieve_all(store, "s", queries):
        for head in range(KV):
            assert sorted(_head(store, sel, head)[0].tolist()) == list(range(300))


@pytest.mark.parametrize("policy", INDEXED)
def test_release_after_decoding_returns_every_page(policy):
    store = Store(PagePool(2048, PAGE, DIM))
    total = store.pool.num_free
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((LAYERS, 200, KV, DIM)).astype(np.float32)
    for seq in ("a", "b"):
        store.create(seq, _spec(policy))
        _append_all(store, seq, keys[:, :120], keys[:, :120])
        for _ in _decode_steps(store, seq, 80, rng, keys, keys, 120):
            pass
    store.release("a")
    store.release("b")
    assert store.pool.num_free == total


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("policy", INDEXED)
def test_bad_requests_raise_clear_errors(policy):
    store = Store(PagePool(256, PAGE, DIM))
    with pytest.raises(ValueError, match=r"budget 31 is below the sink tokens plus the recent"):
        store.create("s", _spec(policy, budget=31))  # 16 sink tokens + one 16-token page
    with pytest.raises(ValueError, match=r"budget 40 is below .* \(48\); raise the budget"):
        store.create("s", _spec(policy, budget=40, sink_tokens=16, recent_pages=2))
    assert "s" not in store
    store.create("s", _spec(policy, budget=32))
    q = np.ones((Q, DIM), np.float32)
    k = np.zeros((1, KV, DIM), np.float32)
    message = "unknown sequence 'nope': create it first"
    with pytest.raises(UnknownSequence, match=message):
        store.retrieve("nope", 1, q)
    with pytest.raises(UnknownSequence, match=message):
        store.decode(1, ["nope"], k, k, np.array([0]), q[None])
    with pytest.raises(UnknownSequence, match=message):
        store.append("nope", 1, k, k, np.array([0]))
    with pytest.raises(UnknownSequence, match=message):
        store.release("nope")
    with pytest.raises(ValueError, match=r"queries must have shape \(4, 16\), got \(4, 8\)"):
        store.retrieve("s", 1, np.ones((Q, 8), np.float32))
    with pytest.raises(ValueError, match=r"keys and values must have shape \(1, 2, 16\)"):
        store.append("s", 1, k[:, :, :8], k[:, :, :8], np.array([0]))
    assert store.length("s", 1) == 0


def test_icecache_tokens_takes_the_heaviest_body_tokens_into_scratch_pages_each_step():
    """With a budget whose search scores every body token (4 × 112 ≥ 272), the body part of
    an ``icecache-tokens`` selection is the exact top by attention mass (float64 brute
    force); the tokens are copied with their K/V into fresh pages, freed at the next step."""
    store = Store(PagePool(2048, PAGE, DIM))
    spec = _spec("icecache-tokens", budget=144, sink_tokens=SINKS, recent_pages=1)
    store.create("s", spec)
    rng = np.random.default_rng(11)
    length = 304
    keys = rng.standard_normal((LAYERS, length, KV, DIM)).astype(np.float32)
    values = rng.standard_normal((LAYERS, length, KV, DIM)).astype(np.float32)
    _append_all(store, "s", keys, values)
    window = _window(spec, length)
    body = np.array(sorted(set(range(length)) - window))
    free = None
    for _ in range(3):
        queries = rng.standard_normal((LAYERS, Q, DIM)).astype(np.float32)
        selections = _retrieve_all(store, "s", queries)
        free = store.pool.num_free if free is None else free
        assert store.pool.num_free == free  # the last step's scratch pages came back
        for layer, sel in enumerate(selections[1:], start=1):
            for head in range(KV):
                got = _head(store, sel, head)[0].tolist()
                group = queries[layer, head * GROUP : (head + 1) * GROUP].astype(np.float64)
                held = keys[layer, body, head].astype(np.float64)  # as the pool holds them
                logits = group @ held.T / np.sqrt(DIM)
                probs = np.exp(logits - logits.max(1, keepdims=True))
                mass = (probs / probs.sum(1, keepdims=True)).mean(0)
                heaviest = body[np.argsort(-mass, kind="stable")[: spec.body_budget(PAGE)]]
                assert sorted(set(got) - window) == sorted(heaviest.tolist())
                assert window <= set(got) and len(got) == len(set(got)) == 144
                _assert_kv_in_place(store, sel, head, keys, values, layer)
    store.release("s")
    assert store.pool.num_free == 2048


def test_icecache_tokens_leaves_every_token_in_its_positional_page():
    """``icecache-tokens`` indexes tokens where they arrived: its bodies hold exactly the
    positional pages ``full`` holds for the same tokens (the index reads keys from them and
    keeps no copy), and a step adds only its scratch pages."""
    rng = np.random.default_rng(12)
    length = 304
    keys = rng.standard_normal((LAYERS, length, KV, DIM)).astype(np.float32)
    used = {}
    for policy in ("full", "icecache-tokens"):
        store = Store(PagePool(2048, PAGE, DIM))
        spec = _spec(policy, budget=144, sink_tokens=SINKS, recent_pages=1)
        store.create("s", spec)
        _append_all(store, "s", keys, keys)
        queries = rng.standard_normal((LAYERS, Q, DIM)).astype(np.float32)
        _retrieve_all(store, "s", queries)
        bodies = store._seqs["s"].bodies
        scratch = sum(len(b.scratch_pages()) for row in bodies for b in row)
        used[policy] = store.pool.num_used - scratch
        if policy == "icecache-tokens":
            for row in bodies[1:]:
                for body in row:
                    assert isinstance(body, GatheringBody) and body.index.keys is None
                    positions = store.pool.positions[body.all_pages()].ravel()
                    np.testing.assert_array_equal(positions, np.sort(positions))
            assert scratch == (LAYERS - 1) * KV * -(-spec.body_budget(PAGE) // PAGE)
    assert used["icecache-tokens"] == used["full"]


def test_icecache_r_follower_before_its_leader_is_refused():
    store = Store(PagePool(256, PAGE, DIM))
    store.create("s", _spec("icecache-r"))
    k = np.zeros((40, KV, DIM), np.float32)
    store.append("s", 0, k, k, np.arange(40))
    with pytest.raises(OutOfOrder, match="append to layer 1 first"):
        store.append("s", 2, k, k, np.arange(40))
    store.append("s", 1, k, k, np.arange(40))
    store.append("s", 2, k, k, np.arange(40))
    with pytest.raises(
        OutOfOrder,
        match="icecache-r layer 2 reuses layer 1's layout: decode or retrieve layer 1 first",
    ):
        store.retrieve("s", 2, np.ones((Q, DIM), np.float32))


# ---------------------------------------------------------------- random operation sequences

H_LAYERS = 3  # dense layer 0; icecache-r: layer 2 mirrors layer 1 (reuse_group 2)


def _held(store, seq, layer, head):
    """Every page one (sequence, layer, head) holds: sinks, window, body, pending prefill."""
    s = store._seqs[seq]
    lay, body = s.heads[layer][head], s.bodies[layer][head]
    pending = np.asarray(s.pending[layer][head], dtype=np.int64)
    return np.concatenate(
        [lay.sink_pages(), lay.window_pages_now(), lay.leaving_pages(), body.all_pages(), pending]
    )


def _assert_every_position_in_exactly_one_page(store, seqs):
    pool, owner = store.pool, {}
    for seq, keys in seqs.items():
        for layer in range(H_LAYERS):
            length = store.length(seq, layer)
            for head in range(keys.shape[2]):
                pages = _held(store, seq, layer, head)
                scratch = store._seqs[seq].bodies[layer][head].scratch_pages().tolist()
                for page in pages.tolist() + scratch:  # scratch: copies of the last pick
                    assert page not in owner, f"page {page} shared by {owner[page]}"
                    owner[page] = (seq, layer, head)
                fills = pool.fill[pages]
                assert ((fills >= 1) & (fills <= pool.page_size)).all()
                valid = np.arange(pool.page_size)[None, :] < fills[:, None]
                assert (pool.positions[pages][~valid] == -1).all()
                positions = pool.positions[pages][valid]
                assert sorted(positions.tolist()) == list(range(length))
                page_of, slot_of = np.nonzero(valid)
                stored = pool.data[pages[page_of], 0, slot_of]
                assert np.array_equal(stored, keys[layer, positions, head])
    assert len(owner) == pool.num_used  # no page lost: every used page has one owner


_OPS = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 30), st.integers(0, 30)),
    st.tuples(st.just("decode"), st.integers(1, 8)),
    st.tuples(st.just("retrieve")),
)


@st.composite
def _store_runs(draw):
    page = draw(st.sampled_from([2, 4]))
    return {
        "policy": draw(st.sampled_from(INDEXED)),
        "page": page,
        "budget": draw(st.integers(2 * page, 8 * page)),
        "sequences": draw(st.integers(1, 2)),
        "ops": draw(st.lists(_OPS, min_size=1, max_size=6)),
        "keys": draw(st.sampled_from(["gaussian", "duplicates", "identical"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _run_keys(run, length, kv, dim, rng):
    shape = (H_LAYERS, length, kv, dim)
    if run["keys"] == "gaussian":
        keys = rng.standard_normal(shape)
    elif run["keys"] == "duplicates":
        keys = rng.integers(-1, 2, shape).astype(float)
    else:
        keys = np.broadcast_to(rng.standard_normal(dim), shape)
    return keys.astype(np.float32)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_store_runs())
def test_random_appends_and_decodes_keep_every_position_in_exactly_one_page(run):
    """Appends (the leader layers in two pieces, ``icecache-r`` followers in one, so they
    replay several placements at once), retrieves and batched decodes, in random order."""
    page, kv, q, dim = run["page"], 2, 4, 4
    store = Store(PagePool(65536, page, dim))  # tiny heads: their indexes outweigh their K/V
    total = store.pool.num_free
    spec = SequenceSpec(
        H_LAYERS,
        kv,
        q,
        dim,
        policy=run["policy"],
        budget=run["budget"],
        sink_tokens=page,
        recent_pages=1,
        dense_layers=1,
        reuse_group=2,
        seed=run["seed"],
    )
    rng = np.random.default_rng(run["seed"])
    seqs = {f"s{i}": _run_keys(run, 300, kv, dim, rng) for i in range(run["sequences"])}
    for seq in seqs:
        store.create(seq, spec)
    names, length = list(seqs), 0

    def check_selection(sel, layer, pos):
        for head in range(kv):
            got = _head(store, sel, head)[0].tolist()
            assert len(got) == len(set(got)) and set(got) <= set(range(pos + 1))
            assert _window(spec, pos + 1, page) <= set(got)
            assert layer == 0 or len(got) <= run["budget"]

    for op in run["ops"]:
        if op[0] == "append":
            first, second = op[1], op[2]
            for seq, keys in seqs.items():
                for layer in range(H_LAYERS):
                    pieces = [(length, first), (length + first, second)]
                    if layer == 2:  # the follower catches up in one append
                        pieces = [(length, first + second)]
                    for begin, n in pieces:
                        chunk = keys[layer, begin : begin + n]
                        store.append(seq, layer, chunk, chunk, np.arange(begin, begin + n))
            length += first + second
        elif op[0] == "retrieve" and length:
            for seq in names:
                for layer in range(H_LAYERS):
                    queries = rng.standard_normal((q, dim)).astype(np.float32)
                    check_selection(store.retrieve(seq, layer, queries), layer, length - 1)
        elif op[0] == "decode":
            for pos in range(length, length + op[1]):
                for layer in range(H_LAYERS):
                    k = np.stack([seqs[seq][layer, pos] for seq in names])
                    queries = rng.standard_normal((len(names), q, dim)).astype(np.float32)
                    positions = np.full(len(names), pos)
                    for sel in store.decode(layer, names, k, k, positions, queries):
                        check_selection(sel, layer, pos)
            length += op[1]
        _assert_every_position_in_exactly_one_page(store, seqs)
    for seq in names:
        store.release(seq)
    assert store.pool.num_free == total


def _bodies_bytes(store):
    """The bodies' own memory, walked: every sequence's and every kept index's."""
    live = sum(b.nbytes() for seq in store._seqs.values() for row in seq.bodies for b in row)
    kept = [b for block in store.prefixes._blocks.values() for b in block.bodies.values()]
    return live + sum(b.nbytes() for b in kept)


@pytest.mark.parametrize("policy", INDEXED)
def test_the_indexes_memory_is_counted_and_held_back_from_the_pool(policy):
    """``index_bytes`` is what the bodies hold outside the pool, kept as they change; it
    counts in ``bytes_used`` and takes its worth of free pages out of use: an append that
    fits in the free pages but not beside the indexes is refused, saying so."""
    store = Store(PagePool(3000, PAGE, DIM))
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((LAYERS, 600, KV, DIM)).astype(np.float32)
    store.create("s", _spec(policy))
    _append_all(store, "s", keys[:, :500], keys[:, :500])
    _retrieve_all(store, "s", rng.standard_normal((LAYERS, Q, DIM)).astype(np.float32))
    _append_all(store, "s", keys[:, 500:], keys[:, 500:], start=500)  # inserts
    stats = store.stats()
    assert stats.index_bytes == _bodies_bytes(store) > 10 * stats.page_bytes
    assert stats.bytes_used == stats.pages_used * stats.page_bytes + stats.index_bytes
    held = -(-stats.index_bytes // stats.page_bytes)
    room = store.pool.num_free - held
    store.create("f", SequenceSpec(LAYERS, KV, Q, DIM, policy="full"))
    fits = room // KV * PAGE  # tokens whose pages fill the room, KV heads at a time
    big = np.zeros((fits + PAGE, KV, DIM), np.float32)
    with pytest.raises(PoolExhausted, match="held back for the indexes"):
        store.append("f", 0, big, big, np.arange(len(big)))
    assert store.pool.num_free - held == room  # refused before changing anything
    store.append("f", 0, big[:fits], big[:fits], np.arange(fits))
    store.release("s")
    store.release("f")
    assert store.stats().index_bytes == _bodies_bytes(store) == 0
