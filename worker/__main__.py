"""``python -m worker``: serve ``icecache.v1.Worker`` until SIGTERM or Ctrl-C.

Every flag falls back to an environment variable (``ICECACHE_<FIELD>``, e.g.
``ICECACHE_CACHE_SERVICES=cache-0:50061,cache-1:50062``), then to the default of
``WorkerConfig``. Auth and TLS (``--auth-token``, ``--tls-cert``/``--tls-key`` for this
server, ``--tls-ca`` for the replicas) are ``cache_service.security``'s flags.

SIGTERM (or Ctrl-C) drains: new calls are refused, in-flight ones get ``--grace-s`` seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from cache_service import process
from cache_service.types import POLICIES
from worker.serving.config import WorkerConfig


def _addresses(text: str) -> tuple[str, ...]:
    """``"a:1, b:2"`` -> ``("a:1", "b:2")``."""
    out = tuple(part.strip() for part in text.split(",") if part.strip())
    for address in out:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {address!r}")
    return out


def _optional(text: str) -> str | None:
    return text or None


_PARSERS: dict[str, Callable[[str], Any]] = {"cache_services": _addresses, "model": _optional}
_FLAGS = {"cache_services": ["--cache-service", "--cache-services"]}
_EXTRA: dict[str, dict[str, Any]] = {
    "cache_services": {"metavar": "HOST:PORT[,HOST:PORT...]"},
    "policy": {"choices": POLICIES},
    "log_format": {"choices": ("json", "text")},
}
_HELP = {
    "cache_services": "cache-service replicas, HOST:PORT[,HOST:PORT...]",
    "host": "interface to listen on (0.0.0.0 for all)",
    "port": "gRPC port (0: a free one, logged)",
    "model": "local HF checkpoint directory (default: the embedded SmolLM2)",
    "policy": "attention policy",
    "budget": "KV tokens per layer and KV head at a decode step",
    "dense_layers": "first layers attend fully",
    "device": "cpu, cuda or auto",
    "device_cache_mb": "device memory for resident KV pages (MiB)",
    "seed": "clustering seed",
    "max_batch": "sequences decoded together at most",
    "max_queue": "requests waiting for admission at most",
    "max_requests": "Generate calls served at once; more get RESOURCE_EXHAUSTED",
    "max_new_tokens": "largest max_new_tokens a request may ask for",
    "rpc_timeout_s": "deadline of each call to a replica; past it the replica counts as down",
    "workers": "RPC threads (one per in-flight Generate)",
    "metrics_port": "Prometheus /metrics HTTP port (0: off)",
    "health_interval_s": "seconds between health checks of each replica",
    "grace_s": "seconds in-flight requests get on SIGTERM",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "json or text",
}


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> WorkerConfig:
    """Flags, then ``ICECACHE_*`` environment variables, then defaults."""
    return process.parse_config(
        WorkerConfig,
        "python -m worker",
        __doc__,
        _HELP,
        argv,
        dict(os.environ) if env is None else env,
        parsers=_PARSERS,
        flags=_FLAGS,
        extra=_EXTRA,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    process.setup_logging(config.log_level, config.log_format)
    from worker.serving.server import serve

    return process.serve_until_signal(lambda: serve(config), config.grace_s)


if __name__ == "__main__":
    sys.exit(main())
