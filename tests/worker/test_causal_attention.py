"""Prefill attention: query chunks through SDPA's fused path against a plain softmax."""

import pytest
import torch

from worker.model import causal_attention


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention in float64, one query row at a time: q ``[T, Hq, D]`` of the last
    T positions, k, v ``[S, Hkv, D]`` -> ``[T, Hq, D]``."""
    t, hq, _ = q.shape
    s, hkv, _ = k.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(t):
        visible = s - t + i + 1
        for h in range(hq):
            kv_head = h // (hq // hkv)
            scores = k[:visible, kv_head].double() @ q[i, h].double() * scale  # [visible]
            out[i, h] = torch.softmax(scores, 0) @ v[:visible, kv_head].double()
    return out


@pytest.mark.parametrize(
    "tokens,chunk,q_heads,kv_heads,dim",
    [
        (37, 37, 4, 4, 16),  # one chunk: is_causal
        (37, 8, 4, 2, 16),  # chunks at offsets, GQA
        (64, 16, 9, 3, 64),  # SmolLM2's heads
        (50, 64, 6, 1, 32),  # chunk above the length
        (45, 7, 8, 2, 32),  # a short last chunk
    ],
)
def test_chunked_prefill_attention_equals_a_plain_softmax(tokens, chunk, q_heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(tokens * chunk + q_heads)
    q = torch.randn(tokens, q_heads, dim, generator=gen)
    k = torch.randn(tokens, kv_heads, dim, generator=gen)
    v = torch.randn(tokens, kv_heads, dim, generator=gen)
    scale = dim**-0.5
    got = torch.cat(
        [
            causal_attention(
                q[start : start + chunk], k[: start + chunk], v[: start + chunk], scale
            )
            for start in range(0, tokens, chunk)
        ]
    )
    assert got.shape == (tokens, q_heads, dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(q, k, v, scale), atol=1e-5, rtol=0)


def test_the_default_scale_is_one_over_sqrt_head_dim():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 2, 16, generator=gen) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v), causal_attention(q, k, v, 0.25))
    torch.testing.assert_close(
        causal_attention(q[4:], k, v).double(), reference(q[4:], k, v, 0.25), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("rows", [1, 3])
def test_the_last_rows_of_a_chunk_alone_see_every_earlier_key(rows):
    """The engine's last layer takes only the prompt's last row(s) on to the logits."""
    gen = torch.Generator().manual_seed(rows)
    q = torch.randn(rows, 9, 64, generator=gen)
    k, v = (torch.randn(300, 3, 64, generator=gen) for _ in range(2))
    torch.testing.assert_close(
        causal_attention(q, k, v).double(), reference(q, k, v, 64**-0.5), atol=1e-5, rtol=0
    )
