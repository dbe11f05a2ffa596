"""``python -m cache_service``: run a cache service until SIGTERM or Ctrl-C.

Every flag falls back to an environment variable (``ICECACHE_<FLAG>``, e.g. ``ICECACHE_PORT``),
then to the default of ``CacheServiceConfig``, where each setting and its help are declared.
"""

from __future__ import annotations

import os
import sys

from cache_service import logs, process
from cache_service.config import CacheServiceConfig


def parse_config(
    argv: list[str] | None = None, env: dict[str, str] | None = None
) -> CacheServiceConfig:
    """Flags, then ``ICECACHE_*`` environment variables, then defaults."""
    return process.parse_config(
        CacheServiceConfig,
        "python -m cache_service",
        __doc__,
        argv,
        dict(os.environ) if env is None else env,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logs.setup_logging(config.log)
    from cache_service.server import serve  # after logging: the stubs may be generated

    return process.serve_until_signal(lambda: serve(config), config.grace_s)


if __name__ == "__main__":
    sys.exit(main())
