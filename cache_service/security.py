"""Optional shared-secret token auth and TLS for the gRPC services (cache service and worker).

Both are off by default and configured by flags or environment (``SecurityConfig``):

- **Token.** With ``--auth-token`` (or ``ICECACHE_AUTH_TOKEN``, or ``--auth-token-file``) a
  server refuses every call whose metadata lacks ``authorization: Bearer <token>`` with
  ``UNAUTHENTICATED``. The standard health check (``grpc.health.v1.Health``) stays open so
  that load balancers and ``grpc_health_probe`` work without the secret; it reveals only
  SERVING / NOT_SERVING. Reflection and every other method need the token. Clients attach the
  token through a channel interceptor, so it works on plaintext and TLS channels alike.
- **TLS.** A server with ``--tls-cert`` and ``--tls-key`` (PEM files) listens with TLS only.
  A client with ``--tls-ca`` (the PEM of the CA that signed the server's certificate, or the
  self-signed certificate itself) connects with TLS and verifies the server against it;
  ``--tls-server-name`` overrides the name checked when the address is not in the
  certificate. Without TLS a token travels in clear text: use both off loopback.

Use from a server::

    server = grpc.server(pool, interceptors=server_interceptors(cfg), options=...)
    port = add_port(server, "0.0.0.0:50061", cfg)

and from a client::

    channel = make_channel("host:50061", cfg, options=...)
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cache_service import settings
from cache_service.settings import setting

log = logging.getLogger(__name__)

AUTH_KEY = "authorization"
"""gRPC metadata key carrying ``Bearer <token>``."""
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
"""Methods a token-protected server still answers without a token."""


@dataclass(frozen=True)
class SecurityConfig:
    """Auth and TLS settings of one process, for its server side and its client side."""

    auth_token: str = setting(
        "",
        "Shared secret; empty: no token auth. Servers demand it, clients send it (prefer the "
        "env variable or --auth-token-file: a flag shows in ps).",
    )
    auth_token_file: str = setting(
        "",
        "File holding the token (surrounding whitespace stripped); wins over --auth-token. "
        "Keeps the secret out of ps output and fits mounted secrets.",
    )
    tls_cert: str = setting(
        "", "Server: PEM certificate chain; with --tls-key the server listens with TLS only."
    )
    tls_key: str = setting("", "Server: PEM private key of --tls-cert.")
    tls_ca: str = setting(
        "",
        "Client: PEM of the CA (or self-signed certificate) that the server must present; "
        "set, the client connects with TLS.",
    )
    tls_server_name: str = setting(
        "", "Client: name to verify in the server certificate instead of the address's host."
    )

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key (PEM files), or neither")
        for name in ("auth_token_file", "tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {path!r} is not a readable file; fix the path")
        if self.auth_token_file and not self.token:
            raise ValueError(f"--auth-token-file {self.auth_token_file!r} is empty")

    @property
    def token(self) -> str:
        """The token in effect ('' when auth is off)."""
        if self.auth_token_file:
            return Path(self.auth_token_file).read_text().strip()
        return self.auth_token

    @property
    def server_tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def client_tls(self) -> bool:
        return bool(self.tls_ca)


def security_from_env(env: Mapping[str, str] | None = None) -> SecurityConfig:
    """The ``SecurityConfig`` of ``ICECACHE_*`` environment variables alone."""
    parser = argparse.ArgumentParser(add_help=False)
    settings.add_arguments(parser, SecurityConfig, os.environ if env is None else env)
    return settings.from_args(SecurityConfig, parser.parse_args([]))


# ---- server side -----------------------------------------------------------------------------
def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # no deserializer: an unauthenticated caller's bytes are never parsed
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (``OPEN_METHODS`` excepted)."""

    def __init__(self, token: str, open_methods: frozenset[str] = OPEN_METHODS) -> None:
        if not token:
            raise ValueError("TokenAuthInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()
        self.open_methods = open_methods

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method in self.open_methods:
            return continuation(handler_call_details)
        sent = [
            value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == AUTH_KEY
        ]
        if len(sent) == 1:
            value = sent[0].encode() if isinstance(sent[0], str) else sent[0]
            if hmac.compare_digest(value, self._expected):
                return continuation(handler_call_details)
            reason = "wrong token in the authorization metadata"
        elif not sent:
            reason = "missing authorization metadata"
        else:
            reason = "more than one authorization metadata entry"
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        log.warning("refused %s: %s", method, reason, extra={"method": method})
        return _deny(
            handler,
            f"{reason}: send 'authorization: Bearer <token>' with the server's shared "
            "secret (set ICECACHE_AUTH_TOKEN or --auth-token on the client)",
        )


def server_interceptors(cfg: SecurityConfig) -> list[grpc.ServerInterceptor]:
    """The interceptors a server of ``cfg`` needs (empty when auth is off)."""
    token = cfg.token
    return [TokenAuthInterceptor(token)] if token else []


def server_credentials(cfg: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from ``cfg.tls_cert`` / ``tls_key``; ``None`` when TLS is off."""
    if not cfg.server_tls:
        return None
    key, cert = Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


def add_port(server: grpc.Server, address: str, cfg: SecurityConfig) -> int:
    """Listen on ``address`` with TLS if ``cfg`` says so; returns the bound port.

    Raises ``OSError`` when the address cannot be bound.
    """
    creds = server_credentials(cfg)
    if creds is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, creds)
    if port == 0:
        raise OSError(f"cannot listen on {address}; is the port taken or the host wrong?")
    return port


# ---- client side -----------------------------------------------------------------------------
class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: Sequence[tuple[str, str]]):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class HeaderClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``key: value()`` to every call of a channel (nothing while ``value()`` is '')."""

    def __init__(self, key: str, value: Callable[[], str]) -> None:
        self._key = key
        self._value = value

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        value = self._value()
        if not value:
            return details
        metadata = [m for m in (details.metadata or ()) if m[0] != self._key]
        return _ClientCallDetails(details, [*metadata, (self._key, value)])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class TokenClientInterceptor(HeaderClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        entry = f"Bearer {token}"
        super().__init__(AUTH_KEY, lambda: entry)


def channel_credentials(cfg: SecurityConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting ``cfg.tls_ca``; ``None`` when client TLS is off."""
    if not cfg.client_tls:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(cfg.tls_ca).read_bytes())


def make_channel(
    target: str,
    cfg: SecurityConfig | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``target`` with TLS and the token as ``cfg`` says (plain when ``None``)."""
    cfg = cfg or SecurityConfig()
    options = list(options)
    creds = channel_credentials(cfg)
    if creds is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        if cfg.tls_server_name:
            options.append(("grpc.ssl_target_name_override", cfg.tls_server_name))
        channel = grpc.secure_channel(target, creds, options=options)
    token = cfg.token
    return grpc.intercept_channel(channel, TokenClientInterceptor(token)) if token else channel
