"""Session fixtures shared by every test package: the embedded SmolLM2, tiny random models."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.loader import embedded_checkpoint_dir, load_model
from worker.model import LlamaModel
from worker.tokenizer import Tokenizer

TINY_ARCH: dict[str, Any] = {
    "vocab_size": 49152,  # SmolLM2's tokenizer, so real text can be fed to tiny models
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """HF checkpoint directory of the embedded SmolLM2-135M-Instruct (converted on first use)."""
    return embedded_checkpoint_dir()


@pytest.fixture(scope="session")
def smollm(smollm_dir: Path) -> tuple[LlamaModel, Tokenizer]:
    """The embedded SmolLM2-135M-Instruct in float32 on CPU, with its tokenizer."""
    return load_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Callable[..., Path]:
    """Factory of random-weight HF checkpoint directories of tiny models (2 layers, hidden 64).

    ``tiny_checkpoint(model_type="llama", seed=0, max_shard_size=None, **config)`` saves a
    transformers model (``model_type`` in llama / mistral / qwen2; ``config`` overrides
    ``TINY_ARCH``) with every weight random (biases and norms too), plus SmolLM2's
    tokenizer files, and returns the directory.
    """

    def make(
        model_type: str = "llama",
        seed: int = 0,
        max_shard_size: str | None = None,
        **config: Any,
    ) -> Path:
        path = tmp_path_factory.mktemp(f"tiny-{model_type}")
        model = _random_hf_model(model_type, seed, {**TINY_ARCH, **config})
        model.save_pretrained(
            path, **({"max_shard_size": max_shard_size} if max_shard_size else {})
        )
        for name in _TOKENIZER_FILES:
            shutil.copy(smollm_dir / name, path / name)
        return path

    return make


def _random_hf_model(model_type: str, seed: int, config: dict[str, Any]) -> Any:
    """A transformers causal LM with N(0, 0.15) weights (norm weights around 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model
