"""Our own retry loop: exponential backoff with full jitter, for what gRPC cannot retry.

Attempt ``n`` (0-based) that fails with a transient error waits a uniformly random time in
``[0, min(cap_s, base_s * 2**n)]`` before the next one ("full jitter": clients that failed
together do not retry together).

Who retries what (one layer per call):

- calls to a cache service: its channel's gRPC retry policy
  (``cache_service.channel_options``), never this loop;
- a sequence whose replica failed during its prefill: ``worker.scheduler`` places it anew
  with this loop (each try is a new placement, not a repeat of a call);
- calls to a worker (``worker.client.WorkerClient``): this loop, as the attempts must be
  counted and may exceed gRPC's cap of 5; the worker's channel has no retry policy.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """How often and how long to retry."""

    attempts: int = 4
    """Calls at most, the first included (1: no retry)."""
    base_s: float = 0.05
    """Upper bound of the first wait; doubles with each attempt."""
    cap_s: float = 2.0
    """Largest upper bound of one wait."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < self.base_s:
            raise ValueError("Backoff needs attempts >= 1 and 0 <= base_s <= cap_s")

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The waits between attempts (``attempts - 1`` of them)."""
        for n in range(self.attempts - 1):
            yield rng.uniform(0.0, min(self.cap_s, self.base_s * 2**n))


DEFAULT_BACKOFF = Backoff()


def retry(
    call: Callable[[], T],
    backoff: Backoff,
    transient: tuple[type[BaseException], ...] = (ConnectionError,),
    what: str = "call",
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[BaseException], None] | None = None,
    retryable: Callable[[BaseException], bool] | None = None,
) -> T:
    """``call()``, repeated after each ``transient`` error until it succeeds or the attempts
    run out (then the last error propagates); other errors propagate at once, as do those
    ``retryable`` (when given) says no to."""
    delays = backoff.delays(rng or random.Random())
    while True:
        try:
            return call()
        except transient as err:
            if retryable is not None and not retryable(err):
                raise
            wait = next(delays, None)
            if wait is None:
                raise
            log.info("%s failed (%s); retrying in %.3f s", what, err, wait)
            if on_retry is not None:
                on_retry(err)
            sleep(wait)
