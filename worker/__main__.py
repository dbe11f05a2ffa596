"""``python -m worker``: serve ``icecache.v1.Worker`` until SIGTERM or Ctrl-C.

Every flag falls back to an environment variable (``ICECACHE_<FIELD>``, e.g.
``ICECACHE_CACHE_SERVICES=cache-0:50061,cache-1:50062``), then to the default of
``WorkerConfig`` (and of the ``LoadConfig``, ``EngineConfig`` and ``SecurityConfig`` inside
it), where each setting and its help are declared. Auth and TLS: ``--auth-token``,
``--tls-cert``/``--tls-key`` for this server, ``--tls-ca`` for the replicas.

SIGTERM (or Ctrl-C) drains: new calls are refused, in-flight ones get ``--grace-s`` seconds.
"""

from __future__ import annotations

import os
import sys

from cache_service import logs, process
from worker.serving.config import OFFLINE_SETTINGS, WorkerConfig


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> WorkerConfig:
    """Flags, then ``ICECACHE_*`` environment variables, then defaults."""
    return process.parse_config(
        WorkerConfig,
        "python -m worker",
        __doc__,
        argv,
        dict(os.environ) if env is None else env,
        skip=OFFLINE_SETTINGS,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logs.setup_logging(config.log)
    from worker.serving.server import serve

    return process.serve_until_signal(lambda: serve(config), config.grace_s)


if __name__ == "__main__":
    sys.exit(main())
