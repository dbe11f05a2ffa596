"""Leases: every sequence belongs to the worker process that created it, for as long as that
process shows it is alive.

A worker opens a lease when it connects (``OpenLease``) and sends its id with every call
(metadata ``icecache-lease``; a local stream is bound to the lease of the call that opened
it). Any call on the lease renews it, and so does a heartbeat (``RenewLease``) every
``--lease-renew-s`` on the worker. Timing, with ``ttl`` = ``--lease-ttl-s`` and ``grace`` =
``--lease-grace-s`` of the cache service:

- a lease not renewed for ``ttl`` seconds **expires**: from then on every call on it fails
  with ``LeaseLost`` (FAILED_PRECONDITION), so a worker that was paused past its TTL never
  writes again into what it held; it opens a new lease and rebuilds its sequences;
- its sequences are kept ``grace`` more seconds (for another worker to adopt them), then
  **released**; the service counts expired leases and the sequences and bytes it reclaimed;
- ``CloseLease`` (a worker shutting down) releases the lease's sequences at once.

A sequence created without a lease (a tool, an old client) belongs to nobody and lives until
released; only its creator's lease may change a leased sequence. Leases carry an *epoch*, a
number that grows with every lease the service opens, so a lease id is never reused.

``LeaseTable`` is pure bookkeeping with an injectable clock; the servicer checks calls
against it and the server's reaper calls ``reap`` and releases what it returns.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cache_service.types import AdoptionConflict, LeaseLost

LEASE_KEY = "icecache-lease"
"""Call metadata carrying the caller's lease id."""


@dataclass
class Lease:
    """One worker process's claim on its sequences."""

    lease_id: str
    holder: str
    """Who opened it (the worker's instance id), for logs."""
    epoch: int
    renewed: float
    """Clock time of the last renewal."""
    sequences: set[str] = field(default_factory=set)
    expired: float | None = None
    """Clock time it expired (``None`` while alive)."""


@dataclass(frozen=True)
class Reaped:
    """What one ``reap`` found."""

    expired: list[Lease]
    """Leases that expired now (their sequences wait out the grace)."""
    released: list[tuple[Lease, list[str]]]
    """Leases whose grace ended now, with the sequences to release."""


class LeaseTable:
    """Leases, and which lease owns each leased sequence (thread-safe)."""

    def __init__(
        self, ttl_s: float, grace_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl_s <= 0 or grace_s < 0:
            raise ValueError(f"lease ttl must be > 0 and grace >= 0, got {ttl_s}, {grace_s}")
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._owner: dict[str, str] = {}  # seq_id -> lease_id
        self._epochs = itertools.count(1)
        self._lock = threading.Lock()

    # ---- a worker's calls ----------------------------------------------------------------
    def open(self, holder: str) -> Lease:
        with self._lock:
            epoch = next(self._epochs)
            lease = Lease(f"{epoch}-{secrets.token_hex(6)}", holder, epoch, self.clock())
            self._leases[lease.lease_id] = lease
            return lease

    def renew(self, lease_id: str) -> Lease:
        """Renew a live lease; ``LeaseLost`` if it expired or is unknown."""
        with self._lock:
            return self._live(lease_id)

    def check(self, lease_id: str, seq_ids: Iterable[str]) -> None:
        """A call of ``lease_id`` ('' for none) may change ``seq_ids``: its lease is alive
        (renewed now) and owns every leased one. ``LeaseLost`` otherwise."""
        with self._lock:
            if lease_id:
                self._live(lease_id)
            for seq_id in seq_ids:
                owner = self._owner.get(seq_id)
                if owner is not None and owner != lease_id:
                    held = self._leases[owner]
                    raise LeaseLost(
                        f"sequence {seq_id!r} is held by lease {owner} of {held.holder}, not "
                        f"by this caller's ({lease_id or 'none'}); only its holder may change it"
                    )

    def attach(self, lease_id: str, seq_id: str) -> None:
        """``seq_id`` was created by a call of ``lease_id`` ('' for none: nobody's)."""
        if not lease_id:
            return
        with self._lock:
            self._live(lease_id).sequences.add(seq_id)
            self._owner[seq_id] = lease_id

    def adopt(self, lease_id: str, seq_id: str, epoch: int) -> None:
        """Move ``seq_id`` to the live lease ``lease_id`` if the lease holding it now has
        ``epoch`` (0: held by none): a compare-and-swap, so of two workers resuming the same
        generation one wins and the other gets ``AdoptionConflict``. The old holder, alive
        or not, is fenced off the sequence from now on."""
        with self._lock:
            lease = self._live(lease_id)
            owner = self._owner.get(seq_id)
            held = 0 if owner is None else self._leases[owner].epoch
            if held != epoch:
                raise AdoptionConflict(
                    f"sequence {seq_id!r} is held by lease epoch {held}, not {epoch}: another "
                    "worker took it over first; this generation was resumed elsewhere"
                )
            if owner is not None:
                self._leases[owner].sequences.discard(seq_id)
            self._owner[seq_id] = lease_id
            lease.sequences.add(seq_id)

    def detach(self, seq_id: str) -> None:
        """``seq_id`` was released."""
        with self._lock:
            owner = self._owner.pop(seq_id, None)
            if owner is not None:
                self._leases[owner].sequences.discard(seq_id)

    def close(self, lease_id: str) -> list[str]:
        """End a lease (its holder shuts down); returns its sequences, to release now.
        Unknown or expired leases return nothing (the reaper has them)."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.expired is not None:
                return []
            del self._leases[lease_id]
            for seq_id in lease.sequences:
                del self._owner[seq_id]
            return sorted(lease.sequences)

    # ---- the reaper ----------------------------------------------------------------------
    def reap(self) -> Reaped:
        """Expire leases past their TTL; end those past their grace, returning their
        sequences (no longer owned: the caller releases them)."""
        now = self.clock()
        expired: list[Lease] = []
        released: list[tuple[Lease, list[str]]] = []
        with self._lock:
            for lease in list(self._leases.values()):
                if lease.expired is None and now - lease.renewed > self.ttl_s:
                    lease.expired = now
                    expired.append(lease)
                if lease.expired is not None and now - lease.expired >= self.grace_s:
                    del self._leases[lease.lease_id]
                    for seq_id in lease.sequences:
                        del self._owner[seq_id]
                    released.append((lease, sorted(lease.sequences)))
        return Reaped(expired, released)

    # ---- views ---------------------------------------------------------------------------
    def owner(self, seq_id: str) -> str | None:
        return self._owner.get(seq_id)

    def live(self) -> int:
        """Leases not expired."""
        with self._lock:
            return sum(lease.expired is None for lease in self._leases.values())

    def _live(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None or lease.expired is not None:
            state = "is unknown here" if lease is None else "expired"
            raise LeaseLost(
                f"lease {lease_id} {state} (not renewed within {self.ttl_s:g} s, or the "
                "service restarted); its sequences are no longer this caller's: open a new "
                "lease and rebuild them"
            )
        lease.renewed = self.clock()
        return lease


def lease_of(context: Any) -> str:
    """The lease id a call carries ('' for none): a local stream's own, or the metadata's."""
    bound = getattr(context, "lease", None)
    if bound is not None:
        return str(bound)
    for key, value in context.invocation_metadata() or ():
        if key == LEASE_KEY:
            return str(value)
    return ""
