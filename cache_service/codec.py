"""The wire contract in Python: domain objects <-> ``icecache.v1`` messages, limits, errors.

Both ends of the gRPC link (``cache_service.servicer`` and ``worker.kv.remote``) translate
through here, so a tensor, a spec, a selection or an error means the same on either side.
Tensors travel as raw little-endian bytes with a dtype and a shape.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from pathlib import Path

import grpc
import numpy as np

from cache_service.page_pool import PoolExhausted
from cache_service.types import (
    OutOfOrder,
    Selection,
    SequenceExists,
    SequenceFailed,
    SequenceSpec,
    TooManySequences,
    TooManyStreams,
    UnknownSequence,
)
from proto.icecache.v1 import cache_service_pb2 as pb

MAX_MESSAGE_BYTES = 64 * 2**20
"""Largest message either end sends or accepts."""
APPEND_CHUNK_BYTES = 8 * 2**20
"""A client splits an append so that each request carries at most this much K/V."""
MAX_DIMS = 8
"""Most dimensions of a ``Tensor``."""
READ_PAGES_MAX = 2048
"""Most pages one ``ReadPages`` call may ask for."""
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
"""gRPC's own retries: exponential backoff with full jitter, ~4 s of attempts at most. This is
the only layer that repeats a call to a cache service (the worker's clients loop on none).
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
SEQ_ID_KEY = "icecache-seq-id"
"""Trailing metadata naming the sequence of a NOT_FOUND error."""
ERROR_KEY = "icecache-error"
"""Trailing metadata naming the domain exception of a failed call (e.g. ``OutOfOrder``)."""

WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
}
"""What may travel as a ``Tensor``: wire name -> little-endian dtype."""
_WIRE_NAMES = {np.dtype(dt.kind + str(dt.itemsize)): name for name, dt in WIRE_DTYPES.items()}


# ---- tensors ---------------------------------------------------------------------------------
def to_tensor(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """A message holding ``array`` (any shape) as raw little-endian bytes.

    ``out``: a field of a message being built, filled in place (no copy of the message).
    """
    name = _WIRE_NAMES.get(array.dtype) or _WIRE_NAMES.get(array.dtype.newbyteorder("="))
    if name is None:
        raise ValueError(
            f"dtype {array.dtype} cannot go on the wire; use one of {sorted(WIRE_DTYPES)}"
        )
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[name])
    if out is None:
        return pb.Tensor(dtype=name, shape=data.shape, data=data.tobytes())
    out.dtype = name
    out.shape[:] = data.shape
    out.data = data.tobytes()
    return out


def from_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A read-only array over a message's bytes; ``ValueError`` names ``field`` if malformed."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"{field}: dtype {tensor.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise ValueError(f"{field}: {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    data = tensor.data  # (each read of a bytes field makes a new object)
    if len(data) != math.prod(shape) * dtype.itemsize or (shape and min(shape) < 0):
        raise ValueError(f"{field}: {len(data)} bytes do not fill shape {shape} of {tensor.dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# ---- specs and selections --------------------------------------------------------------------
def spec_to_proto(spec: SequenceSpec) -> pb.SequenceSpec:
    msg = pb.SequenceSpec(
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        num_q_heads=spec.num_q_heads,
        head_dim=spec.head_dim,
        policy=spec.policy,
        dense_layers=spec.dense_layers,
        reuse_group=spec.reuse_group,
        seed=spec.seed,
    )
    for name in ("budget", "sink_tokens", "recent_pages"):
        if getattr(spec, name) is not None:
            setattr(msg, name, getattr(spec, name))
    return msg


def spec_from_proto(msg: pb.SequenceSpec) -> SequenceSpec:
    def optional(name: str) -> int | None:
        return getattr(msg, name) if msg.HasField(name) else None

    return SequenceSpec(
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        num_q_heads=msg.num_q_heads,
        head_dim=msg.head_dim,
        policy=msg.policy,
        budget=optional("budget"),
        sink_tokens=optional("sink_tokens"),
        recent_pages=optional("recent_pages"),
        dense_layers=msg.dense_layers,
        reuse_group=msg.reuse_group,
        seed=msg.seed,
    )


def selection_to_proto(sel: Selection, out: pb.Selection | None = None) -> pb.Selection:
    """``sel`` as a message; ``out``: a field of a message being built, filled in place."""
    msg = pb.Selection() if out is None else out
    to_tensor(sel.indptr, msg.indptr)
    to_tensor(sel.pages, msg.pages)
    to_tensor(sel.lens, msg.lens)
    to_tensor(sel.versions, msg.versions)
    return msg


def selection_from_proto(msg: pb.Selection) -> Selection:
    return Selection(
        from_tensor(msg.indptr, "indptr"),
        from_tensor(msg.pages, "pages"),
        from_tensor(msg.lens, "lens"),
        from_tensor(msg.versions, "versions"),
    )


# ---- host identity ---------------------------------------------------------------------------
def host_identity() -> str:
    """``<boot id>/<hostname>``: equal for two processes that can share POSIX memory.

    Containers on one host share the boot id but usually not the hostname (nor ``/dev/shm``).
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{boot}/{socket.gethostname()}"


# ---- errors ----------------------------------------------------------------------------------
_ERRORS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (UnknownSequence, grpc.StatusCode.NOT_FOUND),
    (SequenceExists, grpc.StatusCode.ALREADY_EXISTS),
    (OutOfOrder, grpc.StatusCode.FAILED_PRECONDITION),
    (SequenceFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (PoolExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManySequences, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManyStreams, grpc.StatusCode.RESOURCE_EXHAUSTED),
)
"""Domain exception -> status code, most specific first."""
_BY_NAME = {kind.__name__: kind for kind, _ in _ERRORS}


def error_status(err: Exception) -> grpc.StatusCode:
    """The status code a domain error goes out as (``INTERNAL`` for anything unexpected)."""
    for kind, code in _ERRORS:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_name(err: Exception) -> str:
    """The name of the domain exception class ``err`` travels as (for ``ERROR_KEY``)."""
    for kind, _ in _ERRORS:
        if isinstance(err, kind):
            return kind.__name__
    return ""


def trailer(err: grpc.RpcError) -> dict[str, str]:
    """The trailing metadata of a failed call (empty when it has none)."""
    return dict(getattr(err, "trailing_metadata", lambda: ())() or ())


def error_from_status(err: grpc.RpcError, address: str) -> Exception:
    """The domain exception a failed call stands for, with the service's message."""
    return error_from_parts(err.code(), err.details() or "", trailer(err), address)


def error_from_local(err: pb.LocalError, address: str) -> Exception:
    """The domain exception an error on a local stream stands for (as ``error_from_status``)."""
    code = grpc.StatusCode.__members__.get(err.code, grpc.StatusCode.UNKNOWN)
    meta = {ERROR_KEY: err.error, SEQ_ID_KEY: err.seq_id}
    return error_from_parts(code, err.message, {k: v for k, v in meta.items() if v}, address)


def error_from_parts(
    code: grpc.StatusCode, details: str, meta: dict[str, str], address: str
) -> Exception:
    """The domain exception of a status ``code`` with ``details`` and trailing ``meta``."""
    if code == grpc.StatusCode.NOT_FOUND:
        return UnknownSequence(meta.get(SEQ_ID_KEY, details))
    kind = _BY_NAME.get(meta.get(ERROR_KEY, ""))
    if kind is not None:
        return kind(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return PermissionError(
            f"cache service at {address} refused the call ({details}); give the client the "
            "service's token (ICECACHE_AUTH_TOKEN) and, for TLS, its CA (ICECACHE_TLS_CA)"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PoolExhausted(details)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,  # e.g. a stream the service cut off when it stopped
    ):
        return ConnectionError(
            f"cache service at {address} did not answer ({code.name}: {details}); "
            "check that it is running (python -m cache_service --port ...)"
        )
    return RuntimeError(f"cache service at {address} failed ({code.name}): {details}")


# ---- local streams ---------------------------------------------------------------------------
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
