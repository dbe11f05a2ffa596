"""A client that resumes a broken generation on another worker, token for token.

``ResumingClient(["a:50051", "b:50051"])`` sends a ``resumable`` request to the first worker
and remembers what resuming needs: the last ``started`` message (the sequence, its replica,
the worker's lease epoch there, the seed) and every token received. When the stream breaks
(the worker died or is draining: UNAVAILABLE, or the stream was cut), it sends the same
request with ``resume`` set to the next worker in the list, which takes the sequence over
from the cache service or rebuilds it, and goes on with the next token; the caller sees one
unbroken stream and one ``done`` covering the whole output. A refusal that says what to fix
(INVALID_ARGUMENT, ...) is raised at once, as is ABORTED: another worker already resumed
this generation.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from cache_service.security import SecurityConfig
from proto.icecache.v1 import worker_pb2 as pb
from worker.client import Generation, WorkerClient, generate_request
from worker.retry import DEFAULT_BACKOFF, Backoff

log = logging.getLogger(__name__)

BROKEN = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
     grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED}
)  # fmt: skip
"""Codes after which the generation goes on elsewhere (a dead, draining or busy worker)."""


class StreamCut(ConnectionError):
    """A stream ended without its ``done`` message."""


class ResumingClient:
    """Generation over a list of workers, resumed on the next one when a stream breaks."""

    def __init__(
        self,
        addresses: Sequence[str],
        timeout: float | None = 600.0,
        auth: SecurityConfig | None = None,
        attempts: int | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        if not addresses:
            raise ValueError("give at least one worker address")
        self.clients = [WorkerClient(a, timeout, auth) for a in addresses]
        self.attempts = attempts if attempts is not None else 2 * len(addresses) + 1
        """Streams started for one generation at most (the first included)."""
        self.backoff = backoff
        self.resumes = 0
        """Streams resumed on another worker, since this client was made."""
        self._rng = random.Random()

    def generate(
        self, prompt: str | list[int], max_new_tokens: int, **kwargs: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Token messages, then ``done`` (``kwargs``: those of ``generate_request``)."""
        request = generate_request(prompt, max_new_tokens, resumable=True, **kwargs)
        tokens: list[int] = []
        started: pb.Started | None = None
        for attempt in range(self.attempts):
            client = self.clients[attempt % len(self.clients)]
            try:
                for message in client.stream(request):
                    kind = message.WhichOneof("event")
                    if kind == "started":
                        started = message.started
                    elif kind == "token":
                        tokens.append(message.token.id)
                        yield message
                    else:
                        yield message
                        return
                raise StreamCut(f"the worker at {client.address} ended the stream early")
            except (grpc.RpcError, StreamCut) as err:
                code = err.code() if isinstance(err, grpc.RpcError) else None
                if code is not None and code not in BROKEN:
                    raise
                if attempt + 1 == self.attempts:
                    raise
                log.warning(
                    "stream from %s broke after %d token(s) (%s); resuming on %s",
                    client.address, len(tokens), code.name if code else err,
                    self.clients[(attempt + 1) % len(self.clients)].address,
                )  # fmt: skip
            self.resumes += 1
            _resume(request, started, tokens)
            bound = min(
                self.backoff.cap_s, self.backoff.base_s * 2 ** (attempt // len(self.clients))
            )
            time.sleep(self._rng.uniform(0.0, bound))  # each worker once, then back off
        raise AssertionError("unreachable: the last attempt raises")  # pragma: no cover

    def complete(self, prompt: str | list[int], max_new_tokens: int, **kwargs: Any) -> Generation:
        """Run one generation to the end, resumed across the workers as needed."""
        started = time.perf_counter()
        times: list[float] = []
        for message in self.generate(prompt, max_new_tokens, **kwargs):
            if message.HasField("token"):
                times.append(time.perf_counter() - started)
                continue
            done = message.done
            seed = done.seed if done.HasField("seed") else None
            return Generation(list(done.token_ids), done.text, done.usage.prompt_tokens,
                              done.stats, times, seed)  # fmt: skip
        raise StreamCut("the generation ended without its done message")  # pragma: no cover

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> ResumingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resume(request: pb.GenerateRequest, started: pb.Started | None, tokens: list[int]) -> None:
    """Turn ``request`` into the resume of what was received (nothing: start afresh)."""
    request.ClearField("resume")
    if started is None and not tokens:
        return  # nothing happened for the caller: the same request again
    resume = request.resume
    resume.tokens.extend(tokens)
    if started is not None:
        resume.seq_id, resume.replica, resume.epoch = (
            started.seq_id, started.replica, started.epoch,
        )  # fmt: skip
        if started.HasField("seed") and not request.HasField("seed"):
            request.seed = started.seed  # a sampled request goes on with the same noise
