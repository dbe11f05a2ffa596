"""Convert a llama-architecture GGUF file into an HF checkpoint directory (float32 safetensors).

The weights are dequantized here with the ``gguf`` package, so the first start needs neither
transformers' model classes nor ``accelerate``. transformers still writes ``config.json`` and
the tokenizer files from the GGUF metadata (it reads no tensors for that), so they are exactly
what ``AutoModelForCausalLM``/``AutoTokenizer`` would save (config.json, generation_config.json,
tokenizer.json, tokenizer_config.json, chat_template.jinja).

llama.cpp stores ``attn_q``/``attn_k`` with the rows of each head interleaved for its RoPE
layout; we undo that permutation as transformers does (``LlamaTensorProcessor``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from safetensors.torch import save_file

from worker.model import CheckpointError

__all__ = ["convert_gguf"]

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> HF name; ``{}`` is the layer number.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into an HF checkpoint directory ``target`` (float32 safetensors).

    Written to a temporary sibling directory and renamed, so ``target`` is either complete
    or absent. If another process finishes first, its result is kept.
    """
    logger.info("converting %s into %s (once; about 40 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        reader = _open(gguf)  # a clear error before transformers sees a bad file
        config = _save_config_and_tokenizer(gguf, tmp)
        save_file(_state_dict(reader, config), tmp / "model.safetensors", {"format": "pt"})
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        _rename_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _state_dict(reader: GGUFReader, config: dict[str, int]) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors of a llama GGUF file, Q/K rows in HF order."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        weights = dequantize(tensor.data, tensor.tensor_type)
        if name.endswith("self_attn.q_proj.weight"):
            weights = _unpermute_rope_rows(weights, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weights = _unpermute_rope_rows(weights, kv_heads)
        state[name] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C"))
    return state


def _open(gguf: Path) -> GGUFReader:
    """A reader of ``gguf``, or a CheckpointError naming what is wrong with the file."""
    try:
        reader = GGUFReader(gguf)
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{gguf} is not a readable GGUF file: {error}") from error
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field else "unknown"
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{gguf} holds a {architecture!r} model; only {', '.join(SUPPORTED_ARCHITECTURES)} "
            "GGUF files convert here (give any other model as an HF checkpoint directory)"
        )
    return reader


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no place in a llama checkpoint")


def _unpermute_rope_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of a Q or K projection ``[heads * dim, in]``.

    llama.cpp writes each head's rows as (pair, half) -> (half, pair); HF keeps the halves
    apart: rows ``[0, dim/2)`` rotate with rows ``[dim/2, dim)``.
    """
    half = weights.shape[0] // heads // 2
    rows = weights.reshape(heads, half, 2, *weights.shape[1:])
    return rows.swapaxes(2, 1).reshape(weights.shape)


def _save_config_and_tokenizer(gguf: Path, directory: Path) -> dict[str, int]:
    """Write config.json and the tokenizer files from the GGUF metadata; returns the config."""
    from transformers import (  # heavy; reads metadata, no tensors
        AutoConfig,
        AutoTokenizer,
        GenerationConfig,
    )

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32  # what the safetensors hold
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)
    saved: dict[str, int] = json.loads((directory / "config.json").read_text())
    return saved


def _rename_into_place(tmp: Path, target: Path) -> None:
    """Atomically move a finished directory to ``target`` unless another process won."""
    try:
        tmp.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("%s was created concurrently; keeping it", target)
