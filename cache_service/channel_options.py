"""gRPC channel options of the cache service and its clients: message limits and the one
retry policy.

gRPC's own retries are the only layer that repeats a call to a cache service (the worker's
clients loop on none).
"""

from __future__ import annotations

import json

from cache_service.limits import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
"""Options of the server and of every client channel."""
RETRIED_METHODS = ("Info", "Stats", "ReadPages", "Retrieve")
"""Calls that change nothing a client could see twice; retried when UNAVAILABLE."""
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
"""gRPC's own retries: exponential backoff with full jitter, ~4 s of attempts at most.
``Create``, ``Append``, ``Decode`` and ``Release`` are not retried: a lost reply would make a
retry apply twice; their callers re-create the sequence instead (the worker re-prefills it,
on the next replica of its rendezvous order when its own failed)."""
CLIENT_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.enable_retries", 1),
    (
        "grpc.service_config",
        json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [
                            {"service": "icecache.v1.CacheService", "method": m}
                            for m in RETRIED_METHODS
                        ],
                        "retryPolicy": RETRY_POLICY,
                    }
                ]
            }
        ),
    ),
]
"""Options of a client channel: message limits and the retry policy."""
