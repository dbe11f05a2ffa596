"""The client of a worker service: ``icecache generate --server HOST:PORT``, and a health probe.

``python -m worker.client health HOST:PORT [--service NAME]`` exits 0 when the gRPC server at
that address reports ``SERVING`` on the standard health service (any IceCache service: worker
or cache service); it is the healthcheck of ``docker-compose.yml`` and of the Kubernetes
probes. A worker is *ready* (``--service icecache.v1.Worker``) only while a cache-service
replica is healthy, and *live* (no ``--service``) while its process serves.

Retries: ``WorkerClient`` repeats UNAVAILABLE with ``worker.retry`` (one loop per call; the
worker's channel has no gRPC retry policy): ``Generate`` only while no token has arrived (so
nothing was generated for the caller), ``CountTokens`` and ``Info`` always (they change
nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache_service.security import SecurityConfig, make_channel, security_from_env
from proto.icecache.v1 import worker_pb2 as pb
from proto.icecache.v1 import worker_pb2_grpc as pb_grpc
from worker.retry import DEFAULT_BACKOFF, Backoff, retry
from worker.sampling import SamplingParams, from_flags

if TYPE_CHECKING:
    from worker.resuming import ResumingClient

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
"""Codes of a ``Generate`` that ``complete`` repeats when no token has arrived yet (nothing
was generated for the caller, so the repeat is safe)."""


@dataclass
class Generation:
    """A finished remote generation."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    stats: pb.GenerateStats
    token_times: list[float] = field(default_factory=list)
    """Seconds from the call to each token's arrival."""
    seed: int | None = None
    """The seed the tokens were sampled with; ``None``: greedy."""


class WorkerClient:
    """A channel to one worker; ``generate`` streams tokens, ``complete`` waits for all.

    ``auth``: token and TLS (``None``: none); ``timeout``: the deadline of each call, which
    the worker honours (it stops and releases the sequence); ``backoff``: how ``complete``,
    ``count_tokens`` and ``info`` retry UNAVAILABLE before any token arrived.
    """

    def __init__(
        self,
        address: str,
        timeout: float | None = 600.0,
        auth: SecurityConfig | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.auth = auth or SecurityConfig()
        self.backoff = backoff
        self.retries = 0
        """Calls repeated after a transient error, since this client was made."""
        self.channel = make_channel(address, self.auth)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self._rng = random.Random()

    def wait_ready(self, timeout: float = 10.0) -> WorkerClient:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(
                f"no worker answered at {self.address} within {timeout:g} s; start one with "
                "`python -m worker --cache-service HOST:PORT` or check --server"
            ) from None
        return self

    def generate(
        self, prompt: str | list[int], max_new_tokens: int, **kwargs: Any
    ) -> Iterator[pb.GenerateResponse]:
        """The response stream: one message per token, then ``done`` (no retries here).

        ``kwargs``: those of ``generate_request``; ``timeout``: this call's deadline in seconds
        (``None``: the client's).
        """
        timeout = kwargs.pop("timeout", None)
        return self.stream(generate_request(prompt, max_new_tokens, **kwargs), timeout)

    def stream(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> Iterator[pb.GenerateResponse]:
        """``Generate`` of a request built by ``generate_request`` (no retries here)."""
        return iter(self.stub.Generate(request, timeout=timeout or self.timeout))

    def complete(self, prompt: str | list[int], max_new_tokens: int, **kwargs: Any) -> Generation:
        """Run one generation to the end; UNAVAILABLE before the first token is retried."""
        times: list[float] = []

        def attempt() -> Generation:
            started = time.perf_counter()
            times.clear()
            for message in self.generate(prompt, max_new_tokens, **kwargs):
                if message.HasField("token"):
                    times.append(time.perf_counter() - started)
                else:
                    done = message.done
                    return Generation(
                        list(done.token_ids), done.text, done.usage.prompt_tokens,
                        done.stats, list(times), _seed(done),
                    )  # fmt: skip
            raise ConnectionError(f"the worker at {self.address} closed the stream before the end")

        return self._retried(attempt, "Generate", lambda: not times)

    def count_tokens(self, prompt: str, chat: bool = True) -> int:
        request = pb.CountTokensRequest(prompt=prompt, chat=chat)
        return int(self._unary(self.stub.CountTokens, request).tokens)

    def info(self) -> pb.WorkerInfoResponse:
        reply: pb.WorkerInfoResponse = self._unary(self.stub.Info, pb.WorkerInfoRequest())
        return reply

    def _unary(self, method: Any, request: Any) -> Any:
        """A unary call, UNAVAILABLE retried with backoff (these calls change nothing)."""
        return self._retried(lambda: method(request, timeout=self.timeout), "call")

    def _retried(
        self, call: Callable[[], T], what: str, safe: Callable[[], bool] = lambda: True
    ) -> T:
        """``call()``, repeated on a ``RETRYABLE`` status while ``safe()``, with backoff."""

        def retryable(err: BaseException) -> bool:
            assert isinstance(err, grpc.RpcError)
            return err.code() in RETRYABLE and safe()

        return retry(
            call, self.backoff, (grpc.RpcError,), f"{what} to {self.address}", self._rng,
            on_retry=self._count_retry, retryable=retryable,
        )  # fmt: skip

    def _count_retry(self, err: BaseException) -> None:
        self.retries += 1

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate_request(
    prompt: str | list[int],
    max_new_tokens: int,
    chat: bool = True,
    ignore_eos: bool = False,
    request_id: str = "",
    policy: str | None = None,
    budget: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    resumable: bool = False,
    reuse_prefix: bool | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """A ``GenerateRequest``. ``policy``/``budget``: this request's own (``None``: the
    worker's). ``stop``: strings that end the text just before them; ``stop_token_ids``: more
    stop tokens; ``resumable``: ask for ``started`` messages (``worker.resuming``);
    ``reuse_prefix``: start from prompt blocks the cache service keeps (``None``: the worker's
    ``--prefix-reuse``). ``sampling``: the parameters of ``worker.sampling.SamplingParams``
    by name (``temperature``, ``top_p``, ...; ``None`` or left out: greedy, and an unseeded
    sampled request gets the worker's seed, in ``done.seed``)."""
    SamplingParams.check_names(sampling)
    request = pb.GenerateRequest(
        max_new_tokens=max_new_tokens, chat=chat, ignore_eos=ignore_eos, request_id=request_id,
        resumable=resumable,
    )  # fmt: skip
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_ids.ids.extend(prompt)
    given = {"policy": policy, "budget": budget, "reuse_prefix": reuse_prefix, **sampling}
    for name, value in given.items():
        if value is not None:
            setattr(request, name, value)
    request.stop.extend(stop)
    request.stop_token_ids.extend(stop_token_ids)
    return request


def check_health(
    address: str, timeout: float = 2.0, service: str = "", auth: SecurityConfig | None = None
) -> bool:
    """Whether the server at ``address`` reports ``SERVING`` for ``service`` (TLS per
    ``auth``; health checks need no token)."""
    with make_channel(address, auth) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# ---- the CLI end ---------------------------------------------------------------------------
def _read_prompt(args: argparse.Namespace) -> str:
    if not getattr(args, "prompt_file", None):
        return str(args.prompt)
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: cannot read --prompt-file {args.prompt_file}: {err}") from None


def generate_remote(args: argparse.Namespace) -> int:
    """``icecache generate --server HOST:PORT[,HOST:PORT...]``: stream the answer (or print
    JSON at the end); a stream that breaks goes on on the next listed worker
    (``worker.resuming``).

    ``--policy`` and ``--budget``, when given, are this request's own; the other engine
    flags are the server's. Returns the exit status.
    """
    prompt = _read_prompt(args)
    try:
        auth = _client_auth(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from worker.resuming import ResumingClient

    addresses = [a.strip() for a in args.server.split(",") if a.strip()]
    try:
        with ResumingClient(addresses, auth=auth) as client:
            result = _stream(client, prompt, args)
    except grpc.RpcError as err:
        print(f"error: the worker at {args.server} said {err.code().name}: {err.details()}",
              file=sys.stderr)  # fmt: skip
        return 2 if err.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    except ConnectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_as_json(result)))
    return 0


def _client_auth(args: argparse.Namespace) -> SecurityConfig:
    """Token and CA of ``--auth-token`` / ``--tls-ca`` (else ``ICECACHE_*`` env)."""
    env = security_from_env()
    return SecurityConfig(
        auth_token=getattr(args, "auth_token", None) or env.auth_token,
        auth_token_file="" if getattr(args, "auth_token", None) else env.auth_token_file,
        tls_ca=getattr(args, "tls_ca", None) or env.tls_ca,
        tls_server_name=env.tls_server_name,
    )


def _stream(client: ResumingClient, prompt: str, args: argparse.Namespace) -> Generation:
    """Run the generation; without ``--json`` the text goes to stdout as it arrives."""
    chat = getattr(args, "chat", True)
    policy, budget = getattr(args, "policy", None), getattr(args, "budget", None)
    for message in client.generate(
        prompt, args.max_new_tokens, chat=chat, policy=policy, budget=budget,
        stop=getattr(args, "stop", None) or (), **asdict(from_flags(args)),
    ):  # fmt: skip
        if message.HasField("token"):
            if not args.json:
                sys.stdout.write(message.token.text)
                sys.stdout.flush()
            continue
        done = message.done
        if not args.json:
            sys.stdout.write(done.held_text + "\n")
        return Generation(
            list(done.token_ids), done.text, done.usage.prompt_tokens, done.stats, seed=_seed(done)
        )
    raise ConnectionError(f"the workers at {args.server} closed the stream before the end")


def _seed(done: pb.GenerateDone) -> int | None:
    return done.seed if done.HasField("seed") else None


def _as_json(result: Generation) -> dict[str, Any]:
    s = result.stats
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "seed": result.seed,
        "prompt_tokens": result.prompt_tokens,
        "policy": s.policy,
        "budget": s.budget if s.HasField("budget") else None,
        "dense_layers": s.dense_layers,
        "finish_reason": s.finish_reason,
        "replica": s.replica,
        "prefill_s": s.prefill_s,
        "first_token_s": s.first_token_s,
        "generate_s": s.total_s,
        "decode_ms_per_token": 1000 * s.decode_s / max(1, s.decode_steps),
        "mean_batch": s.mean_batch,
        "pages_selected": s.pages_selected,
        "pages_moved": s.pages_moved,
        "bytes_moved": s.bytes_moved,
        "kv_bytes_stored": s.kv_bytes_stored,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("health", help="exit 0 if the server at ADDRESS is SERVING")
    probe.add_argument("address", help="HOST:PORT")
    probe.add_argument("--service", default="", help="service name (default: the server)")
    probe.add_argument("--timeout", type=float, default=2.0)
    probe.add_argument(
        "--tls-ca",
        default=os.environ.get("ICECACHE_TLS_CA", ""),
        help="CA certificate (PEM) of a TLS server [env ICECACHE_TLS_CA]",
    )
    args = parser.parse_args(argv)
    tls_name = os.environ.get("ICECACHE_TLS_SERVER_NAME", "")
    auth = SecurityConfig(tls_ca=args.tls_ca, tls_server_name=tls_name)
    serving = check_health(args.address, args.timeout, args.service, auth)
    if not serving:
        print(f"{args.address} is not serving", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
