"""Sizes both ends of the link keep to: a message, an append's chunk, a page read."""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 * 2**20
"""Largest message either end sends or accepts (gRPC or a local-stream frame)."""
APPEND_CHUNK_BYTES = 8 * 2**20
"""A client splits an append so that each request carries at most this much K/V."""
READ_PAGES_MAX = 2048
"""Most pages one ``ReadPages`` call may ask for."""
