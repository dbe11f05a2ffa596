"""Which cache-service replica holds a sequence: rendezvous (highest-random-weight) hashing.

Each (sequence, replica) pair gets a pseudo-random weight from a stable hash; a sequence lives
on the healthy replica with the highest weight. Adding a replica moves only the sequences
for which the new replica wins; removing one moves only the sequences it held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from cache_service.types import PrefixKeys

PLACEMENT_BLOCKS = 4
"""A sequence with prompt blocks is placed by the key of its 4th block (its last whole block
if it has fewer): equal documents meet on one replica, where their blocks are kept, while
prompts that share only a chat template's system prompt (shorter than 4 blocks of 256
tokens, as a rule) but differ later spread by their own later blocks."""
LOAD_SLACK = 2.0
"""Bounded load: a replica takes a new sequence while it holds less than ``LOAD_SLACK`` times
its fair share (placed sequences / replicas, rounded up); past that the next replica in
rendezvous order takes it. Twice the share, not the 1.25x of the paper: a spilled sequence
prefills its document again and keeps another copy of it, so a few questions about one
document (8 on 2 replicas) should stay together, while a key that carries most of the
traffic still spreads."""


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


def placement_key(seq_id: str, prefix: PrefixKeys | None) -> str:
    """What a new sequence is placed by: its prompt's ``PLACEMENT_BLOCKS``-th block key (or
    its last whole block's), else its id (also when the request turned reuse off)."""
    if prefix is None or not prefix.keys or not prefix.reuse:
        return seq_id
    return prefix.keys[min(len(prefix.keys), PLACEMENT_BLOCKS) - 1].hex()


def bounded(key: str, replicas: Iterable[str], live: Mapping[str, int]) -> list[str]:
    """``ranked(key, replicas)`` with the replicas over their bound moved behind the others
    (consistent hashing with bounded loads, Mirrokni et al. 2018): a key that many
    sequences share fills its owner to ``LOAD_SLACK`` times the fair share, then spills in
    rendezvous order, instead of sending them all to one replica. ``live``: the sequences
    each replica holds now (every worker's, ``worker.kv.health.LoadProbe``)."""
    order = ranked(key, replicas)
    if not order:
        return order
    placed = sum(live.get(r, 0) for r in order) + 1
    bound = LOAD_SLACK * -(-placed // len(order))
    return [r for r in order if live.get(r, 0) < bound] + [
        r for r in order if live.get(r, 0) >= bound
    ]
