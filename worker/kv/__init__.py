"""Clients of the KV store behind the ``worker.kv_client.KVClient`` contract, one idea a file.

One cache service (``RemoteKVClient``):

- ``remote``: the client; unary calls, the choice of decode path, pages pushed with a step;
- ``shm_view``: a read-only mapping of a same-host service's page pool;
- ``grpc_stream``: decode steps on a gRPC ``DecodeStream``, with a per-step watchdog;
- ``socket_stream``: decode steps on a same-host service's Unix socket (``OpenLocalStream``).

Several replicas (``ShardedKVClient``):

- ``sharded``: the client; failover (a failed replica's sequences are lost and reported)
  and reconnection of a restarted replica;
- ``routing``: which replica holds each sequence, and counts per replica;
- ``page_ranges``: the global page-id space (a disjoint range of ids per replica incarnation);
- ``traffic``: pages selected and read per sequence;
- ``health``: ``grpc.health.v1`` polls of the replicas, and which process of one answers;
- ``replicas``: opening a replica (a ``RemoteKVClient``) as a shard.

Retries (one layer per call): the channel's gRPC retry policy (``cache_service.channel_options``)
repeats the calls that change nothing (``Info``, ``Stats``, ``ReadPages``, ``Retrieve``) on
UNAVAILABLE; nothing here loops on a call. A call that still fails gives its replica up
(``sharded``): a ``Create`` goes on to the next replica of the sequence's rendezvous order,
and the sequences the replica held are rebuilt elsewhere by the scheduler, whose placement
retry is the only hand-written loop on the KV path (``worker.retry``).
"""
