"""Configuration of the cache-service process (parsed from flags and env in ``__main__``)."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import numpy as np

from cache_service.logs import LogConfig
from cache_service.page_pool import DTYPES
from cache_service.security import SecurityConfig
from cache_service.settings import nested, setting
from cache_service.types import kv_bytes

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512M"``, ``"4GiB"`` or ``"2g"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 4G, 512M or 1073741824")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


@dataclass(frozen=True)
class CacheServiceConfig:
    """Everything one cache-service process needs to start."""

    host: str = setting("127.0.0.1", "Interface to listen on (0.0.0.0 or [::] for all).")
    port: int = setting(50061, "gRPC port; 0 picks a free one (logged at start).")
    max_memory: int = setting(
        2 * 2**30,
        "Ceiling on bytes of K/V page data and the indexes' own memory, e.g. 4G or 512M: the "
        "pool holds max_memory // page_bytes pages (the OS backs only pages actually "
        "written), and as many free pages as the indexes' key copies, sums and maps take "
        "are held back. A request that needs more pages than that leaves fails with "
        "RESOURCE_EXHAUSTED naming this limit; nothing of a sequence is evicted (only prompt "
        "blocks kept for reuse that no sequence uses, with their indexes).",
        parse=_size,
    )
    max_sequences: int = setting(
        0, "Most sequences held at once (0: no limit); a Create beyond it is RESOURCE_EXHAUSTED."
    )
    prefix_cache: bool = setting(
        True,
        "Keep prefilled prompts' leading blocks so that later prompts beginning with them "
        "skip their prefill (shared by reference, dropped least recently used when the pool "
        "needs room).",
    )
    page_size: int = setting(16, "Tokens per page.")
    head_dim: int = setting(
        64, "Dimension of one key or value vector; must match the model of the workers."
    )
    dtype: str = setting("float32", "Element type of stored K/V.", choices=tuple(DTYPES))
    shared_memory: bool = setting(
        True, "Keep page data in a POSIX shared-memory segment that same-host workers map."
    )
    local_streams: bool = setting(
        True,
        "Offer same-host clients decode streams on a Unix socket (OpenLocalStream), which "
        "cost less per message than gRPC's; needs shared_memory.",
    )
    metrics_port: int = setting(0, "HTTP port of the Prometheus /metrics endpoint; 0 turns it off.")
    workers: int = setting(4, "Threads serving unary RPCs.")
    max_streams: int = setting(
        32,
        "Most decode streams open at once (DecodeStream calls and local streams together); "
        "each holds a thread of its own while open (on top of workers). One more is refused "
        "and its client falls back to Decode (0: no streams).",
    )
    grace_s: float = setting(
        5.0, "On SIGTERM, seconds in-flight RPCs get to finish before the server stops."
    )
    lease_ttl_s: float = setting(
        10.0,
        "A worker's lease expires when nothing renews it (a call or its heartbeat) for this "
        "long; later calls on it fail, and its sequences are released after lease_grace_s.",
    )
    lease_grace_s: float = setting(
        30.0,
        "Seconds an expired lease's sequences are kept (for another worker to take over) "
        "before they are released.",
    )
    log: LogConfig = nested(LogConfig)
    security: SecurityConfig = nested(SecurityConfig)
    """Token auth and TLS (``cache_service.security``); off by default."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError(f"ports must be in 0..65535, got {self.port}, {self.metrics_port}")
        if self.max_sequences < 0:
            raise ValueError(f"max_sequences must be >= 0 (0: no limit), got {self.max_sequences}")
        if self.page_size <= 0 or self.head_dim <= 0 or self.workers <= 0:
            raise ValueError("page_size, head_dim and workers must be positive")
        if self.max_streams < 0:
            raise ValueError(f"max_streams must be >= 0 (0: no streams), got {self.max_streams}")
        if not self.lease_ttl_s > 0 or not self.lease_grace_s >= 0:
            raise ValueError(
                f"lease_ttl_s must be > 0 and lease_grace_s >= 0, got {self.lease_ttl_s}, "
                f"{self.lease_grace_s}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.num_pages < 1:
            raise ValueError(
                f"max_memory {self.max_memory} holds no page of {self.page_bytes} bytes; raise it"
            )

    @property
    def page_bytes(self) -> int:
        """Bytes of K and V in one page."""
        return kv_bytes(self.page_size, self.head_dim, np.dtype(DTYPES[self.dtype]).itemsize)

    @property
    def num_pages(self) -> int:
        """Pages that fit in ``max_memory``."""
        return self.max_memory // self.page_bytes
