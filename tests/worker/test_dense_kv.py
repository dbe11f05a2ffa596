"""The contiguous K/V of the layers that attend to every token: exact attention, the same
values as the store, and the same logits whichever way the copy was filled."""

import numpy as np
import pytest
import torch

from cache_service.types import Selection
from worker.dense_kv import GROWTH_TOKENS, DenseKV
from worker.engine import EngineConfig
from worker.factory import build_engine
from worker.kv_client import LocalKVClient

CPU = torch.device("cpu")


def reference(q, keys, values, scale):
    """float64 softmax attention, one query head at a time: q ``[Hq, D]``, K/V ``[T, H, D]``."""
    heads = keys.shape[1]
    group = q.shape[0] // heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(q.shape[0]):
        k, v = keys[:, h // group].double(), values[:, h // group].double()
        out[h] = torch.softmax(k @ q[h].double() * scale, 0) @ v
    return out


@pytest.mark.parametrize("prompt,steps", [(1, 0), (5, 70), (GROWTH_TOKENS - 1, 2)])
def test_attention_over_the_copy_is_exact_as_it_grows(prompt, steps):
    gen = torch.Generator().manual_seed(prompt + steps)
    keys, values = (torch.randn(prompt + steps, 3, 16, generator=gen) for _ in range(2))
    dense = DenseKV(CPU, layers=1)
    dense.fill(0, keys[:prompt], values[:prompt])
    for t in range(prompt, prompt + steps):  # grows past its first capacity
        dense.append(0, keys[t], values[t])
    q = torch.randn(9, 16, generator=gen)
    assert dense.length(0) == prompt + steps
    got = dense.attend(0, q, 0.25)
    torch.testing.assert_close(got.double(), reference(q, keys, values, 0.25), atol=1e-6, rtol=0)


def test_filled_from_pages_it_holds_what_filled_from_tensors_holds():
    page, heads, dim = 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(10, heads, dim, generator=gen) for _ in range(2))
    # pages of 4, 4 and 2 tokens per head, in position order; slots past a page's length
    # hold garbage that must not be read
    data = np.full((6, 2, page, dim), np.nan, dtype=np.float32)
    for h in range(heads):
        for p, start in enumerate((0, 4, 8)):
            n = min(page, 10 - start)
            data[3 * h + p, 0, :n] = keys[start : start + n, h].numpy()
            data[3 * h + p, 1, :n] = values[start : start + n, h].numpy()
    indptr, lens = np.array([0, 3, 6]), np.array([4, 4, 2] * heads)
    selection = Selection(indptr, np.arange(6), lens, np.zeros(6, dtype=np.int64))
    from_pages, from_tensors = DenseKV(CPU, 1), DenseKV(CPU, 1)
    from_pages.fill_from_pages(0, data, selection)
    from_tensors.fill(0, keys, values)
    q = torch.randn(4, dim, generator=gen)
    assert from_pages.length(0) == from_tensors.length(0) == 10
    assert torch.equal(from_pages.attend(0, q, 0.3), from_tensors.attend(0, q, 0.3))


@pytest.mark.parametrize("policy", ["full", "icecache"])
def test_a_copy_filled_from_the_store_mid_generation_changes_no_logit(smollm, policy):
    """As for a sequence taken over from another worker: its copy starts empty and fills
    from the store's pages at its next step; every later logit equals, bit for bit, those
    of the sequence that kept its copy, and the copy holds what the store holds."""
    engine, tokenizer = build_engine(EngineConfig(policy=policy, budget=64), loaded=smollm)
    prompt = tokenizer.encode("The history of the printing press begins in " * 12)[:120]
    logits = {}
    for name in ("kept", "refilled"):
        seq, out = engine.start(prompt)
        steps = []
        for step in range(8):
            if name == "refilled" and step == 4:
                seq.dense = DenseKV(CPU, seq.dense.layers)
            out = engine.decode_step([seq], [int(torch.argmax(out if out.ndim == 1 else out[0]))])
            steps.append(out[0].clone())
        logits[name] = torch.stack(steps)
        dense = seq.dense
        q = np.zeros((smollm[0].config.num_heads, smollm[0].config.head_dim), np.float32)
        for layer in range(dense.layers):
            sel = engine.kv.retrieve(seq.seq_id, layer, q)
            stored = DenseKV(CPU, 1)
            stored.fill_from_pages(0, engine.kv.read_pages(sel.pages), sel)
            assert all(map(torch.equal, stored.held(0), dense.held(layer)))
        engine.finish(seq)
    assert torch.equal(logits["kept"], logits["refilled"])


class CountingKV(LocalKVClient):
    """The in-process store, counting which layers each decode step selected for."""

    def __init__(self, store):
        super().__init__(store)
        self.selected: list[int] = []
        self.stored_only: list[int] = []

    def decode(self, layer, seq_ids, keys, values, positions, queries):
        self.selected.append(layer)
        return super().decode(layer, seq_ids, keys, values, positions, queries)

    def append_step(self, layer, seq_ids, keys, values, positions):
        self.stored_only.append(layer)
        super().append_step(layer, seq_ids, keys, values, positions)


def test_layers_the_copies_hold_are_stored_without_a_selection(smollm):
    """A batch whose copies all hold a layer has the store only store its tokens; a batch
    with a copy still to fill (a sequence taken over) selects for it. Logits equal, bit for
    bit, those of a batch that never lost a copy, and the store ends holding what the
    copies hold."""
    model, tokenizer = smollm
    config = EngineConfig(policy="icecache", budget=64)
    kv = CountingKV(LocalKVClient.with_capacity(2**27, 16, model.config.head_dim).store)
    engine, _ = build_engine(config, loaded=smollm, kv=kv)
    kept, _ = build_engine(config, loaded=smollm)
    prompt = tokenizer.encode("A short history of maps and of those who drew them. " * 8)[:100]
    dense = list(range(config.dense_layers))
    every = list(range(model.config.num_layers))
    (a, out), (b, _) = engine.start(prompt), engine.start(prompt[:90])
    (ka, _), (kb, _) = kept.start(prompt), kept.start(prompt[:90])
    tokens = [int(torch.argmax(out))] * 2
    for step in range(4):
        if step == 2:
            b.dense = DenseKV(CPU, b.dense.layers)  # taken over: fills from the store
        kv.selected.clear()
        kv.stored_only.clear()
        got = engine.decode_step([a, b], tokens)
        assert torch.equal(got, kept.decode_step([ka, kb], tokens))
        if step == 2:
            assert (kv.stored_only, kv.selected) == ([], every)
        else:
            assert (kv.stored_only, kv.selected) == (dense, every[len(dense) :])
        tokens = [int(t) for t in torch.argmax(got, dim=-1)]
    q = np.zeros((model.config.num_heads, model.config.head_dim), np.float32)
    for seq in (a, b):
        for layer in dense:
            sel = kv.retrieve(seq.seq_id, layer, q)
            stored = DenseKV(CPU, 1)
            stored.fill_from_pages(0, kv.read_pages(sel.pages), sel)
            assert all(map(torch.equal, stored.held(0), seq.dense.held(layer)))
        engine.finish(seq)
    for seq in (ka, kb):
        kept.finish(seq)
