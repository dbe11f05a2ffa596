"""A worker's lease on one cache-service replica: opened on connect, renewed from a thread of
its own, closed (releasing its sequences) on a clean shutdown. ``cache_service.leases`` has
the service's side and the timing."""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from cache_service import wire_errors
from cache_service.types import LeaseLost
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_RENEW_S = 2.0
"""Seconds between heartbeats (at most a third of the service's TTL)."""


class LeaseKeeper:
    """Holds one lease: ``lease_id`` goes with every call; ``check`` raises ``LeaseLost`` once
    the service said the lease expired (nothing is sent on it after that)."""

    def __init__(
        self,
        stub: pb_grpc.CacheServiceStub,
        address: str,
        holder: str,
        renew_s: float = DEFAULT_RENEW_S,
        timeout: float | None = 10.0,
    ) -> None:
        self.address = address
        self._stub = stub
        self._timeout = timeout
        opened = self._call(stub.OpenLease, pb.OpenLeaseRequest(holder=holder))
        self.lease_id: str = opened.lease_id
        self.epoch = int(opened.epoch)
        self.ttl_s = float(opened.ttl_s)
        self.renew_s = min(renew_s, self.ttl_s / 3)
        if renew_s > self.renew_s:
            log.warning(
                "lease renewal every %g s would let the lease of %s expire (TTL %g s); "
                "renewing every %g s", renew_s, address, self.ttl_s, self.renew_s,
            )  # fmt: skip
        self.lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease", daemon=True)
        self._thread.start()
        log.info("lease %s on %s (TTL %g s, renewed every %g s)", self.lease_id, address,
                 self.ttl_s, self.renew_s, extra={"lease": self.lease_id})  # fmt: skip

    def check(self) -> None:
        """``LeaseLost`` when the lease is gone: this client must not write any more."""
        if self.lost is not None:
            raise LeaseLost(str(self.lost))

    def close(self) -> None:
        """Stop renewing and end the lease (its sequences are released at once)."""
        self._stop.set()
        if self.lost is not None:
            return
        try:
            self._call(self._stub.CloseLease, pb.CloseLeaseRequest(lease_id=self.lease_id), 5.0)
        except (ConnectionError, RuntimeError) as err:  # the reaper releases them instead
            log.info("could not close lease %s on %s: %s", self.lease_id, self.address, err)

    def _beat(self) -> None:
        request = pb.RenewLeaseRequest(lease_id=self.lease_id)
        while not self._stop.wait(self.renew_s):
            try:
                self._call(self._stub.RenewLease, request, self.renew_s)
            except LeaseLost as err:
                self.lost = err
                log.error("lease %s on %s is lost: %s", self.lease_id, self.address, err)
                return
            except (ConnectionError, RuntimeError) as err:  # health checks judge the replica
                log.debug("lease %s renewal on %s failed: %s", self.lease_id, self.address, err)

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self._timeout)
        except grpc.RpcError as err:
            raise wire_errors.error_from_status(err, self.address) from None
