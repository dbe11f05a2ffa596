"""LlamaModel against transformers: same weights, same logits (dense and piecewise)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from worker.loader import load_model
from worker.model import CheckpointError, LlamaModel, ModelConfig, causal_attention, rope_inv_freq
from worker.tokenizer import Tokenizer

ATOL = 1e-4
DECODE_STEPS = 8
KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [S, Hkv, D]
Loaded = tuple[LlamaModel, Tokenizer]
Reference = tuple[list[int], torch.Tensor]  # ids [T], transformers logits [T, vocab]

LLAMA31_8B: dict[str, Any] = {  # the architecture fields of Llama-3.1-8B-Instruct's config.json
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """transformers' own float32 logits ``[T, vocab]`` for one sequence."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def text_ids(tokenizer: Tokenizer, tokens: int) -> list[int]:
    """The first ``tokens`` ids of real English text (Python's docs)."""
    ids = tokenizer.encode(topics["assert"] + topics["assignment"])
    assert len(ids) >= tokens
    return ids[:tokens]


def step(
    model: LlamaModel, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Feed the next tokens of one sequence through the split forward; grow ``cache``.

    token_ids, positions ``[T]`` -> logits ``[T, vocab]``.
    """
    h = model.embed(token_ids)  # [T, hidden]
    for layer in range(model.config.num_layers):
        q, k, v = model.attention_inputs(layer, h, positions)  # [T, Hq, D], [T, Hkv, D] x2
        if len(cache) == layer:
            cache.append((k[:0], v[:0]))
        keys, values = (torch.cat(pair) for pair in zip(cache[layer], (k, v), strict=True))
        cache[layer] = (keys, values)  # [S, Hkv, D]
        h = model.attention_output(layer, h, causal_attention(q, keys, values))
    return model.logits(h)


def prefill_then_decode(model: LlamaModel, ids: list[int], steps: int) -> torch.Tensor:
    """Logits ``[steps + 1, vocab]`` of the last ``steps + 1`` positions: prefill, then 1 by 1."""
    tokens = torch.tensor(ids)
    prefill = len(ids) - steps
    cache: KVCache = []
    out = [step(model, cache, tokens[:prefill], torch.arange(prefill))[-1:]]
    for pos in range(prefill, len(ids)):
        out.append(step(model, cache, tokens[pos : pos + 1], torch.tensor([pos])))
    return torch.cat(out)


@pytest.fixture(scope="module")
def smollm_reference(smollm: Loaded, smollm_dir: Path) -> Reference:
    """64 ids of real text and transformers' logits ``[64, vocab]`` for them."""
    ids = text_ids(smollm[1], 64)
    return ids, hf_logits(smollm_dir, ids)


@torch.no_grad()
def test_smollm_dense_forward_matches_transformers(
    smollm: Loaded, smollm_reference: Reference
) -> None:
    model, (ids, expected) = smollm[0], smollm_reference
    ours = model.dense_forward(torch.tensor(ids))
    assert ours.dtype == torch.float32 and ours.shape == (len(ids), model.config.vocab_size)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_smollm_prefill_then_decode_matches_transformers(
    smollm: Loaded, smollm_reference: Reference
) -> None:
    model, (ids, expected) = smollm[0], smollm_reference
    ours = prefill_then_decode(model, ids, DECODE_STEPS)  # causal: equals the full forward
    torch.testing.assert_close(ours, expected[-DECODE_STEPS - 1 :], atol=ATOL, rtol=0)


@torch.no_grad()
def test_decode_batch_mixes_sequences(smollm: Loaded, smollm_reference: Reference) -> None:
    """One decode step batched over two sequences of different lengths (positions per row)."""
    model, ids = smollm[0], smollm_reference[0]
    seqs = [ids[:24], ids[24:40]]
    caches: list[KVCache] = [[], []]
    for seq, cache in zip(seqs, caches, strict=True):
        step(model, cache, torch.tensor(seq[:-1]), torch.arange(len(seq) - 1))
    h = model.embed(torch.tensor([seq[-1] for seq in seqs]))  # [2, hidden]
    positions = torch.tensor([len(seq) - 1 for seq in seqs])  # [2]
    for layer in range(model.config.num_layers):
        q, k, v = model.attention_inputs(layer, h, positions)  # [2, Hq, D], [2, Hkv, D] x2
        attn = [
            causal_attention(
                q[i : i + 1], torch.cat((kc, k[i : i + 1])), torch.cat((vc, v[i : i + 1]))
            )
            for i, (kc, vc) in enumerate(cache[layer] for cache in caches)
        ]
        h = model.attention_output(layer, h, torch.cat(attn))
    expected = torch.stack([model.dense_forward(torch.tensor(seq))[-1] for seq in seqs])
    torch.testing.assert_close(model.logits(h), expected, atol=ATOL, rtol=0)


TINY_CASES: dict[str, dict[str, Any]] = {
    "llama3-rope-untied": dict(
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-attention-and-mlp-bias": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "qwen2-qkv-bias-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "mistral-sharded": dict(model_type="mistral", sliding_window=None, max_shard_size="1MB"),
}


@pytest.mark.parametrize("case", TINY_CASES)
@torch.no_grad()
def test_tiny_models_match_transformers(tiny_checkpoint: Callable[..., Path], case: str) -> None:
    path = tiny_checkpoint(**TINY_CASES[case])
    model, tokenizer = load_model(path)
    ids = text_ids(tokenizer, 40)
    expected = hf_logits(path, ids)
    torch.testing.assert_close(model.dense_forward(torch.tensor(ids)), expected, atol=ATOL, rtol=0)
    ours = prefill_then_decode(model, ids, DECODE_STEPS)
    torch.testing.assert_close(ours, expected[-DECODE_STEPS - 1 :], atol=ATOL, rtol=0)


def test_sharded_checkpoint_has_an_index(tiny_checkpoint: Callable[..., Path]) -> None:
    path = tiny_checkpoint(model_type="mistral", sliding_window=None, max_shard_size="1MB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_stays_close_to_float32(
    tiny_checkpoint: Callable[..., Path], dtype: torch.dtype
) -> None:
    path = tiny_checkpoint(model_type="qwen2")
    ids = torch.arange(100, 132)
    reference = load_model(path)[0].dense_forward(ids)
    model = load_model(path, dtype=dtype)[0]
    assert all(p.dtype == dtype for p in model.parameters())
    logits = model.dense_forward(ids)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_llama31_inv_freq_equals_transformers() -> None:
    ours = rope_inv_freq(ModelConfig.from_hf_config(LLAMA31_8B))
    hf_config = LlamaConfig(**{k: v for k, v in LLAMA31_8B.items() if k != "model_type"})
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, device="cpu")
    assert attention_factor == 1.0
    assert torch.equal(ours, expected)


def test_rope_parameters_and_rope_scaling_keys_agree() -> None:
    legacy = ModelConfig.from_hf_config(LLAMA31_8B)
    params = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    v5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    assert ModelConfig.from_hf_config({**v5, "rope_parameters": params}) == legacy
    assert legacy.rope_theta == 500000.0 and legacy.rope_scaling is not None
    assert legacy.rope_scaling.original_max_position_embeddings == 8192


def test_config_defaults_head_dim_and_bias_flags() -> None:
    config = ModelConfig.from_hf_config(LLAMA31_8B)
    assert (config.head_dim, config.num_kv_heads) == (128, 8)
    assert not (config.qkv_bias or config.o_bias or config.mlp_bias or config.tie_word_embeddings)
    qwen = ModelConfig.from_hf_config({**LLAMA31_8B, "model_type": "qwen2", "rope_scaling": None})
    assert qwen.qkv_bias and not qwen.o_bias and qwen.rope_scaling is None
    llama_bias = ModelConfig.from_hf_config({**LLAMA31_8B, "attention_bias": True})
    assert llama_bias.qkv_bias and llama_bias.o_bias


def test_unsupported_rope_type_is_named() -> None:
    hf = {**LLAMA31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(CheckpointError, match="yarn"):
        ModelConfig.from_hf_config(hf)


def test_missing_config_field_is_named() -> None:
    hf = {k: v for k, v in LLAMA31_8B.items() if k != "intermediate_size"}
    with pytest.raises(CheckpointError, match="intermediate_size"):
        ModelConfig.from_hf_config(hf)
