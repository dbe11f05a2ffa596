"""Which replica holds each sequence, and how many sequences each replica holds.

Where a new sequence goes is rendezvous hashing (``worker.placement.ranked``); this table
records where each one went, so that every later call for it reaches the same replica.
Pure bookkeeping over ids.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cache_service.types import UnknownSequence


@dataclass
class PlacementCounts:
    """Sequences per replica: live now and placed since start; replica failures."""

    live: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    """Times each replica was given up (its sequences lost)."""


class Routes:
    """Sequence id -> replica address, with counts per replica."""

    def __init__(self) -> None:
        self.of: dict[str, str] = {}
        """Where each placed sequence lives."""
        self.counts = PlacementCounts()

    def place(self, seq_id: str, address: str) -> None:
        self.of[seq_id] = address
        self.counts.live[address] += 1
        self.counts.total[address] += 1

    def forget(self, seq_id: str) -> str:
        """Drop ``seq_id``; returns the replica it was on."""
        address = self.of.pop(seq_id)
        self.counts.live[address] -= 1
        return address

    def replica(self, seq_id: str) -> str:
        """The replica of ``seq_id``; ``UnknownSequence`` if it is not placed."""
        address = self.of.get(seq_id)
        if address is None:
            raise UnknownSequence(seq_id)
        return address

    def on(self, address: str) -> list[str]:
        """The sequences placed on ``address``."""
        return [s for s, a in self.of.items() if a == address]
