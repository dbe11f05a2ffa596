"""Opening cache-service replicas over gRPC for ``ShardedKVClient``: a ``RemoteKVClient`` each,
described as a ``Shard`` (its pool's size, which process answers) from its ``Info``."""

from __future__ import annotations

from dataclasses import dataclass

from cache_service import security
from worker.kv.health import HealthMonitor, IncarnationProbe, LoadProbe, incarnation
from worker.kv.lease import DEFAULT_RENEW_S
from worker.kv.remote import RemoteKVClient
from worker.kv.sharded import Shard, ShardedKVClient


@dataclass(frozen=True)
class ReplicaConnector:
    """Opens one replica as a shard; ``ValueError`` when it does not fit the model."""

    auth: security.SecurityConfig
    rpc_timeout: float
    """Deadline of each call to the replica, after which it counts as down."""
    connect_timeout: float
    """Seconds to wait for the replica to answer at all."""
    head_dim: int | None = None
    """The model's head size, which the replica's pages must have (``None``: any)."""
    holder: str | None = None
    """Open a lease on the replica in this name (``None``: no lease)."""
    lease_renew_s: float = DEFAULT_RENEW_S

    def __call__(self, address: str) -> Shard:
        client = RemoteKVClient.connect(
            address,
            timeout=self.rpc_timeout,
            connect_timeout=self.connect_timeout,
            auth=self.auth,
            holder=self.holder,
            lease_renew_s=self.lease_renew_s,
        )
        if self.head_dim is not None and client.head_dim != self.head_dim:
            client.close()
            raise ValueError(
                f"cache service {address} keeps head_dim {client.head_dim} but the model has "
                f"{self.head_dim}; start it with --head-dim {self.head_dim}"
            )
        pages = int(client.info.pool.num_pages)
        return Shard(address, client, pages, identity=incarnation(client.info))


def connect_replicas(
    addresses: list[str],
    health_interval: float = 1.0,
    connect_timeout: float = 30.0,
    auth: security.SecurityConfig | None = None,
    rpc_timeout: float = 60.0,
    head_dim: int | None = None,
    holder: str | None = None,
    lease_renew_s: float = DEFAULT_RENEW_S,
) -> ShardedKVClient:
    """A sharded client over every replica (each must answer within ``connect_timeout`` s),
    its health checks started.

    ``auth``: the token and TLS settings of the replicas (``None``: none); ``rpc_timeout``:
    deadline of each call to a replica; ``head_dim``: the model's, which every replica must
    keep; ``holder``: the lease's name on each replica (``None``: no lease), renewed every
    ``lease_renew_s``. A replica that failed is reconnected with a 2 s wait (and a new lease).
    """
    auth = auth or security.SecurityConfig()
    first = ReplicaConnector(auth, rpc_timeout, connect_timeout, head_dim, holder, lease_renew_s)
    shards: list[Shard] = []
    try:
        for address in addresses:
            shards.append(first(address))
        health = HealthMonitor(addresses, health_interval, auth=auth)
        again = ReplicaConnector(auth, rpc_timeout, 2.0, head_dim, holder, lease_renew_s)
        sharded = ShardedKVClient(shards, health, again, IncarnationProbe(auth), LoadProbe(auth))
    except BaseException:
        for shard in shards:
            shard.client.close()
        raise
    sharded.health.start()
    return sharded
