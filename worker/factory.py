"""Building an engine from user-facing settings: model, KV store, policy."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

from cache_service.settings import setting
from worker.engine import Engine, EngineConfig
from worker.kv_client import KVClient, LocalKVClient
from worker.loader import load_model
from worker.model import LlamaModel
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_STORE_MB = 8192
"""Memory ceiling of the in-process store (pages and the indexes' own memory; the OS backs
only the pages actually written): a 32k-token ``icecache`` sequence of the embedded model
takes several GB of it."""


@dataclass(frozen=True)
class LoadConfig:
    """Which model to run, and on which device."""

    model: str | None = setting(
        None, "Local HF checkpoint directory; none: the embedded SmolLM2-135M-Instruct."
    )
    device: str = setting("auto", "cpu, cuda or auto (CUDA when present).")


def load(config: LoadConfig) -> tuple[LlamaModel, Tokenizer]:
    """The model and its tokenizer, in bfloat16 on CUDA and float32 on CPU."""
    device = pick_device(config.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_model(config.model, dtype=dtype, device=device)


def open_kv(model: LlamaModel, cache_service: str | None = None, page_size: int = 16) -> KVClient:
    """The in-process store, or a client of the cache service at ``cache_service`` (holding a
    lease, so that the service releases this process's sequences if it dies)."""
    if cache_service:
        from worker.kv.remote import RemoteKVClient

        holder = f"{socket.gethostname()}-{os.getpid()}"
        return RemoteKVClient.connect(cache_service, holder=holder)
    return open_local(model, page_size)


def open_local(model: LlamaModel, page_size: int = 16) -> LocalKVClient:
    """An in-process store of ``DEFAULT_STORE_MB`` for ``model``'s heads."""
    return LocalKVClient.with_capacity(DEFAULT_STORE_MB * 2**20, page_size, model.config.head_dim)


def pick_device(name: str = "auto") -> str:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_engine(
    config: EngineConfig,
    source: LoadConfig | None = None,
    cache_service: str | None = None,
    loaded: tuple[LlamaModel, Tokenizer] | None = None,
    kv: KVClient | None = None,
) -> tuple[Engine, Tokenizer]:
    """Load (or reuse) a model and wire it to a KV store under ``config``: ``kv``, else the
    cache service at ``cache_service``, else an in-process store (``open_kv``)."""
    model, tokenizer = loaded or load(source or LoadConfig())
    return Engine(model, kv or open_kv(model, cache_service), config), tokenizer
