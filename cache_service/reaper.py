"""Releases what dead workers held: expires leases past their TTL and, after the grace,
releases their sequences (``cache_service.leases`` has the timing)."""

from __future__ import annotations

import logging
import threading

from cache_service.leases import LeaseTable
from cache_service.metrics import ServiceMetrics
from cache_service.store import Store

log = logging.getLogger(__name__)

MAX_TICK_S = 1.0
"""The reaper looks at least this often (and four times per TTL)."""


class LeaseReaper:
    """A thread that calls ``LeaseTable.reap`` and releases the sequences it returns."""

    def __init__(self, leases: LeaseTable, store: Store, metrics: ServiceMetrics) -> None:
        self.leases = leases
        self.store = store
        self.metrics = metrics
        self.tick_s = min(MAX_TICK_S, leases.ttl_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self) -> LeaseReaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def reap(self) -> int:
        """One look: expire, release; returns the sequences released."""
        found = self.leases.reap()
        for lease in found.expired:
            self.metrics.leases_expired.inc()
            log.warning(
                "lease %s of %s expired (not renewed for %g s); its %d sequence(s) are kept "
                "%g s for adoption, then released",
                lease.lease_id, lease.holder or "?", self.leases.ttl_s, len(lease.sequences),
                self.leases.grace_s,
                extra={"lease": lease.lease_id, "holder": lease.holder,
                       "sequences": len(lease.sequences)},
            )  # fmt: skip
        released = 0
        for lease, seq_ids in found.released:
            freed_pages = 0
            with self.store.lock:
                for seq_id in seq_ids:
                    if seq_id not in self.store:
                        continue
                    before = self.store.pool.num_used
                    self.store.release(seq_id)
                    freed_pages += before - self.store.pool.num_used
                    released += 1
            freed = freed_pages * self.store.pool.page_bytes
            self.metrics.lease_sequences_reclaimed.inc(len(seq_ids))
            self.metrics.lease_bytes_reclaimed.inc(freed)
            log.warning(
                "released the %d sequence(s) of expired lease %s of %s (%d bytes): %s",
                len(seq_ids), lease.lease_id, lease.holder or "?", freed, ", ".join(seq_ids),
                extra={"lease": lease.lease_id, "holder": lease.holder,
                       "sequences": len(seq_ids), "bytes": freed},
            )  # fmt: skip
        return released

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.reap()
            except Exception:  # the reaper must outlive a bad tick
                log.exception("lease reaper tick failed")
