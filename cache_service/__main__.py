"""``python -m cache_service``: run a cache service until SIGTERM or Ctrl-C.

Every flag falls back to an environment variable (``ICECACHE_<FLAG>``, e.g. ``ICECACHE_PORT``),
then to the default of ``CacheServiceConfig``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from cache_service import process
from cache_service.config import CacheServiceConfig, parse_bytes


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_PARSERS: dict[str, Callable[[str], Any]] = {
    "max_memory": _size,
    "shared_memory": _bool,
    "local_streams": _bool,
}
_HELP = {
    "host": "interface to listen on (0.0.0.0 for all)",
    "port": "gRPC port (0: a free one, logged)",
    "max_memory": "ceiling on K/V page bytes, e.g. 4G or 512M (RESOURCE_EXHAUSTED beyond it)",
    "max_sequences": "most sequences held at once (0: no limit)",
    "page_size": "tokens per page",
    "head_dim": "key/value dimension of the served model",
    "dtype": "stored K/V type: float32 or float16",
    "shared_memory": "keep pages in POSIX shared memory for same-host workers (true/false)",
    "local_streams": "decode streams on a Unix socket for same-host workers (true/false)",
    "metrics_port": "Prometheus /metrics HTTP port (0: off)",
    "workers": "threads serving unary RPCs",
    "max_streams": "most decode streams open at once, gRPC and local (0: none; clients use Decode)",
    "grace_s": "seconds in-flight RPCs get on SIGTERM",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "json or text",
}


def parse_config(
    argv: list[str] | None = None, env: dict[str, str] | None = None
) -> CacheServiceConfig:
    """Flags, then ``ICECACHE_*`` environment variables, then defaults."""
    return process.parse_config(
        CacheServiceConfig,
        "python -m cache_service",
        __doc__,
        _HELP,
        argv,
        dict(os.environ) if env is None else env,
        parsers=_PARSERS,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    process.setup_logging(config.log_level, config.log_format)
    from cache_service.server import serve  # after logging: the stubs may be generated

    return process.serve_until_signal(lambda: serve(config), config.grace_s)


if __name__ == "__main__":
    sys.exit(main())
