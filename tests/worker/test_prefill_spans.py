"""The prefill's linear layers run over spans of whole blocks (``Engine._spans``). A prompt
started from kept blocks computes its rows in other spans than its whole prefill does, so
the output is the same only if a row's product does not depend on the span around it: this
checks that property of the BLAS for the model's own weights, and the prefill's output for
every span width, with and without reuse."""

import pytest
import torch
import torch.nn.functional as F

import worker.engine as engine_module
from worker.engine import Engine, EngineConfig
from worker.kv_client import LocalKVClient

BLOCK = 32


def _engine(smollm, block=BLOCK):
    kv = LocalKVClient.with_capacity(2**30, 16, 64)
    return Engine(smollm[0], kv, EngineConfig(policy="full", prefill_chunk=block))


@pytest.mark.parametrize(
    ("rows", "block", "span", "expected"),
    [
        (200, 32, 64, [(0, 64), (64, 128), (128, 192), (192, 200)]),
        (192, 32, 64, [(0, 64), (64, 128), (128, 192)]),
        (200, 32, 100, [(0, 96), (96, 192), (192, 200)]),  # a span is whole blocks
        (20, 32, 2048, [(0, 20)]),
        (64, 32, 16, [(0, 32), (32, 64)]),  # at least one block
    ],
)
def test_spans_are_runs_of_whole_blocks_then_the_partial_one(
    smollm, monkeypatch, rows, block, span, expected
):
    monkeypatch.setattr(engine_module, "PREFILL_SPAN", span)
    assert _engine(smollm, block)._spans(rows) == expected


def test_a_row_of_a_linear_layer_is_the_same_in_any_span_of_whole_pages(smollm):
    """The property the spans rely on, on this machine's BLAS and the model's weights: rows
    of one call over 1024 rows equal those of a call over any run of them in multiples of
    the page size (16), at the start, the end and inside."""
    layer = smollm[0].block(0)
    weights = {
        "qkv": layer.self_attn.qkv_proj.weight,
        "o": layer.self_attn.o_proj.weight,
        "down": layer.mlp.down_proj.weight,
    }
    gen = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        x = torch.randn(1024, w.shape[1], generator=gen)
        with torch.inference_mode():
            whole = F.linear(x, w)
            for rows in range(16, 1024, 16):
                for start in sorted({0, 1024 - rows, (1024 - rows) // 32 * 16}):
                    part = F.linear(x[start : start + rows], w)
                    assert torch.equal(part, whole[start : start + rows]), (name, rows, start)


@pytest.fixture(scope="module")
def prompt(smollm, doc_prompts):
    return doc_prompts[0][:300]  # 9 whole blocks of 32 and 12 tokens


def _prefill(engine, ids, reuse):
    seq, logits = engine.start(ids, reuse_prefix=reuse)
    reused = seq.reused_tokens
    engine.finish(seq)
    return logits, reused


@pytest.mark.parametrize("span", [BLOCK, 3 * BLOCK, 2048])
def test_every_span_width_gives_one_block_at_a_times_output_with_and_without_reuse(
    smollm, prompt, monkeypatch, span
):
    """Spans of one block are the plain block-by-block prefill; wider spans, and prompts
    started from 2 or 7 kept blocks (so the spans fall elsewhere), give its bits."""
    monkeypatch.setattr(engine_module, "PREFILL_SPAN", BLOCK)
    expected, _ = _prefill(_engine(smollm), prompt, reuse=False)
    monkeypatch.setattr(engine_module, "PREFILL_SPAN", span)
    whole, _ = _prefill(_engine(smollm), prompt, reuse=False)
    assert torch.equal(whole, expected)
    for kept in (2, 7):
        engine = _engine(smollm)
        _prefill(engine, prompt[: kept * BLOCK + 5], reuse=True)  # keeps its whole blocks
        logits, reused = _prefill(engine, prompt, reuse=True)
        assert reused == kept * BLOCK and torch.equal(logits, expected)
