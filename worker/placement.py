"""Which cache-service replica holds a sequence: rendezvous (highest-random-weight) hashing.

Each (sequence, replica) pair gets a pseudo-random weight from a stable hash; a sequence lives
on the healthy replica with the highest weight. Adding a replica moves only the sequences
for which the new replica wins; removing one moves only the sequences it held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(seq_id: str, replica: str) -> int:
    """A stable 64-bit weight of one (sequence, replica) pair."""
    digest = hashlib.blake2b(f"{replica}\x00{seq_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(seq_id: str, replicas: Iterable[str]) -> str:
    """The replica with the highest weight for ``seq_id`` (ties broken by name)."""
    candidates = list(replicas)
    if not candidates:
        raise RuntimeError(
            "no healthy cache-service replica to place a sequence on; "
            "check the replicas given with --cache-service"
        )
    return max(candidates, key=lambda r: (weight(seq_id, r), r))


def ranked(seq_id: str, replicas: Iterable[str]) -> list[str]:
    """All replicas, best first: the owner, then where the sequence goes if it fails."""
    return sorted(replicas, key=lambda r: (weight(seq_id, r), r), reverse=True)
