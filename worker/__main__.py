"""``python -m worker``: serve ``icecache.v1.Worker`` until SIGTERM or Ctrl-C.

Every flag falls back to an environment variable (``ICECACHE_<FIELD>``, e.g.
``ICECACHE_CACHE_SERVICES=cache-0:50061,cache-1:50062``), then to the default of
``WorkerConfig``. Auth and TLS (``--auth-token``, ``--tls-cert``/``--tls-key`` for this
server, ``--tls-ca`` for the replicas) are ``cache_service.security``'s flags.

SIGTERM (or Ctrl-C) drains: new calls are refused, in-flight ones get ``--grace-s`` seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from types import FrameType
from typing import Any

from cache_service.__main__ import JsonFormatter
from cache_service.security import add_security_flags, security_from_args
from cache_service.types import POLICIES
from worker.service import WorkerConfig

log = logging.getLogger("worker")


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
    env = dict(os.environ) if env is None else env
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    for f in fields(WorkerConfig):
        if f.name == "security":
            continue
        convert = _PARSERS.get(f.name) or {"int": int, "float": float}.get(str(f.type), str)
        variable = f"ICECACHE_{f.name.upper()}"
        default = convert(env[variable]) if variable in env else f.default
        flags = _FLAGS.get(f.name, ["--" + f.name.replace("_", "-")])
        shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        parser.add_argument(
            *flags,
            dest=f.name,
            type=convert,
            default=default,
            help=f"{_HELP[f.name]} [env {variable}; default {shown}]",
            **_EXTRA.get(f.name, {}),
        )
    add_security_flags(parser, env)
    args = parser.parse_args(argv)
    try:
        auth = security_from_args(args)
        names = [f.name for f in fields(WorkerConfig) if f.name != "security"]
        return WorkerConfig(**{name: getattr(args, name) for name in names}, security=auth)
    except ValueError as err:
        parser.error(str(err))


def setup_logging(config: WorkerConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(config)
    from worker.service import serve

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service = serve(config)
    try:
        stopping.wait()
    finally:
        service.stop(config.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
