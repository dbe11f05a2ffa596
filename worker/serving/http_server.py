"""Runs an ASGI app (the OpenAI-compatible API) with uvicorn on a thread of the worker process.

The socket is bound and the TLS files are loaded before ``start`` returns, so a taken port or
a bad certificate fails the worker's start with a clear error instead of a dead thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from cache_service.security import SecurityConfig

log = logging.getLogger(__name__)


class HttpServer:
    """uvicorn serving ``app`` on ``host:port`` (0: a free port) from a daemon thread."""

    def __init__(self, app: Any, host: str, port: int, security: SecurityConfig) -> None:
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as err:
            self.socket.close()
            raise OSError(f"cannot listen on {host}:{port} for HTTP: {err}") from err
        self.socket.listen(2048)
        self.port: int = self.socket.getsockname()[1]
        tls = security.server_tls
        config = uvicorn.Config(
            app,
            log_config=None,  # the process's own logging
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            ssl_certfile=security.tls_cert if tls else None,
            ssl_keyfile=security.tls_key if tls else None,
        )
        config.load()  # reads the certificate now
        self.server = uvicorn.Server(config)
        self.tls = tls
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="http", daemon=True
        )

    def start(self, timeout: float = 30.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.socket.close()
                raise RuntimeError("the HTTP server did not start; see the log above")
            time.sleep(0.01)
        log.info("HTTP API on port %d (TLS %s)", self.port, "on" if self.tls else "off",
                 extra={"http_port": self.port})  # fmt: skip
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and the open connections (drain the calls first)."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self.socket.close()
