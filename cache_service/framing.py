"""Framing of a local stream (a Unix socket): a 4-byte little-endian length, then the
payload, at most ``MAX_MESSAGE_BYTES``."""

from __future__ import annotations

import socket
import struct

from cache_service.limits import MAX_MESSAGE_BYTES

_FRAME_HEADER = struct.Struct("<I")


class FrameError(ConnectionError):
    """A local stream carried something that is not a frame (or ended inside one)."""


def write_frame(sock: socket.socket, payload: bytes) -> None:
    """Send one frame of a local stream: a 4-byte little-endian length, then ``payload``."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"a message of {len(payload)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit"
        )
    sock.sendall(_FRAME_HEADER.pack(len(payload)) + payload)


class FrameReader:
    """Reads the frames of one local-stream connection (a buffer of what arrived early).

    A frame usually arrives in one piece, so one ``recv`` gets its header and its payload.
    """

    READ_BYTES = 2**16

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self) -> bytes | None:
        """The next frame's payload; ``None`` when the peer closed between frames.

        Raises ``FrameError`` for a length over the message limit or an end inside a frame.
        """
        header = _FRAME_HEADER.size
        if not self._fill(header):
            if self._buffer:
                raise FrameError(self._cut(header))
            return None
        (size,) = _FRAME_HEADER.unpack_from(self._buffer)
        if size > MAX_MESSAGE_BYTES:
            raise FrameError(f"a frame of {size} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
        if not self._fill(header + size):
            raise FrameError(self._cut(header + size))
        payload = bytes(self._buffer[header : header + size])
        del self._buffer[: header + size]
        return payload

    def _cut(self, size: int) -> str:
        return f"the stream ended {size - len(self._buffer)} bytes short of a frame's end"

    def _fill(self, size: int) -> bool:
        """Buffer at least ``size`` bytes; ``False`` if the peer closed first."""
        while len(self._buffer) < size:
            chunk = self._sock.recv(max(self.READ_BYTES, size - len(self._buffer)))
            if not chunk:
                return False
            self._buffer += chunk
        return True
