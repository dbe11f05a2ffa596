"""The GGUF converter against transformers' own conversion of the same file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from worker import gguf_convert
from worker.gguf_convert import convert_gguf
from worker.loader import CheckpointError, embedded_gguf_path

_SAME_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

# What a fresh machine has: the converter must run with `accelerate` absent.
_CONVERT_WITHOUT_ACCELERATE = """
import sys
from pathlib import Path
sys.modules["accelerate"] = None  # import accelerate now raises ImportError
from worker.gguf_convert import convert_gguf
from worker.loader import embedded_gguf_path
convert_gguf(embedded_gguf_path(), Path(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("ours") / "smollm2"
    subprocess.run(
        [sys.executable, "-c", _CONVERT_WITHOUT_ACCELERATE, str(target)],
        check=True,
        cwd=Path(__file__).parents[2],
    )
    return target


@pytest.fixture(scope="module")
def transformers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers' conversion of the embedded GGUF, saved as it saves any model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, target = embedded_gguf_path(), tmp_path_factory.mktemp("transformers")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # the weights are dequantized floats; this only blocks saving
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def test_weights_equal_transformers_to_the_bit(ours: Path, transformers_dir: Path) -> None:
    mine = load_file(ours / "model.safetensors")
    theirs = load_file(transformers_dir / "model.safetensors")
    assert sorted(mine) == sorted(theirs)
    assert len(mine) == 2 + 30 * 9  # embeddings, final norm, 9 tensors a layer; lm_head tied
    for name, tensor in theirs.items():
        assert mine[name].dtype == torch.float32, name
        assert torch.equal(mine[name], tensor), name


def test_config_tokenizer_and_chat_template_equal_transformers(
    ours: Path, transformers_dir: Path
) -> None:
    for name in _SAME_FILES:
        assert (ours / name).read_bytes() == (transformers_dir / name).read_bytes(), name
    config = json.loads((ours / "config.json").read_text())
    theirs = json.loads((transformers_dir / "config.json").read_text())
    assert theirs.pop("quantization_config")["quant_method"] == "gguf"
    assert config == theirs  # our weights are plain floats: no quantization_config
    assert config["dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]


def test_rope_rows_are_put_back_in_hf_order() -> None:
    # llama.cpp's convert_hf_to_gguf.py permutes each head's rows of HF's Q/K as below; the
    # converter must invert it exactly.
    heads, dim, columns = 3, 8, 5
    hf = np.arange(heads * dim * columns, dtype=np.float32).reshape(heads * dim, columns)
    llama_cpp = hf.reshape(heads, 2, dim // 2, columns).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(llama_cpp, hf)
    np.testing.assert_array_equal(gguf_convert._unpermute_rope_rows(llama_cpp, heads), hf)


def test_a_file_that_is_not_gguf_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file" * 100)
    target = tmp_path / "cache" / "model"
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        convert_gguf(bad, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_another_architecture_is_refused_by_name(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="holds a 'gpt2' model; only llama"):
        convert_gguf(path, tmp_path / "model")
    assert not (tmp_path / "model").exists()
