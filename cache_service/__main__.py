"""``python -m cache_service``: run a cache service until SIGTERM or Ctrl-C.

Every flag falls back to an environment variable (``ICECACHE_<FLAG>``, e.g. ``ICECACHE_PORT``),
then to the default of ``CacheServiceConfig``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from types import FrameType
from typing import Any

from cache_service.config import CacheServiceConfig, parse_bytes
from cache_service.security import add_security_flags, security_from_args

log = logging.getLogger("cache_service")

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


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


_PARSERS: dict[str, Callable[[str], Any]] = {"max_memory": _size, "shared_memory": _bool}
_HELP = {
    "host": "interface to listen on (0.0.0.0 for all)",
    "port": "gRPC port (0: a free one, logged)",
    "max_memory": "ceiling on K/V page bytes, e.g. 4G or 512M (RESOURCE_EXHAUSTED beyond it)",
    "max_sequences": "most sequences held at once (0: no limit)",
    "page_size": "tokens per page",
    "head_dim": "key/value dimension of the served model",
    "dtype": "stored K/V type: float32 or float16",
    "shared_memory": "keep pages in POSIX shared memory for same-host workers (true/false)",
    "metrics_port": "Prometheus /metrics HTTP port (0: off)",
    "workers": "RPC threads",
    "grace_s": "seconds in-flight RPCs get on SIGTERM",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "json or text",
}


def parse_config(
    argv: list[str] | None = None, env: dict[str, str] | None = None
) -> CacheServiceConfig:
    """Flags, then ``ICECACHE_*`` environment variables, then defaults."""
    env = dict(os.environ) if env is None else env
    parser = argparse.ArgumentParser(prog="python -m cache_service", description=__doc__)
    for f in fields(CacheServiceConfig):
        if f.name == "security":
            continue
        convert = _PARSERS.get(f.name) or {"int": int, "float": float}.get(str(f.type), str)
        variable = f"ICECACHE_{f.name.upper()}"
        default = convert(env[variable]) if variable in env else f.default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=convert,
            default=default,
            help=f"{_HELP[f.name]} [env {variable}; default {f.default}]",
        )
    add_security_flags(parser, env)
    args = parser.parse_args(argv)
    try:
        security = security_from_args(args)
        names = [f.name for f in fields(CacheServiceConfig) if f.name != "security"]
        settings = {name: getattr(args, name) for name in names}
        return CacheServiceConfig(**settings, security=security)
    except ValueError as err:
        parser.error(str(err))


def setup_logging(config: CacheServiceConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(config)
    from cache_service.server import serve  # after logging: the stubs may be generated

    service = serve(config)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stopping.wait()
    finally:
        service.stop(config.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
