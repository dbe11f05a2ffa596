"""What every IceCache server process shares: its config from flags and env, and its life
until a signal (its logs: ``cache_service.logs``).

Both ``python -m cache_service`` and ``python -m worker`` describe their settings as a
dataclass (``cache_service.settings``) whose fields are flags (``--max-memory``) and
environment variables (``ICECACHE_MAX_MEMORY``): flag over env over default, auth and TLS
(``SecurityConfig``, nested in both) included.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Collection, Mapping
from types import FrameType
from typing import Any, Protocol, TypeVar

from cache_service import settings

log = logging.getLogger(__name__)

Config = TypeVar("Config")


def parse_config(
    cls: type[Config],
    prog: str,
    description: str | None,
    argv: list[str] | None,
    env: Mapping[str, str],
    skip: Collection[str] = (),
) -> Config:
    """``cls`` from flags, then ``ICECACHE_<NAME>`` variables in ``env``, then defaults (every
    flag, its variable and its help come from ``cls``'s settings; see ``settings``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    settings.add_arguments(parser, cls, env, skip)
    args = parser.parse_args(argv)
    try:
        return settings.from_args(cls, args, skip)
    except ValueError as err:
        parser.error(str(err))


class Stoppable(Protocol):
    def stop(self, grace_s: float) -> Any: ...


def serve_until_signal(start: Callable[[], Stoppable], grace_s: float) -> int:
    """Start a server, wait for SIGTERM or SIGINT, then stop it with ``grace_s`` to drain."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service = start()
    try:
        # Wake now and then: Python runs a signal's handler in the main thread only, and a
        # blocking wait there is not interrupted when the OS hands the signal to another
        # of this process's threads (gRPC's, the decode loop, a decode stream's).
        while not stopping.wait(0.2):
            pass
    finally:
        service.stop(grace_s)
    return 0
