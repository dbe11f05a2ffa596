"""Building an engine from user-facing settings: model, KV store, policy."""

from __future__ import annotations

import logging

import torch

from worker.engine import Engine, EngineConfig
from worker.kv_client import KVClient, LocalKVClient
from worker.loader import load_model
from worker.model import LlamaModel
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_STORE_MB = 4096
"""Pool size of the in-process store; the OS backs only the pages actually written."""


def open_kv(model: LlamaModel, cache_service: str | None = None, page_size: int = 16) -> KVClient:
    """The in-process store, or a client of the cache service at ``cache_service``."""
    if cache_service:
        from worker.kv.remote import RemoteKVClient

        return RemoteKVClient.connect(cache_service)
    return LocalKVClient.with_capacity(DEFAULT_STORE_MB * 2**20, page_size, model.config.head_dim)


def pick_device(name: str = "auto") -> str:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_engine(
    config: EngineConfig,
    model_path: str | None = None,
    cache_service: str | None = None,
    device: str = "auto",
    loaded: tuple[LlamaModel, Tokenizer] | None = None,
) -> tuple[Engine, Tokenizer]:
    """Load (or reuse) a model and wire it to a KV store under ``config``."""
    device = pick_device(device)
    if loaded is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        loaded = load_model(model_path, dtype=dtype, device=device)
    model, tokenizer = loaded
    return Engine(model, open_kv(model, cache_service), config), tokenizer
